"""Run directories anywhere: a whole run (config, tokenizer, data.json, checkpoints, TensorBoard,
metrics, resume) through a gs:// URL, offline; and the clear error for gs:// without GCS access.

The offline gs:// is a fake at the two client boundaries a real run uses: fsspec's 'gs'
protocol (what etils.epath, so our path layer and Orbax's metadata, go through) and TensorStore's
GCS kvstore (what Orbax writes array data through), both redirected to one local folder.
"""
import importlib
import json
import random
import subprocess
import sys
import types
from pathlib import Path

import pytest
from conftest import make_tiny_config
from etils import epath
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from orbax.checkpoint._src.path import gcs_utils

from effllm_jax import checkpoint as ckpt_lib
from effllm_jax import export, paths, train

REPO = Path(__file__).resolve().parents[1]
FSSPEC_PROTOCOLS = importlib.import_module("fsspec.registry")._registry  # protocol -> class


class FakeGCS(DirFileSystem):
    """gs://bucket/key <-> ROOT/bucket/key on local disk: an offline stand-in for gcsfs."""

    protocol = ("gs", "gcs")
    cachable = False
    root = ""

    def __init__(self, *args, **storage_options):  # epath passes gcsfs options; none apply
        # auto_mkdir: like an object store, writing a key needs no folder made first
        super().__init__(path=FakeGCS.root, fs=LocalFileSystem(auto_mkdir=True))


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """A gs:// that lands in tmp_path/gcs; the test runs in tmp_path/cwd (to catch local leaks)."""
    root = tmp_path / "gcs"
    root.mkdir()
    monkeypatch.setattr(FakeGCS, "root", str(root))
    for name in ("gs", "gcs"):
        monkeypatch.setitem(FSSPEC_PROTOCOLS, name, FakeGCS)
    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", lambda p: {
        "driver": "file", "path": str(root / p.removeprefix("gs://"))})
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda p: False)
    epath.backend.fsspec_backend._get_filesystem.cache_clear()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("EFFLLM_CACHE", str(tmp_path / "cache"))  # token caches: local to the host
    yield root
    epath.backend.fsspec_backend._get_filesystem.cache_clear()


def _text_corpus(path: Path, words: int = 30_000) -> Path:
    """A deterministic English-like text file (the tokenizer is not the point here)."""
    rng = random.Random(0)
    vocab = ("the a of and to in that was her his it with for as had you not be she he at by on "
             "but which said could would been their have all this from they were very so what "
             "Elizabeth Darcy Emma Anne house letter morning sister family moment").split()
    sentences = [" ".join(rng.choice(vocab) for _ in range(rng.randint(5, 14))).capitalize() + "."
                 for _ in range(words // 9)]
    path.write_text("\n".join(" ".join(sentences[i:i + 4]) for i in range(0, len(sentences), 4)),
                    encoding="utf-8")
    return path


def _losses(metrics_text: str) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in map(json.loads, metrics_text.splitlines()) if "loss" in m}


def test_a_run_lives_entirely_in_a_gs_run_directory_and_resumes_there(fake_gcs, tmp_path, capsys):
    config = make_tiny_config(steps=4, checkpoint_every=2, log_every=1, eval_every=0)
    config.prune.prune_steps = 2  # the one event at step 4 ends the pruning inside the run
    config.model.vocab_size = 320
    config.data.update(kind="corpus", sources=(str(_text_corpus(tmp_path / "corpus.txt")),),
                       heldout=())
    config.data.tokenizer.vocab_size = 320
    workdir = "gs://bucket/run"
    train.run(config, workdir)

    run = fake_gcs / "bucket" / "run"
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 4
    assert (run / "tokenizer.model").stat().st_size > 0
    assert json.loads((run / "data.json").read_text())["tokenizer"]["vocab_size"] == 320
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert any(p.name.startswith("events.out.tfevents") and p.stat().st_size > 0
               for p in (run / "tensorboard").iterdir())
    first = _losses((run / "metrics.jsonl").read_text())
    assert sorted(first) == [1, 2, 3, 4]
    assert not any(Path.cwd().iterdir()), "nothing may be written to a local 'gs:' folder"

    # Readers take the URL too, and a resumed run continues from the gs:// checkpoint exactly.
    assert ckpt_lib.load_run_config(workdir).train.steps == 4
    assert ckpt_lib.Checkpointer(workdir, async_save=False).all_steps() == [2, 4]
    epath.Path(workdir, "checkpoints", "4").rmtree()
    capsys.readouterr()
    train.run(config, workdir)
    out = capsys.readouterr().out
    assert "step 3:" in out and "step 1:" not in out  # resumed from step 2, not restarted
    resumed = _losses((run / "metrics.jsonl").read_text())
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(first[step], rel=1e-6, abs=1e-6)
    assert not any(Path.cwd().iterdir())

    # Export reads the gs:// run (weights and tokenizer) into a local export directory.
    export.export_run(workdir, str(tmp_path / "export"), "flax")
    assert (tmp_path / "export" / "tokenizer" / "tokenizer.model").read_bytes() == \
        (run / "tokenizer.model").read_bytes()
    assert json.loads((tmp_path / "export" / "spec.json").read_text())["step"] == 4


def test_gs_without_a_gcs_client_is_one_clear_error_before_compiling(tmp_path, monkeypatch):
    monkeypatch.delitem(FSSPEC_PROTOCOLS, "gs", raising=False)
    for module in ("gcsfs", "google.cloud.storage", "tensorflow"):  # as if none were installed
        monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setattr(train, "cached_trainer", lambda c: pytest.fail("compiled before the check"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(paths.PathError, match=r"gs://bucket/run is on Google Cloud Storage, but "
                                              r"the GCS client is not installed \(missing gcsfs, "
                                              r"google-cloud-storage\): pip install gcsfs "
                                              r"google-cloud-storage"):
        train.run(make_tiny_config(), "gs://bucket/run")
    assert not any(tmp_path.iterdir())


def test_gs_without_credentials_is_one_clear_error(tmp_path, monkeypatch):
    """gcsfs installed but no Google credentials (google-auth's own error is named)."""
    gcsfs = types.ModuleType("gcsfs")
    gcsfs.GCSFileSystem = type("GCSFileSystem", (FakeGCS,), {"__module__": "gcsfs.core"})
    monkeypatch.setitem(FSSPEC_PROTOCOLS, "gs", gcsfs.GCSFileSystem)
    auth = types.ModuleType("google.auth")
    auth.exceptions = types.ModuleType("google.auth.exceptions")
    auth.exceptions.DefaultCredentialsError = type("DefaultCredentialsError", (Exception,), {})

    def no_credentials():
        raise auth.exceptions.DefaultCredentialsError("Your default credentials were not found.")

    auth.default = no_credentials
    google = types.ModuleType("google")
    google.auth = auth
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.auth", auth)
    monkeypatch.setitem(sys.modules, "google.auth.exceptions", auth.exceptions)
    storage = types.ModuleType("google.cloud.storage")
    monkeypatch.setitem(sys.modules, "google.cloud.storage", storage)
    monkeypatch.setitem(sys.modules, "gcsfs", gcsfs)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(paths.PathError, match=r"gs://b/run: no Google Cloud credentials on this "
                                              r"machine \(Your default credentials were not found"):
        train.run(make_tiny_config(), "gs://b/run")
    assert not any(tmp_path.iterdir())


def test_train_cli_prints_one_line_for_an_unusable_gs_workdir(tmp_path):
    """The CLI: exit status 2, one line on stderr, no local 'gs:' folder."""
    env = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
           "HOME": str(tmp_path), "EFFLLM_CACHE": str(tmp_path / "cache")}
    # gcsfs/google-auth may be installed: hide them, so the answer does not depend on the machine.
    code = ("import sys; sys.modules['gcsfs'] = sys.modules['tensorflow'] = None; "
            "sys.argv = ['train', '--workdir=gs://bucket/run', '--config.data.kind=synthetic', "
            "'--config.model.vocab_size=256']; from effllm_jax.train import cli; cli()")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines == [line for line in lines if line.startswith("effllm_jax.train: ")] and \
        len(lines) == 1, out.stderr
    assert "GCS client is not installed" in lines[0]
    assert not (tmp_path / "gs:").exists()


def test_local_paths_are_absolute_and_urls_are_kept():
    assert str(paths.run_path("gs://bucket/run/")) == "gs://bucket/run"
    assert str(paths.join("gs://bucket/run", "checkpoints")) == "gs://bucket/run/checkpoints"
    assert paths.run_path("runs/x").is_absolute() and not paths.is_remote("runs/x")
    with pytest.raises(paths.PathError, match="unsupported URL scheme ftp://"):
        paths.check_access("ftp://host/run")
