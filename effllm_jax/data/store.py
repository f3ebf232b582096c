"""Pre-tokenised document streams on disk, memory-mapped and cached by content hash.

A store is the concatenation, in document order, of `[BOS] tokens(doc) EOS` for every document,
kept as a flat little-endian uint16 (or uint32 for vocabularies over 65,536) array in
`tokens.bin`, plus `doc_starts.npy` (int64 offsets, one per document and a final end offset).
The directory name is a SHA-256 over (format version, tokenizer model, BOS flag, each document's
name and text hash), so the same texts with the same tokenizer are tokenised exactly once and
any change in either builds a new store. Builds are written to a temporary directory and
renamed into place under a lock: a crash never leaves a half-written store behind.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from effllm_jax.data.corpora import Document
from effllm_jax.data.fetch import DataError, file_lock
from effllm_jax.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)
FORMAT = 1
BATCH_CHARS = 8 << 20  # encode this much text at a time (bounded memory)
BUILD_COUNT = 0  # stores built (not loaded) by this process: lets tests prove reuse


@dataclasses.dataclass
class TokenStore:
    """A memory-mapped token stream with document boundaries."""

    path: Path
    tokens: np.ndarray  # np.memmap, uint16/uint32
    doc_starts: np.ndarray  # int64 [num_docs + 1]
    built: bool  # True if this call built it, False if it came from the cache

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_docs(self) -> int:
        return int(self.doc_starts.shape[0] - 1)

    def document(self, i: int) -> np.ndarray:
        """Token ids of document `i` including its separator(s)."""
        return np.asarray(self.tokens[self.doc_starts[i]:self.doc_starts[i + 1]])

    def __getstate__(self) -> dict:  # reopen the memmap rather than pickling its bytes
        return {"path": self.path, "doc_starts": self.doc_starts, "built": self.built}

    def __setstate__(self, state: dict) -> None:
        opened = _open(state["path"])
        self.__dict__.update(opened.__dict__, built=state["built"])


def text_digest(text: str) -> str:
    """SHA-256 of a document's UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def store_key(docs: Sequence[Document], digests: Sequence[str], tokenizer: Tokenizer, add_bos: bool) -> str:
    """The content hash naming the store for these documents and this tokenizer."""
    h = hashlib.sha256(json.dumps({"format": FORMAT, "tokenizer": tokenizer.sha256,
                                   "add_bos": bool(add_bos)}).encode())
    for doc, digest in zip(docs, digests):
        h.update(f"\0{doc.name}\0{digest}".encode())
    return h.hexdigest()[:32]


def _open(path: Path) -> TokenStore:
    meta = json.loads((path / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    expected = meta["num_tokens"] * dtype.itemsize
    if meta.get("format") != FORMAT or (path / "tokens.bin").stat().st_size != expected:
        raise DataError(f"token store {path} is corrupt or from another version")
    tokens = np.memmap(path / "tokens.bin", dtype=dtype, mode="r", shape=(meta["num_tokens"],))
    return TokenStore(path, tokens, np.load(path / "doc_starts.npy"), built=False)


def _write(tmp: Path, docs: Sequence[Document], tokenizer: Tokenizer, add_bos: bool,
           num_threads: int | None) -> None:
    dtype = np.dtype("<u2") if tokenizer.vocab_size <= 1 << 16 else np.dtype("<u4")
    prefix = [tokenizer.bos_id] if add_bos and tokenizer.bos_id >= 0 else []
    lengths: list[int] = []
    with open(tmp / "tokens.bin", "wb") as out:
        i = 0
        while i < len(docs):
            j, chars = i, 0
            while j < len(docs) and (j == i or chars + len(docs[j].text) <= BATCH_CHARS):
                chars += len(docs[j].text)
                j += 1
            for ids in tokenizer.encode_batch([d.text for d in docs[i:j]], num_threads=num_threads):
                row = np.asarray(prefix + ids + [tokenizer.eos_id], dtype=dtype)
                out.write(row.tobytes())
                lengths.append(row.shape[0])
            i = j
    doc_starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=doc_starts[1:])
    np.save(tmp / "doc_starts.npy", doc_starts)
    meta = {"format": FORMAT, "dtype": dtype.str, "num_tokens": int(doc_starts[-1]),
            "num_docs": len(lengths), "tokenizer_sha256": tokenizer.sha256, "add_bos": bool(add_bos),
            "doc_names": [d.name for d in docs], "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (tmp / "meta.json").write_text(json.dumps(meta))


def build_token_store(docs: Sequence[Document], tokenizer: Tokenizer, root: Path, *,
                      digests: Sequence[str] | None = None, add_bos: bool = False,
                      num_threads: int | None = None) -> TokenStore:
    """Returns the store of `docs` under `root/tokens/`, tokenising them only if not cached."""
    global BUILD_COUNT
    if not docs:
        raise DataError("cannot build a token store from zero documents")
    digests = digests or [text_digest(d.text) for d in docs]
    key = store_key(docs, digests, tokenizer, add_bos)
    path = root / "tokens" / key
    with file_lock(root, f"tokens-{key}"):
        if path.exists():
            try:
                return _open(path)
            except (DataError, OSError, ValueError, KeyError) as e:
                log.warning("rebuilding token store %s: %s", path, e)
                shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=path.parent))
        tmp.chmod(0o755)  # mkdtemp makes 0700; the cache may be shared
        try:
            start = time.time()
            _write(tmp, docs, tokenizer, add_bos, num_threads)
            os.rename(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        BUILD_COUNT += 1
        store = _open(path)
        store.built = True
        log.info("tokenised %d documents into %d tokens in %.1fs (%s)", store.num_docs,
                 store.num_tokens, time.time() - start, path)
        return store
