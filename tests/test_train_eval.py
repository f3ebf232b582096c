"""Zero-shot evaluation during training scores the masked model exactly like its sliced twin."""
import json
import types

import jax
import numpy as np
from conftest import make_tiny_config

from effllm_jax import config as config_lib
from effllm_jax import train
from effllm_jax.evaluate import evaluate_tasks
from effllm_jax.model import llama
from effllm_jax.model.compact import slice_params
from effllm_jax.model.lm import LanguageModel


class ByteTokenizer:
    """One token per UTF-8 byte (vocab 256), EOS 255."""

    bos_id, eos_id, vocab_size = None, 255, 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_zero_shot_scores_of_masked_and_sliced_model_agree(tmp_path):
    task = tmp_path / "toy.jsonl"
    rng = np.random.default_rng(0)
    with open(task, "w") as f:
        for i in range(12):
            choices = ["".join(rng.choice(list("abcdefgh"), size=rng.integers(1, 6)))
                       for _ in range(3)]
            f.write(json.dumps({"context": f"item {i}:", "choices": [" " + c for c in choices],
                                "label": int(i % 3)}) + "\n")
    config = make_tiny_config()
    config.model.vocab_size = 256
    config.train.update(eval_tasks=(str(task),), eval_tasks_every=5, eval_tasks_limit=12)
    config_lib.validate(config, jax.device_count())
    cfg = config_lib.model_config(config)
    params = llama.init_params(cfg, jax.random.key(1))
    masks = {"hidden": rng.random(cfg.d_model) < 0.8,
             "heads": rng.random((cfg.num_layers, cfg.num_heads)) < 0.7,
             "ffn": rng.random((cfg.num_layers, cfg.ffn_dim)) < 0.6}
    state = types.SimpleNamespace(params=params, masks=masks)
    dataset = types.SimpleNamespace(tokenizer=ByteTokenizer())
    scores = train.evaluate_zero_shot(config, state, dataset)
    spec, compact = slice_params(params, masks, cfg)
    sliced = evaluate_tasks(LanguageModel(spec, compact, ByteTokenizer()), [str(task)], 12,
                            max_length=config.train.seq_len)
    assert set(scores) == {str(task)}
    assert scores[str(task)] == sliced["tasks"][str(task)]["score"]
    assert 0.0 <= scores[str(task)] <= 1.0
