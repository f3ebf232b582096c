"""train.init_from (a run starts from a pretrained model) and data.tokenizer.path = a model's BPE."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import make_tiny_config

gguf = pytest.importorskip("gguf")

from effllm_jax import config as config_lib  # noqa: E402
from effllm_jax import init_from, train  # noqa: E402
from effllm_jax.data import build_dataset, load_tokenizer  # noqa: E402
from effllm_jax.export import gguf_import, load_language_model  # noqa: E402
from effllm_jax.model.llama import ModelConfig, abstract_params  # noqa: E402
from test_gguf import _tiny_bpe, write_gguf  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be in want of a wife. import json  # 123\n") * 40


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """A tiny GGUF (float32 weights, its own byte-level BPE) and a text file to train on."""
    tmp = tmp_path_factory.mktemp("init_from")
    tokens, merges = _tiny_bpe(tmp)
    cfg = ModelConfig(vocab_size=len(tokens), d_model=32, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, ffn_dim=48, tie_embeddings=False)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda p, s: ((1.0 if "scale" in str(p) else 0.0)
                      + 0.2 * rng.normal(size=s.shape)).astype(np.float32),
        abstract_params(cfg))
    path = str(tmp / "tiny.gguf")
    write_gguf(path, cfg, params, tokens, merges, embed_type=gguf.GGMLQuantizationType.F32)
    (tmp / "corpus.txt").write_text(TEXT)
    return tmp, cfg, path


def init_config(tmp, cfg, path):
    config = make_tiny_config(steps=3, log_every=1, checkpoint_every=100, eval_every=0)
    config.model.update(vocab_size=cfg.vocab_size, tie_embeddings=False)
    config.data.update(kind="corpus", sources=(str(tmp / "corpus.txt"),), heldout=(),
                       cache_dir=str(tmp / "cache"))
    config.data.tokenizer.path = path
    config.prune.update(warmup_steps=1, prune_steps=2, every=1)
    config.train.init_from = path
    return config


@pytest.fixture(scope="module")
def init_run(model_files):
    tmp, cfg, path = model_files
    config = init_config(tmp, cfg, path)
    workdir = str(tmp / "run")
    state, _ = train.run(config, workdir)
    return config, workdir, state


def test_the_data_are_tokenised_with_the_models_own_bpe(model_files, init_run):
    tmp, cfg, path = model_files
    config, workdir, _ = init_run
    theirs = gguf_import.gguf_tokenizer(path)
    ours = load_tokenizer(path)
    text = "import json  # 123 It is a truth <|endoftext|>"
    assert ours.encode(text) == theirs.encode(text) and ours.decode(ours.encode(text)) == text
    assert ours.eos_id == 0 and ours.vocab_size == cfg.vocab_size
    t = config.train
    data = build_dataset(config.data, seq_len=t.seq_len, global_batch=t.global_batch, seed=t.seed)
    first = data.local_batch(0)[0].tolist()  # a window of the packed corpus, EOS between copies
    expected = theirs.encode(TEXT) + [0]
    assert any(expected[i:i + len(first)] == first for i in range(len(expected)))
    # the run directory keeps the BPE: exports, evaluation and a resume read the same one
    assert load_tokenizer(workdir).sha256 == ours.sha256
    assert load_language_model(workdir).tokenizer.encode(text) == theirs.encode(text)
    resumed = config.data.copy_and_resolve_references()  # no path: the run's own is used
    resumed.tokenizer.update(path="", vocab_size=cfg.vocab_size)
    again = build_dataset(resumed, seq_len=t.seq_len, global_batch=t.global_batch,
                          seed=t.seed, workdir=workdir)
    assert again.tokenizer.sha256 == ours.sha256


def test_init_from_starts_the_run_at_the_imported_weights_exactly(model_files, init_run):
    tmp, cfg, path = model_files
    config, workdir, _ = init_run
    t = config.train
    batch = build_dataset(config.data, seq_len=t.seq_len, global_batch=t.global_batch,
                          seed=t.seed).local_batch(0)
    logits = np.asarray(load_language_model(path).logits(batch[:, :-1]), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    expected = -np.take_along_axis(logp, batch[:, 1:, None], -1).mean()
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        first = json.loads(f.readline())
    assert first["step"] == 1
    # the step's loss is taken before its update: the imported model's loss on batch 0
    assert abs(first["loss"] - expected) < 1e-4, (first["loss"], expected)
    # and not what a fresh init would give: init_std 0.02 puts that within ~0.01 of ln(V). (The
    # imported model's own loss moves by ~0.1 with the batch, which hangs on the corpus's path.)
    assert abs(first["loss"] - np.log(cfg.vocab_size)) > 0.2


def test_another_model_shape_is_one_clear_error_before_anything_runs(model_files, tmp_path):
    tmp, cfg, path = model_files
    config = init_config(tmp, cfg, path)
    config.model.ffn_dim = 40
    with pytest.raises(ValueError, match=r"another model shape than model\.\* \(ffn_dim 48 vs 40\)"):
        config_lib.validate(config, jax.device_count())
    config = init_config(tmp, cfg, str(tmp / "missing.gguf"))
    with pytest.raises(ValueError, match="missing.gguf: no such file"):
        config_lib.validate(config, jax.device_count())
    # the CLI: the default (tiny) config is another shape; one line, exit 2, nothing written
    out = subprocess.run(
        [sys.executable, "-m", "effllm_jax.train", f"--workdir={tmp_path / 'run'}",
         f"--config.train.init_from={path}"], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "another model shape" in lines[0] and "d_model 32 vs 128" in lines[0]
    assert not (tmp_path / "run").exists()


def test_a_model_with_another_tokenizer_is_refused(model_files, tmp_path):
    tmp, cfg, path = model_files
    from effllm_jax.export.tokenizer_io import BPETokenizer
    tokens, merges = _tiny_bpe(tmp)
    tokens[5], tokens[6] = tokens[6], tokens[5]  # same size, but two ids spell other strings
    BPETokenizer.from_vocab(tokens, merges, ["<|endoftext|>"], pre="smollm", bos_id=0,
                            eos_id=0).save(str(tmp_path / "other"))
    other = load_tokenizer(str(tmp_path / "other"))  # a tokenizer.json directory
    assert other.vocab_size == cfg.vocab_size
    config = init_config(tmp, cfg, path)
    with pytest.raises(ValueError, match="has another tokenizer than this run's"):
        init_from.load(config, config_lib.model_config(config), other)
    params, masks = init_from.load(config, config_lib.model_config(config), load_tokenizer(path))
    assert all(np.all(m) for m in jax.tree.leaves(masks))  # a dense source: nothing masked
