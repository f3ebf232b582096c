"""Reading training text: built-in corpora or local files, and the held-out split by document.

A source spec (one entry of `config.data.sources`) is either a built-in corpus name (see
`corpora.CORPORA`) or a local path, directory or glob of:
  *.txt / *.md / *.rst (optionally .gz): one document per file,
  *.jsonl (optionally .gz): one document per line, text in field `text_field`,
  *.parquet: one document per row, text in column `text_field`.
Text must be UTF-8; with `errors='strict'` (the default) invalid bytes raise a `DataError`
naming the file and byte offset instead of silently corrupting the corpus.
"""
from __future__ import annotations

import fnmatch
import glob
import gzip
import hashlib
import json
import os
from pathlib import Path

from effllm_jax.data import corpora
from effllm_jax.data.corpora import Document, clean_text
from effllm_jax.data.fetch import DataError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet")


def _suffix(path: str) -> str:
    """The data suffix of `path`, ignoring a trailing .gz."""
    base = path[:-3] if path.endswith(".gz") else path
    return os.path.splitext(base)[1].lower()


def _read_bytes(path: str) -> bytes:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                return fh.read()
        with open(path, "rb") as fh:
            return fh.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from e


def _decode(data: bytes, where: str, errors: str) -> str:
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise DataError(
            f"{where}: bytes {e.start}..{e.end} are not valid UTF-8 ({e.reason}: {data[e.start:e.end]!r}); "
            "convert the file to UTF-8 or set config.data.encoding_errors='replace'") from e


def _read_jsonl(path: str, field: str, errors: str) -> list[Document]:
    docs = []
    for lineno, raw in enumerate(_read_bytes(path).split(b"\n"), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(_decode(raw, where, errors))
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from e
        if not isinstance(record, dict) or field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{where}: no field {field!r} (has {keys}); set config.data.text_field")
        if not isinstance(record[field], str):
            raise DataError(f"{where}: field {field!r} is {type(record[field]).__name__}, not a string")
        docs.append(Document(where, clean_text(record[field])))
    return docs


def _read_parquet(path: str, field: str) -> list[Document]:
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: not a readable parquet file ({e})") from e
    if field not in pf.schema_arrow.names:
        raise DataError(f"{path}: no column {field!r} (columns: {pf.schema_arrow.names}); "
                        "set config.data.text_field")
    docs, row = [], 0
    for batch in pf.iter_batches(columns=[field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            if value is not None and not isinstance(value, str):
                raise DataError(f"{path}: row {row} of column {field!r} is not a string")
            docs.append(Document(f"{path}:{row}", clean_text(value or "")))
            row += 1
    return docs


def expand_paths(spec: str) -> list[str]:
    """Expands a file, directory or glob spec into the sorted list of data files it names."""
    if any(ch in spec for ch in "*?["):
        paths = sorted(p for p in glob.glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(p))
        if not paths:
            raise DataError(f"source {spec!r}: the glob matches no file")
    elif os.path.isdir(os.path.expanduser(spec)):
        root = os.path.expanduser(spec)
        paths = sorted(str(p) for p in Path(root).rglob("*") if p.is_file() and _suffix(str(p)) in SUFFIXES)
        if not paths:
            raise DataError(f"source {spec!r}: the directory holds no {'/'.join(SUFFIXES)} file")
    elif os.path.isfile(os.path.expanduser(spec)):
        paths = [os.path.expanduser(spec)]
    else:
        raise DataError(f"source {spec!r}: no such file or directory")
    unknown = [p for p in paths if _suffix(p) not in SUFFIXES]
    if unknown:
        raise DataError(f"source {spec!r}: cannot read {unknown[0]!r}: supported suffixes are "
                        f"{', '.join(SUFFIXES)} (optionally .gz)")
    return paths


def read_source(spec: str, *, root: Path, text_field: str = "text", errors: str = "strict") -> list[Document]:
    """Returns the non-empty documents of one source spec (built-in corpus or local files)."""
    if spec in corpora.CORPORA:
        docs = corpora.load_corpus(spec, root)
    elif "/" not in spec and "." not in spec and not os.path.exists(spec):
        raise DataError(f"unknown corpus {spec!r}; built-in corpora: {', '.join(sorted(corpora.CORPORA))} "
                        "(or give a path/glob of .txt, .jsonl or .parquet files)")
    else:
        docs = []
        for path in expand_paths(spec):
            suffix = _suffix(path)
            if suffix == ".jsonl":
                docs += _read_jsonl(path, text_field, errors)
            elif suffix == ".parquet":
                docs += _read_parquet(path, text_field)
            else:
                docs.append(Document(path, clean_text(_decode(_read_bytes(path), path, errors))))
    nonempty = [d for d in docs if d.text.strip()]
    if not nonempty:
        raise DataError(f"source {spec!r} is empty: {len(docs)} document(s), none with any text")
    return nonempty


def _unit_hash(name: str) -> float:
    """A stable pseudo-random number in [0, 1) for a document name."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2 ** 64


def split_heldout(sources: dict[str, list[Document]], patterns: tuple[str, ...],
                  fraction: float = 0.0) -> tuple[dict[str, list[Document]], dict[str, list[Document]]]:
    """Splits each source's documents into (train, held-out) by name patterns, else by `fraction`.

    A pattern naming a built-in corpus that is not among the sources is ignored (so the default
    'austen/persuasion' does not get in the way of other corpora); any other pattern that matches
    no document is an error, as it is most likely a typo.
    """
    names = [d.name for docs in sources.values() for d in docs]
    for pat in patterns:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            head = pat.split("/", 1)[0]
            if head in corpora.CORPORA and head not in sources:
                continue
            raise DataError(f"held-out pattern {pat!r} matches no document of sources "
                            f"{list(sources)} (document names look like {names[0]!r})")
    train: dict[str, list[Document]] = {}
    heldout: dict[str, list[Document]] = {}
    for spec, docs in sources.items():
        held = [any(fnmatch.fnmatchcase(d.name, p) for p in patterns) for d in docs]
        if not any(held) and fraction > 0 and len(docs) > 1:
            scores = [_unit_hash(d.name) for d in docs]
            held = [s < fraction for s in scores]
            if not any(held):  # keep at least one document for validation
                held[scores.index(min(scores))] = True
        train[spec] = [d for d, h in zip(docs, held) if not h]
        heldout[spec] = [d for d, h in zip(docs, held) if h]
        if not train[spec]:
            raise DataError(f"source {spec!r}: every document is held out; nothing is left to train on")
    return train, heldout
