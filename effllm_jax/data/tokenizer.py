"""SentencePiece tokenizers: train one on the training split, or load an existing .model.

Our trained models use byte fallback (no <unk> on unseen characters), identity normalisation,
no dummy prefix and no whitespace folding, so `decode(encode(text)) == text` for any text, and
newlines are ordinary characters that BPE may merge ('.\\n\\n'). Ids: <unk>=0, <s>=1, </s>=2;
no pad piece (windows are packed, nothing is padded).

A tokenizer is identified by the SHA-256 of its serialised model; `save()` copies it into a run
directory (local or gs://, through effllm_jax.paths) so that a checkpoint carries the exact
tokenizer it was trained with.

Training is deterministic: SentencePiece's trainer gives a different model for each thread count
(it splits its work per thread), so it always runs on TRAINING_THREADS threads, whatever the
machine has: the same text and options give byte-identical models everywhere.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from effllm_jax import paths
from effllm_jax.data.fetch import DataError

MODEL_FILENAME = "tokenizer.model"
BPE_DIRNAME = "tokenizer"  # where a run keeps a pretrained byte-level BPE (tokenizer.json inside)
# Documents longer than this are encoded in pieces (bounded memory, parallel threads).
MAX_PIECE_CHARS = 1 << 14
# SentencePiece training threads, fixed: the model depends on the count (2 = what the demo used).
TRAINING_THREADS = 2
_SAFE_SPLIT = re.compile(r"(?<=\S) (?=\S)")  # a lone space between words: a piece boundary


def _threads(num_threads: int | None) -> int:
    return num_threads or min(os.cpu_count() or 1, 16)


class Tokenizer:
    """A SentencePiece model with the encode/decode/eos_id/bos_id/vocab_size/save interface."""

    def __init__(self, model_proto: bytes, source: str = ""):
        self.model_proto = bytes(model_proto)
        self.source = source  # where it came from (a path, or 'trained:<key>'), for the record
        self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        if self.eos_id < 0:
            raise DataError(f"tokenizer {source or '(in memory)'} defines no EOS piece; "
                            "packing documents needs one")
        # Models with a dummy prefix turn the start of every encoded piece into '▁word'.
        self._dummy_prefix = self._sp.encode("a", out_type=str)[0].startswith("\u2581")

    # -- the contract ---------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.model_proto).hexdigest()

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text` (optionally with BOS/EOS)."""
        return self._sp.encode(text, add_bos=add_bos, add_eos=add_eos)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of `ids`; negative ids (padding) are skipped."""
        return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1) if i >= 0])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def save(self, path: str | os.PathLike) -> os.PathLike:
        """Writes the model as `path/tokenizer.model` (or to `path` if it ends in .model).

        Only the .model file is written (no JSON beside it): a Hugging Face export directory
        treats `tokenizer.json` as its own format, and the run's `data.json` records the ids.
        `path` may be local or a URL (gs://...); returns the file written.
        """
        path = paths.run_path(path) if paths.is_remote(path) else Path(path)
        model_path = path if path.suffix == ".model" else path / MODEL_FILENAME
        paths.write_bytes(model_path, self.model_proto)
        return model_path

    # -- bulk encoding for pre-tokenisation ---------------------------------------------
    def _pieces(self, text: str, max_chars: int) -> list[str]:
        """Splits a long text at lone spaces so that encoding the pieces equals encoding it whole."""
        pieces, start = [], 0
        while len(text) - start > max_chars:
            cut = None
            for m in _SAFE_SPLIT.finditer(text, start + max_chars // 2, start + max_chars):
                cut = m.start()
            if cut is None:
                cut = start + max_chars  # no word boundary at all: a hard cut (tokens may differ slightly)
            pieces.append(text[start:cut])
            # With a dummy prefix the space is re-created by the prefix of the next piece.
            start = cut + 1 if (self._dummy_prefix and text[cut] == " ") else cut
        pieces.append(text[start:])
        return pieces

    def encode_batch(self, texts: Sequence[str], *, num_threads: int | None = None,
                     max_piece_chars: int = MAX_PIECE_CHARS) -> list[list[int]]:
        """Encodes many texts on several threads; long texts are split at safe word boundaries."""
        flat, owner = [], []
        for i, text in enumerate(texts):
            for piece in self._pieces(text, max_piece_chars):
                flat.append(piece)
                owner.append(i)
        encoded = self._sp.encode(flat, num_threads=_threads(num_threads))
        out: list[list[int]] = [[] for _ in texts]
        for i, ids in zip(owner, encoded):
            out[i].extend(ids)
        return out

    # -- pickling (grain workers) ---------------------------------------------------------
    def __getstate__(self) -> dict:
        return {"model_proto": self.model_proto, "source": self.source}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_proto"], state["source"])

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, sha256={self.sha256[:12]}, source={self.source!r})"


class BPETokenizer:
    """A pretrained byte-level BPE (a .gguf's or a tokenizer.json) behind the data contract.

    Lets a run train on a pretrained model's own vocabulary (e.g. SmolLM2's, from its GGUF):
    the same encode/encode_batch/decode/eos_id/bos_id/vocab_size/sha256/save interface as
    `Tokenizer`. `save(workdir)` writes workdir/tokenizer/ (tokenizer.json + the BOS/EOS ids),
    which `export.tokenizer_io.load_tokenizer` and this module's `load_tokenizer` both read.
    """

    def __init__(self, bpe, source: str = ""):  # bpe: export.tokenizer_io.BPETokenizer
        if bpe.eos_id is None:
            raise DataError(f"tokenizer {source or '(in memory)'} defines no EOS token; "
                            "packing documents needs one")
        self.bpe = bpe
        self.source = source
        self._json = bpe.tokenizer.to_str()

    @property
    def vocab_size(self) -> int:
        return self.bpe.vocab_size

    @property
    def eos_id(self) -> int:
        return int(self.bpe.eos_id)

    @property
    def bos_id(self) -> int:
        return -1 if self.bpe.bos_id is None else int(self.bpe.bos_id)

    @property
    def pad_id(self) -> int:
        return -1

    @property
    def sha256(self) -> str:
        h = hashlib.sha256(self._json.encode())
        h.update(f"bos={self.bos_id},eos={self.eos_id}".encode())
        return h.hexdigest()

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text` (optionally with BOS/EOS)."""
        ids = self.bpe.encode(text)
        return ([self.bos_id] if add_bos and self.bos_id >= 0 else []) + ids + (
            [self.eos_id] if add_eos else [])

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of `ids`; negative ids (padding) are skipped."""
        return self.bpe.decode([int(i) for i in np.asarray(ids).reshape(-1) if i >= 0])

    def id_to_piece(self, token_id: int) -> str:
        return self.bpe.tokenizer.id_to_token(int(token_id))

    def encode_batch(self, texts: Sequence[str], *, num_threads: int | None = None,
                     max_piece_chars: int = MAX_PIECE_CHARS) -> list[list[int]]:
        """Encodes many texts (the tokenizers library parallelises on its own threads)."""
        del num_threads, max_piece_chars  # byte-level BPE needs no splitting of long texts
        return [e.ids for e in self.bpe.tokenizer.encode_batch(list(texts),
                                                               add_special_tokens=False)]

    def save(self, path: str | os.PathLike) -> os.PathLike:
        """Writes path/tokenizer/ (tokenizer.json + ids); returns that directory."""
        from effllm_jax.export.tokenizer_io import META  # late: export imports the model code
        directory = paths.join(path, BPE_DIRNAME)
        paths.write_text(paths.join(directory, "tokenizer.json"), self._json)
        paths.write_text(paths.join(directory, META), json.dumps(
            {"kind": "bpe", "bos_id": self.bpe.bos_id, "eos_id": self.bpe.eos_id}))
        return directory

    def __getstate__(self) -> dict:
        return {"json": self._json, "bos": self.bpe.bos_id, "eos": self.bpe.eos_id,
                "source": self.source}

    def __setstate__(self, state: dict) -> None:
        from tokenizers import Tokenizer as HFTokenizer
        from effllm_jax.export.tokenizer_io import BPETokenizer as Wrapped
        self.__init__(Wrapped(HFTokenizer.from_str(state["json"]), state["bos"], state["eos"]),
                      state["source"])


def _load_bpe(path: Path) -> BPETokenizer | None:
    """A byte-level BPE at `path` (a .gguf file, a directory with tokenizer.json, or a run
    directory keeping one in tokenizer/); else None."""
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return None
        from effllm_jax.export.gguf_import import gguf_tokenizer
        try:
            return BPETokenizer(gguf_tokenizer(str(path)), source=str(path))
        except ValueError as e:
            raise DataError(f"{path}: {e}") from e
    if path.is_dir() and not (path / MODEL_FILENAME).is_file() and (path / BPE_DIRNAME).is_dir():
        path = path / BPE_DIRNAME  # a run directory that keeps a BPE
    if path.is_dir() and (path / "tokenizer.json").is_file() and not (path / MODEL_FILENAME).is_file():
        from effllm_jax.export.tokenizer_io import BPETokenizer as Wrapped
        return BPETokenizer(Wrapped.load(str(path)), source=str(path))
    return None


def stored_tokenizer(workdir: str | os.PathLike):
    """The tokenizer file or directory a run directory holds (tokenizer.model or tokenizer/)."""
    for name in (MODEL_FILENAME, BPE_DIRNAME):
        candidate = paths.join(workdir, name)
        if candidate.exists():
            return candidate
    return None


def load_tokenizer(path: str | os.PathLike) -> Tokenizer | BPETokenizer:
    """Loads a SentencePiece model: a .model file, or a directory with tokenizer.model (or one *.model);
    or a pretrained byte-level BPE: a .gguf file, or a directory with tokenizer.json.

    `path` may be local or a URL (gs://...) (a BPE only local).
    """
    path = paths.run_path(path) if paths.is_remote(path) else Path(path).expanduser()
    if not paths.is_remote(path):
        bpe = _load_bpe(path)
        if bpe is not None:
            return bpe
    if path.is_dir():
        candidates = sorted(path.glob("*.model"))
        path = path / MODEL_FILENAME if (path / MODEL_FILENAME).is_file() or len(candidates) != 1 else candidates[0]
    if not path.is_file():
        raise DataError(f"tokenizer model not found: {path}")
    proto = path.read_bytes()
    try:
        return Tokenizer(proto, source=str(path))
    except RuntimeError as e:  # sentencepiece's parse error
        raise DataError(f"{path} is not a SentencePiece model: {e}") from e


def training_sentences(texts: Iterable[str], max_chars: int = 2000) -> Iterator[str]:
    """Yields training "sentences": runs of whole lines up to `max_chars`, newlines kept."""
    for text in texts:
        buf: list[str] = []
        size = 0
        for line in text.split("\n"):
            while len(line) > max_chars:  # a huge line (minified data): split at a space
                cut = line.rfind(" ", max_chars // 2, max_chars)
                cut = cut if cut > 0 else max_chars
                yield line[:cut]
                line = line[cut:]
            if buf and size + len(line) + 1 > max_chars:
                yield "\n".join(buf) + "\n"
                buf, size = [], 0
            buf.append(line)
            size += len(line) + 1
        if buf:
            yield "\n".join(buf)


def train_tokenizer(texts: Sequence[str], *, vocab_size: int, model_type: str = "bpe",
                    character_coverage: float = 0.9995, max_sentences: int = 2_000_000,
                    seed: int = 0) -> Tokenizer:
    """Trains a SentencePiece model (BPE or unigram, byte fallback, EOS=2) on `texts`.

    Deterministic: the same texts and options give byte-identical models on any machine.
    """
    if model_type not in ("bpe", "unigram"):
        raise DataError(f"tokenizer model_type must be 'bpe' or 'unigram', got {model_type!r}")
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)  # input sampling: identical models on every host
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=training_sentences(texts), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, byte_fallback=True, character_coverage=character_coverage,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            split_digits=True, allow_whitespace_only_pieces=True, max_sentence_length=16384,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, input_sentence_size=max_sentences,
            shuffle_input_sentence=True, num_threads=TRAINING_THREADS, minloglevel=2)
    except RuntimeError as e:
        raise DataError(f"SentencePiece training failed for vocab_size={vocab_size} on "
                        f"{sum(map(len, texts))} characters ({e}); adjust config.data.tokenizer.vocab_size: "
                        "it must exceed 259 + the distinct characters, and a small corpus supports "
                        "only a small vocabulary") from e
    return Tokenizer(model.getvalue(), source=f"trained:{model_type}:{vocab_size}")
