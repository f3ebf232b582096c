"""Run directories anywhere: one path layer for local folders and gs:// URLs.

Everything a run keeps in its run directory (config.json, tokenizer.model, data.json,
checkpoints/, tensorboard/, metrics.jsonl) is read and written through this module, built on
etils.epath (what Orbax uses for the checkpoints), so `--workdir=gs://bucket/run` and
`--workdir=runs/x` are the same code. Caches each host needs locally ($EFFLLM_CACHE) do not
come through here.

Local writes are atomic (temporary file + rename); an object store writes a whole object at
close, which is atomic already. TensorBoard on a remote run directory: tensorboardX's own
gs:// writer needs google-cloud-storage, so remote event files go through this layer instead:
events are buffered in memory and the whole file is rewritten at each flush (which is what
tensorboardX's GCS writer does too); local event files are appended to as usual.
"""
from __future__ import annotations

import importlib.util
import io
import os
import sys
import tempfile
from typing import Any, Union

from etils import epath

PathLike = Union[str, os.PathLike]


class PathError(ValueError):
    """A run directory this machine cannot use (no client, no credentials, not shared...)."""


def is_remote(path: PathLike) -> bool:
    """True for a URL such as gs://bucket/run (anything with a scheme), False for a local path."""
    return "://" in os.fspath(path)


def run_path(path: PathLike) -> epath.Path:
    """`path` as an epath.Path: URLs as they are, local paths made absolute."""
    if isinstance(path, epath.Path) and is_remote(path):
        return path
    text = os.fspath(path)
    if is_remote(text):
        return epath.Path(text.rstrip("/"))
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def join(path: PathLike, *parts: str) -> epath.Path:
    """`path`/`parts`... as an epath.Path."""
    return run_path(path).joinpath(*parts)


def exists(path: PathLike) -> bool:
    """True if a file or directory is at `path`."""
    return run_path(path).exists()


def read_bytes(path: PathLike) -> bytes:
    """The bytes of the file at `path`."""
    return run_path(path).read_bytes()


def read_text(path: PathLike) -> str:
    """The UTF-8 text of the file at `path`."""
    return read_bytes(path).decode("utf-8")


def write_bytes(path: PathLike, data: bytes) -> None:
    """Writes `data` to `path` so that readers never see a partial file (parents are created)."""
    p = run_path(path)
    if is_remote(p):  # no folders to create; an object appears whole when its upload completes
        p.write_bytes(data)
        return
    os.makedirs(p.parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; run files are as shareable as any
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: PathLike, text: str) -> None:
    """Writes UTF-8 `text` to `path` atomically (see write_bytes)."""
    write_bytes(path, text.encode("utf-8"))


def remove(path: PathLike) -> None:
    """Deletes the file at `path` if it is there."""
    p = run_path(path)
    if p.exists():
        p.unlink()


# -------------------------------------------------------------------- can this machine use it?
# (module, pip package) a gs:// run directory needs: epath's filesystem, and the client Orbax uses.
GCS_CLIENTS = (("gcsfs", "gcsfs"), ("google.cloud.storage", "google-cloud-storage"))


def check_access(path: PathLike) -> None:
    """Raises PathError naming the problem when `path` is a URL this machine cannot use.

    Checked before anything compiles. A gs:// run directory needs the GCS client libraries
    (gcsfs for epath, or TensorFlow's gfile; google-cloud-storage, which Orbax asks about the
    bucket) and Google Cloud credentials.
    """
    text = os.fspath(path)
    if not is_remote(text):
        return
    scheme = text.split("://", 1)[0]
    if scheme not in ("gs", "s3", "az", "hf"):
        raise PathError(f"{text}: unsupported URL scheme {scheme}:// (use a local path or "
                        "gs://bucket/dir)")
    if scheme != "gs":
        return
    import fsspec
    registered = fsspec.registry.get("gs")
    if registered is not None and registered.__module__.split(".")[0] != "gcsfs":
        return  # a stand-in registered for gs:// (a proxy, a test double) brings its own access
    missing = [pip for module, pip in GCS_CLIENTS if not _module_available(module)]
    if "gcsfs" in missing and _module_available("tensorflow"):
        missing.remove("gcsfs")  # epath reads gs:// through tf.io.gfile then
    if missing:
        raise PathError(f"the run directory {text} is on Google Cloud Storage, but the GCS client "
                        f"is not installed (missing {', '.join(missing)}): "
                        f"pip install {' '.join(missing)}")
    problem = _gcs_credentials_problem()
    if problem:
        raise PathError(f"{text}: no Google Cloud credentials on this machine "
                        f"({problem}); run `gcloud auth application-default login`, set "
                        "GOOGLE_APPLICATION_CREDENTIALS, or run on a VM with a service account")



def _module_available(name: str) -> bool:
    if name in sys.modules:  # imported already (or masked with None)
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _gcs_credentials_problem() -> str | None:
    """Why google-auth finds no default credentials (None when it finds some)."""
    try:
        import google.auth
        import google.auth.exceptions
    except ImportError as e:
        return f"google-auth is not installed: {e}"
    try:
        google.auth.default()
    except google.auth.exceptions.DefaultCredentialsError as e:
        return str(e).strip().splitlines()[0]
    return None


# -------------------------------------------------------------------- TensorBoard anywhere
class _BufferedEventFile:
    """A write-only event file on an object store: rewritten whole at each flush."""

    def __init__(self, path: str):
        self.path = run_path(path)
        self.buffer = io.BytesIO()

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        self.path.write_bytes(self.buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _BufferedEventFileFactory:
    """tensorboardX's writer-factory interface for URLs, through this path layer."""

    def open(self, path: str) -> _BufferedEventFile:
        return _BufferedEventFile(path)

    def directory_check(self, path: str) -> None:
        """Object stores have no folders to create."""


def summary_writer(logdir: PathLike) -> Any:
    """A tensorboardX SummaryWriter writing under `logdir` (local or URL)."""
    from tensorboardX import SummaryWriter, record_writer
    text = os.fspath(run_path(logdir))
    if is_remote(text):
        record_writer.register_writer_factory(text.split("://", 1)[0], _BufferedEventFileFactory())
    return SummaryWriter(text)
