"""Bad configs fail with a clear error naming the problem, before anything compiles."""
import subprocess
import sys

import jax
import pytest
from conftest import make_resume_config, make_tiny_config

from effllm_jax import config as config_lib
from effllm_jax import train


@pytest.mark.parametrize("field, value, message", [
    ("prune.target_params", 10**9, "larger than the source model"),
    ("model.num_kv_heads", 3, "not divisible by model.num_kv_heads=3"),
    ("mesh.shape", (3, 1, 1), "needs 3 devices, but 8 are available"),
    ("mesh.shape", (-1, 3, 1), "does not divide the 8 devices"),
    ("prune.criterion", "magnitude", "prune.criterion='magnitude'"),
    ("prune.target_params", 5, "cannot fit"),
    ("train.global_batch", 6, "not divisible by the 8 batch shards"),
    ("prune.group_types", ("heads", "layers"), "unknown ['layers']"),
    ("train.checkpoint_every", 0, "train.checkpoint_every=0 must be >= 1"),
    ("train.log_every", 0, "train.log_every=0 must be >= 1"),
    ("train.keep_checkpoints", 0, "train.keep_checkpoints=0 must be >= 1 (0 would delete"),
    ("optim.lr", -1.0, "optim.lr=-1.0 must be > 0"),
    ("optim.b2", 1.0, "optim.b2=1.0 must be in [0, 1"),
    ("optim.grad_clip", 0.0, "optim.grad_clip=0.0 must be > 0"),
])
def test_bad_config_is_rejected_before_compiling(tmp_path, field, value, message):
    config = make_tiny_config()
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        train.run(config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()  # failed before any state or checkpoint


def test_the_tiny_config_is_valid():
    config_lib.validate(make_tiny_config(), jax.device_count())


def test_cli_rejects_an_unknown_config_field(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "effllm_jax.train", "--config.model.num_headz=4",
         f"--workdir={tmp_path}"], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "num_headz" in out.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_resuming_with_another_model_is_refused(tmp_path):
    config = make_resume_config()  # as test_train's resume test: the compiled step is shared
    train.run(config, str(tmp_path))
    config.model.ffn_dim = 64
    with pytest.raises(ValueError, match="holds a run of a different model"):
        train.run(config, str(tmp_path))


def test_unknown_eval_task_is_rejected_before_compiling(tmp_path):
    config = make_tiny_config()
    config.train.update(eval_tasks=("arc_hard",), eval_tasks_every=5)
    with pytest.raises(ValueError, match="unknown task 'arc_hard'"):
        train.run(config, str(tmp_path))
    config.train.eval_tasks = ()
    with pytest.raises(ValueError, match="train.eval_tasks is empty"):
        train.run(config, str(tmp_path))
    config.train.eval_tasks = ("piqa",)  # a known task, but synthetic data has no tokenizer
    with pytest.raises(ValueError, match="needs a tokenizer"):
        train.run(config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_cli_turns_a_bad_value_into_one_line_and_exit_2_and_debug_shows_the_traceback(tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "effllm_jax.train", "--config.data.kind=synthetic",
               "--config.model.vocab_size=256", "--config.train.checkpoint_every=0",
               f"--workdir={run_dir}"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, out.stderr
    assert lines == ["effllm_jax.train: error: train.checkpoint_every=0 must be >= 1"], lines
    assert not run_dir.exists()  # nothing written
    out = subprocess.run(command + ["--debug"], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "Traceback" in out.stderr

