"""Multi-host runs: 2 processes x 4 CPU devices through jax.distributed, resumed on 1 x 8;
per-host run directories fail at start; every host gets the same tokenizer, trained once by
process 0 (and byte-identical whatever the thread count).
"""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import ml_collections
import portpicker
import pytest

from effllm_jax import data, distributed, train
from effllm_jax.data import corpora, fetch

REPO = Path(__file__).resolve().parents[1]
# What gloo prints on every process: "[Gloo] Rank 1 is connected to 7 peer ranks. Expected ...",
# whole or in pieces.
GLOO_MESSAGES = re.compile(r"\[Gloo\][^\n]*|[^\n]*peer ranks[^\n]*")
# The tiny model of conftest.make_tiny_config on real text, as a config file the CLI reads:
# pruning events at steps 4, 6, 8, 10; checkpoints at 6 and 12; the loss logged at every step.
CONFIG_FILE = """
from effllm_jax import config as config_lib


def get_config():
    c = config_lib.base_config()
    c.model.update(vocab_size=512, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=8, ffn_dim=48)
    c.data.update(kind="corpus", sources=({corpus!r},), heldout=())
    c.data.tokenizer.vocab_size = 512
    c.prune.update(target_fraction=0.45, warmup_steps=2, prune_steps=8, every=2)
    c.optim.update(lr=1e-2, warmup_steps=2)
    c.train.update(steps=12, global_batch=8, seq_len=16, log_every=1, checkpoint_every=6,
                   eval_every=0)
    return c
"""


@pytest.fixture(scope="module")
def novels() -> list[str]:
    """Real text: the start of three Austen novels (the persistent corpus cache)."""
    docs = {d.name: d.text for d in corpora.load_corpus("austen", fetch.cache_root())}
    return [docs[f"austen/{n}"][:150_000] for n in ("emma", "mansfieldpark", "sensesensibility")]


@pytest.fixture(scope="module")
def config_path(tmp_path_factory, novels) -> Path:
    folder = tmp_path_factory.mktemp("config")
    corpus = folder / "emma.txt"
    corpus.write_text(novels[0][:60_000], encoding="utf-8")
    path = folder / "tiny_multihost.py"
    path.write_text(CONFIG_FILE.format(corpus=str(corpus)))
    return path


def load_config(path: Path) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("tiny_multihost", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def losses(workdir: Path) -> dict[int, float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m["loss"] for m in map(json.loads, lines) if "loss" in m}


def launch(config_path: Path, workdirs: list[Path], tmp_path: Path) -> list[subprocess.Popen]:
    """Starts one CLI training process per workdir, all in one jax.distributed cluster."""
    address = f"localhost:{portpicker.pick_unused_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    for var in ("EFFLLM_DISTRIBUTED", *distributed.ENV_VARS.values()):
        env.pop(var, None)
    return [subprocess.Popen(  # each "host" has its own local cache
        [sys.executable, "-m", "effllm_jax.train", f"--config={config_path}", f"--workdir={w}",
         f"--coordinator_address={address}", f"--num_processes={len(workdirs)}",
         f"--process_id={i}"], cwd=REPO, env={**env, "EFFLLM_CACHE": str(tmp_path / f"cache{i}")},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i, w in enumerate(workdirs)]


def finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str, str]]:
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return results


@pytest.fixture(scope="module")
def uninterrupted(config_path, tmp_path_factory) -> dict[int, float]:
    """Per-step losses of the whole run in this one process, on 8 devices."""
    workdir = tmp_path_factory.mktemp("one_process")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EFFLLM_CACHE", str(workdir.parent / "one_process_cache"))
        train.run(load_config(config_path), str(workdir))
    return losses(workdir)


def test_two_processes_match_one_and_their_checkpoint_resumes_in_one(config_path, uninterrupted,
                                                                     tmp_path, monkeypatch):
    run = tmp_path / "two_processes"
    (main, main_out, main_err), (other, other_out, other_err) = finish(
        launch(config_path, [run, run], tmp_path), timeout=240)
    assert main == 0 and other == 0, main_err[-3000:] + other_err[-3000:]
    assert "Architecture found" in main_out and "pruning event" in main_out
    # Only process 0 logs (gloo's C++ runtime prints its connections on each process, from
    # several threads, so one message may arrive split over lines).
    assert GLOO_MESSAGES.sub("", other_out).strip() == "", other_out
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [6, 12]
    # Process 0 trained the tokenizer and stored it in the run; process 1 read that copy.
    trained = list((tmp_path / "cache0" / "tokenizers").glob("*.model"))
    assert len(trained) == 1 and trained[0].read_bytes() == (run / "tokenizer.model").read_bytes()
    assert not list((tmp_path / "cache1").glob("tokenizers/*.model"))
    assert list((tmp_path / "cache1").glob("tokens/*"))  # its token cache is its own
    two = losses(run)
    assert sorted(two) == list(range(1, 13)) == sorted(uninterrupted)
    for step in two:
        assert two[step] == pytest.approx(uninterrupted[step], abs=1e-5), step

    # The 2-process checkpoint of step 6 (after two pruning events) resumed on 1 process x 8.
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "12")
    (resumed / "metrics.jsonl").unlink()
    monkeypatch.setenv("EFFLLM_CACHE", str(tmp_path / "cache_resume"))
    train.run(load_config(config_path), str(resumed))
    again = losses(resumed)
    assert sorted(again) == list(range(7, 13))
    for step in again:
        assert again[step] == pytest.approx(uninterrupted[step], abs=1e-5), step


def test_per_host_run_directories_fail_at_start_on_every_process(config_path, tmp_path):
    results = finish(launch(config_path, [tmp_path / "host0", tmp_path / "host1"], tmp_path),
                     timeout=120)
    for code, _, err in results:
        assert code == 2, err[-3000:]
        assert err.strip().splitlines()[-1].startswith(
            "effllm_jax.train: error: the run directory "), err[-3000:]
        assert "process(es) [1] of 2 cannot see the file process 0 wrote there" in err
    assert not (tmp_path / "host0" / "checkpoints").exists()


@pytest.mark.parametrize("given, message", [
    ({"coordinator_address": "h:1"}, "missing --num_processes"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, "--process_id=2 must be"),
    ({"coordinator_address": "h", "num_processes": 2, "process_id": 0}, "must be HOST:PORT"),
])
def test_bad_multi_host_flags_are_named(given, message):
    with pytest.raises(distributed.DistributedError, match=message):
        distributed.cluster_settings(**given, environ={})


def test_multi_host_settings_from_flags_environment_or_tpu_auto_detection():
    env = {"EFFLLM_COORDINATOR_ADDRESS": "10.0.0.1:1234", "EFFLLM_NUM_PROCESSES": "4",
           "EFFLLM_PROCESS_ID": "3"}
    assert distributed.cluster_settings(environ=env) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    assert distributed.cluster_settings(process_id=1, environ=env)["process_id"] == 1  # flag wins
    assert distributed.cluster_settings(environ={"EFFLLM_DISTRIBUTED": "1"}) == {}  # auto (TPU)
    assert distributed.cluster_settings(environ={}) is None  # one process


# ------------------------------------------------------------------ one tokenizer for every host
def test_the_tokenizer_is_the_same_whatever_the_thread_count(novels, monkeypatch):
    models = set()
    for threads in (1, 2, 4):
        monkeypatch.setattr(os, "cpu_count", lambda: threads)  # a machine with this many cores
        models.add(data.train_tokenizer(novels, vocab_size=1000).model_proto)
    assert len(models) == 1  # byte-identical


def test_other_processes_read_the_tokenizer_process_0_stored(novels, tmp_path, monkeypatch):
    monkeypatch.setenv("EFFLLM_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(novels[0], encoding="utf-8")
    cfg = data.default_data_config()
    cfg.update(sources=(str(corpus),), heldout=())
    cfg.tokenizer.vocab_size = 600
    stored = data.train_tokenizer([novels[1]], vocab_size=600)  # not what corpus.txt would give
    stored.save(tmp_path / "run")
    barriers = []
    ds = data.build_dataset(cfg, seq_len=32, global_batch=8, seed=0, workdir=str(tmp_path / "run"),
                            process_index=1, barrier=barriers.append)
    assert barriers == ["tokenizer"] and ds.tokenizer.sha256 == stored.sha256
    assert not (tmp_path / "run" / "data.json").exists()  # process 0 writes the side files
    with pytest.raises(data.DataError, match="run directory is not shared"):
        data.build_dataset(cfg, seq_len=32, global_batch=8, seed=0, workdir=str(tmp_path / "other"),
                           process_index=1, barrier=barriers.append)
