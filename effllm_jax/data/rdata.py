"""A small reader for R's serialisation format and lazy-load databases (.rdb/.rdx), without R.

R packages ship their data sets as a lazy-load database: `Rdata.rdx` is a gzip-compressed,
serialised R list whose `variables` element maps each object name to an (offset, length) pair
in `Rdata.rdb`; each record there is a 4-byte big-endian uncompressed length followed by a
zlib stream holding one serialised object. Serialisation is XDR (big-endian): a header, then
items, each introduced by a 32-bit flags word (type in the low byte, attribute/tag bits,
string encoding bits in the "levels" field).

Only what data packages use is supported: NULL, symbols, pairlists (attributes), logical,
integer, double and character vectors, and generic vectors (lists). Anything else raises
`RDataError` naming the type, rather than returning garbage.
"""
from __future__ import annotations

import bz2
import dataclasses
import gzip
import lzma
import struct
import zlib
from pathlib import Path
from typing import Any

# SEXP types (R internals, serialize.c).
_NILSXP, _SYMSXP, _LISTSXP, _CHARSXP, _LGLSXP, _INTSXP, _REALSXP, _STRSXP, _VECSXP = (
    0, 1, 2, 9, 10, 13, 14, 16, 19)
_REFSXP, _NILVALUE_SXP, _GLOBALENV_SXP, _EMPTYENV_SXP, _BASEENV_SXP = 255, 254, 253, 242, 241
_MISSINGARG_SXP, _BASENAMESPACE_SXP = 251, 247
_NA_INT = -(2 ** 31)
# CHARSXP "levels" bits giving the string's declared encoding.
_LATIN1, _UTF8, _BYTES, _ASCII = 1 << 2, 1 << 3, 1 << 1, 1 << 6


class RDataError(ValueError):
    """Raised when an R serialisation stream is malformed or uses an unsupported feature."""


@dataclasses.dataclass
class RObject:
    """An R value with its attributes (e.g. `names`); `value` is a Python list/str/None."""

    value: Any
    attributes: dict[str, Any] = dataclasses.field(default_factory=dict)

    def named(self) -> dict[str, Any]:
        """Returns a list-like value as {name: element} using its `names` attribute."""
        names = self.attributes.get("names")
        if names is None:
            raise RDataError("R object has no 'names' attribute")
        names = names.value if isinstance(names, RObject) else names
        return dict(zip(names, self.value))


class _Reader:
    """Sequential XDR reader over one serialised object."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0
        self.refs: list[Any] = []

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise RDataError(f"truncated R stream (wanted {n} bytes at offset {self.pos})")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def header(self) -> None:
        fmt = self._take(2)
        if fmt != b"X\n":
            raise RDataError(f"only XDR ('X') R serialisation is supported, got {fmt!r}")
        version = self.int()
        self.int(), self.int()  # R version that wrote it, minimal R version to read it
        if version == 3:
            self._take(self.int())  # native encoding name
        elif version != 2:
            raise RDataError(f"unsupported R serialisation version {version}")

    def _length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more words
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def _charsxp(self, levels: int) -> str | None:
        n = self.int()
        if n == -1:
            return None  # NA_character_
        raw = self._take(n)
        if levels & _LATIN1:
            return raw.decode("latin-1")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:  # strings marked native/bytes that are not UTF-8
            raise RDataError(f"R string at offset {self.pos - n} is not UTF-8: {e}") from e

    def item(self) -> Any:
        flags = self.int()
        kind, levels = flags & 0xFF, flags >> 12
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind in (_NILVALUE_SXP, _NILSXP, _GLOBALENV_SXP, _EMPTYENV_SXP, _BASEENV_SXP,
                    _MISSINGARG_SXP, _BASENAMESPACE_SXP):
            return None
        if kind == _REFSXP:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == _SYMSXP:
            name = self.item()  # a CHARSXP
            self.refs.append(name)
            return name
        if kind == _CHARSXP:
            return self._charsxp(levels)
        if kind == _LISTSXP:  # pairlist: attr?, tag?, car, cdr
            out: dict[str, Any] = {}
            while True:
                if has_attr:
                    self.item()
                tag = self.item() if has_tag else f"[{len(out)}]"
                out[tag] = self.item()
                flags = self.int()
                kind = flags & 0xFF
                if kind != _LISTSXP:
                    if kind not in (_NILVALUE_SXP, _NILSXP):
                        raise RDataError(f"unsupported pairlist tail of type {kind}")
                    return out
                has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind in (_LGLSXP, _INTSXP):
            n = self._length()
            vals = list(struct.unpack(f">{n}i", self._take(4 * n)))
            value = [None if v == _NA_INT else (bool(v) if kind == _LGLSXP else v) for v in vals]
        elif kind == _REALSXP:
            n = self._length()
            value = list(struct.unpack(f">{n}d", self._take(8 * n)))
        elif kind in (_STRSXP, _VECSXP):
            value = [self.item() for _ in range(self._length())]
        else:
            raise RDataError(f"unsupported R object type {kind} at offset {self.pos - 4}")
        attrs = self.item() if has_attr else {}
        return RObject(value, attrs or {})


def unserialize(data: bytes) -> Any:
    """Decodes one R-serialised (XDR) object into RObject / str / None values."""
    reader = _Reader(data)
    reader.header()
    return reader.item()


def _decompress_record(record: bytes, compressed: Any) -> bytes:
    """Decompresses one .rdb record ([4-byte length][stream]) as flagged by the .rdx."""
    if len(record) < 5:
        raise RDataError("truncated .rdb record")
    expected = struct.unpack(">I", record[:4])[0]
    if compressed in (True, 1):
        out = zlib.decompress(record[4:])
    elif compressed in (2, 3):  # bzip2 / xz: a 1-byte type ('2', '3' or '0' = stored) follows
        kind, body = record[4:5], record[5:]
        out = body if kind == b"0" else (bz2.decompress(body) if kind == b"2" else lzma.decompress(body))
    elif compressed in (False, 0, None):
        out = record[4:]
    else:
        raise RDataError(f"unknown .rdb compression flag {compressed!r}")
    if len(out) != expected:
        raise RDataError(f".rdb record length mismatch: header says {expected}, got {len(out)}")
    return out


def read_lazyload_db(rdb_path: str | Path) -> dict[str, Any]:
    """Reads every variable of an R lazy-load database (`X.rdb` + `X.rdx`) into {name: value}."""
    rdb_path = Path(rdb_path)
    rdx_path = rdb_path.with_suffix(".rdx")
    for p in (rdb_path, rdx_path):
        if not p.is_file():
            raise FileNotFoundError(f"R lazy-load database file not found: {p}")
    index = unserialize(gzip.decompress(rdx_path.read_bytes())).named()
    variables = index["variables"].named()
    compressed = index.get("compressed")
    compressed = compressed.value[0] if isinstance(compressed, RObject) else True
    blob = rdb_path.read_bytes()
    out = {}
    for name, where in variables.items():
        offset, length = where.value
        out[name] = unserialize(_decompress_record(blob[offset:offset + length], compressed))
    return out


def character_vector(obj: Any, what: str) -> list[str]:
    """Returns an R character vector as a list of str (NA -> ''), or raises naming `what`."""
    if not isinstance(obj, RObject) or not all(isinstance(v, (str, type(None))) for v in obj.value):
        raise RDataError(f"{what} is not an R character vector")
    return ["" if v is None else v for v in obj.value]
