"""Fetching packages through their ordinary registry clients into a local cache.

Debian packages come through `apt-get download` and are unpacked with `dpkg-deb -x` (or a
pure-Python .deb reader where dpkg is absent); PyPI source distributions come through
`pip download --no-deps --no-binary :all:`. Downloads land in a temporary directory inside the
cache and are deleted once the wanted text has been extracted: no archive is kept.

Offline machines: put the archive (`NAME_*.deb`, or the sdist `NAME-VERSION.tar.gz`) into
`$EFFLLM_CACHE/downloads/` and it is used instead of the network.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import io
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

# Client commands; module-level so tests can simulate an unreachable registry.
APT_GET: tuple[str, ...] = ("apt-get",)
PIP: tuple[str, ...] = (sys.executable, "-m", "pip")
DPKG_DEB: tuple[str, ...] = ("dpkg-deb",)
FETCH_TIMEOUT_S = 900
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class DataError(ValueError):
    """A problem with the training data (missing, empty, undecodable, too short...)."""


class FetchError(DataError):
    """A corpus could not be fetched from its registry."""


def cache_root(override: str | os.PathLike | None = None) -> Path:
    """Returns the cache directory: `override`, else $EFFLLM_CACHE, else ~/.cache/effllm."""
    root = override or os.environ.get("EFFLLM_CACHE") or os.path.join("~", ".cache", "effllm")
    path = Path(root).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the data cache directory {path}: {e} "
                        "(set EFFLLM_CACHE or config.data.cache_dir to a writable place)") from e
    return path


@contextlib.contextmanager
def file_lock(root: Path, name: str) -> Iterator[None]:
    """Holds an exclusive advisory lock so concurrent processes build a cache entry once."""
    lock_dir = root / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes `data` to `path` via a temporary file and rename (readers never see a partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; cache files are shareable like any file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _run(cmd: list[str], cwd: Path, what: str) -> subprocess.CompletedProcess:
    """Runs a registry client; a missing client or a failure becomes a FetchError."""
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=FETCH_TIMEOUT_S)
    except FileNotFoundError as e:
        raise FetchError(f"cannot fetch {what}: command {cmd[0]!r} not found ({e.strerror}); "
                         "put the archive into $EFFLLM_CACHE/downloads/ to work offline") from e
    except subprocess.TimeoutExpired as e:
        raise FetchError(f"cannot fetch {what}: {' '.join(cmd)} timed out after {FETCH_TIMEOUT_S}s") from e


def _tail(text: str, n: int = 800) -> str:
    text = text.strip()
    return text if len(text) <= n else "..." + text[-n:]


def apt_download(package: str, dest: Path, root: Path) -> Path:
    """Downloads a Debian package with `apt-get download` (or takes it from the offline drop)."""
    dropped = sorted(glob.glob(str(root / "downloads" / f"{package}_*.deb")))
    if dropped:
        log.info("using pre-placed %s", dropped[-1])
        return Path(dropped[-1])
    what = f"Debian package {package!r}"
    proc = _run([*APT_GET, "download", package], dest, what)
    if proc.returncode != 0 and os.geteuid() == 0 and "Unable to locate" in proc.stderr:
        log.info("apt-get cannot locate %s; running apt-get update once", package)
        _run([*APT_GET, "update"], dest, what)
        proc = _run([*APT_GET, "download", package], dest, what)
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if proc.returncode != 0 or not debs:
        raise FetchError(
            f"cannot fetch {what} with `apt-get download {package}` (exit {proc.returncode}); "
            f"is the Debian mirror reachable (try `apt-get update`)? Offline: put {package}_*.deb "
            f"into {root / 'downloads'}. apt-get said: {_tail(proc.stderr or proc.stdout)}")
    return debs[-1]


def pip_sdist_download(requirement: str, dest: Path, root: Path) -> Path:
    """Downloads a PyPI source distribution (`pip download --no-deps --no-binary :all:`)."""
    name, _, version = requirement.partition("==")
    dropped = sorted(glob.glob(str(root / "downloads" / f"{name}-{version or '*'}.tar.gz")))
    if dropped:
        log.info("using pre-placed %s", dropped[-1])
        return Path(dropped[-1])
    what = f"PyPI sdist {requirement!r}"
    proc = _run([*PIP, "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
                 "-d", str(dest), requirement], dest, what)
    archives = sorted(dest.glob("*.tar.gz")) + sorted(dest.glob("*.zip"))
    if proc.returncode != 0 or not archives:
        raise FetchError(
            f"cannot fetch {what} with `pip download` (exit {proc.returncode}); is PyPI reachable? "
            f"Offline: put {name}-{version}.tar.gz into {root / 'downloads'}. "
            f"pip said: {_tail(proc.stderr or proc.stdout)}")
    return archives[-1]


def _ar_members(deb: Path) -> Iterator[tuple[str, bytes]]:
    """Yields (name, bytes) of the members of a Debian `ar` archive."""
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise FetchError(f"{deb} is not a Debian package (no ar magic)")
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        yield name, data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)


def unpack_deb(deb: Path, dest: Path) -> Path:
    """Unpacks a .deb's file tree into `dest` (dpkg-deb -x, else a pure-Python fallback)."""
    dest.mkdir(parents=True, exist_ok=True)
    if shutil.which(DPKG_DEB[0]):
        proc = _run([*DPKG_DEB, "-x", str(deb), str(dest)], dest, f"{deb.name} (unpacking)")
        if proc.returncode != 0:
            raise FetchError(f"dpkg-deb -x {deb} failed: {_tail(proc.stderr)}")
        return dest
    for name, payload in _ar_members(deb):
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                raise FetchError(f"{deb} uses zstd compression; install dpkg-deb to unpack it")
            with tarfile.open(fileobj=io.BytesIO(payload)) as tar:
                tar.extractall(dest, filter="data")
            return dest
    raise FetchError(f"{deb} has no data.tar member")


def unpack_sdist(archive: Path, dest: Path) -> Path:
    """Unpacks a source distribution (.tar.gz) into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
    except tarfile.TarError as e:
        raise FetchError(f"cannot unpack {archive}: {e}") from e
    return dest


@contextlib.contextmanager
def scratch_dir(root: Path, prefix: str) -> Iterator[Path]:
    """A temporary directory inside the cache (same filesystem), removed afterwards."""
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=root / "tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def unpacked_package(kind: str, name: str, root: Path) -> Iterator[Path]:
    """Fetches a 'deb' or 'pypi' package and yields the directory it is unpacked in (temporary)."""
    with scratch_dir(root, f"fetch-{name.replace('=', '')}-") as tmp:
        download, tree = tmp / "download", tmp / "tree"
        download.mkdir()
        if kind == "deb":
            log.info("fetching Debian package %s (apt-get download)", name)
            unpack_deb(apt_download(name, download, root), tree)
        elif kind == "pypi":
            log.info("fetching PyPI sdist %s (pip download)", name)
            unpack_sdist(pip_sdist_download(name, download, root), tree)
        else:
            raise ValueError(f"unknown package kind {kind!r}")
        yield tree
