"""Tokenizers that travel with exported models: byte-level BPE (from GGUF) and SentencePiece.

Both expose the project's tokenizer interface: encode(str) -> list[int] (no BOS added),
decode(list[int]) -> str, bos_id, eos_id, vocab_size. A run's own tokenizer is loaded with
`effllm_jax.data.load_tokenizer` when that exists; these wrappers cover everything else.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Sequence

log = logging.getLogger(__name__)

META = "effllm_tokenizer.json"  # {"kind": "bpe", "bos_id": .., "eos_id": ..} next to tokenizer.json

# llama.cpp pre-tokenizer names whose split is "single digits, then the GPT-2 regex"
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell"}
_GPT2_PRE = {"gpt2", "default", "gpt-2"}


class BPETokenizer:
    """A Hugging Face `tokenizers.Tokenizer` (byte-level BPE) with BOS/EOS ids."""

    def __init__(self, tokenizer: Any, bos_id: int | None, eos_id: int | None):
        self.tokenizer = tokenizer
        self.bos_id = bos_id
        self.eos_id = eos_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no BOS/EOS added)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (special tokens kept)."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    @classmethod
    def from_vocab(cls, tokens: Sequence[str], merges: Sequence[str],
                   special: Sequence[str] = (), pre: str = "gpt2", bos_id: int | None = None,
                   eos_id: int | None = None) -> "BPETokenizer":
        """Builds a byte-level BPE from a vocabulary, 'a b' merge strings and special tokens."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pre in _DIGIT_SPLIT_PRE:
            pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), byte_level])
        elif pre in _GPT2_PRE:
            pre_tokenizer = byte_level
        else:
            raise ValueError(f"pre-tokenizer {pre!r} is not supported (supported: "
                             f"{sorted(_DIGIT_SPLIT_PRE | _GPT2_PRE)})")
        vocab = {t: i for i, t in enumerate(tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizer
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        return cls(tok, bos_id, eos_id)

    def save(self, directory: str) -> None:
        """Writes tokenizer.json and the BOS/EOS ids."""
        os.makedirs(directory, exist_ok=True)
        self.tokenizer.save(os.path.join(directory, "tokenizer.json"))
        with open(os.path.join(directory, META), "w") as f:
            json.dump({"kind": "bpe", "bos_id": self.bos_id, "eos_id": self.eos_id}, f)

    def save_hf(self, directory: str) -> None:
        """Writes files that `transformers.AutoTokenizer` loads (PreTrainedTokenizerFast)."""
        self.tokenizer.save(os.path.join(directory, "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        for key, idx in (("bos_token", self.bos_id), ("eos_token", self.eos_id)):
            if idx is not None:
                config[key] = self.tokenizer.id_to_token(idx)
        _write_json(os.path.join(directory, "tokenizer_config.json"), config)

    @classmethod
    def load(cls, directory: str) -> "BPETokenizer":
        """Reads what `save` (or a Hugging Face export) wrote."""
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
        meta = _read_json(os.path.join(directory, META))
        if meta is None:  # a Hugging Face directory: ids from the token strings
            config = _read_json(os.path.join(directory, "tokenizer_config.json")) or {}
            names = {k: _token_str(config.get(k + "_token")) for k in ("bos", "eos")}
            meta = {k + "_id": tok.token_to_id(v) if v else None for k, v in names.items()}
        return cls(tok, meta.get("bos_id"), meta.get("eos_id"))


class SentencePieceTokenizer:
    """A SentencePiece model (file or serialized bytes) behind the project's tokenizer interface."""

    def __init__(self, model_path: str | None = None, model_proto: bytes | None = None):
        import sentencepiece as spm

        if model_proto is None:
            if model_path is None:
                raise ValueError("SentencePieceTokenizer needs a model file or model bytes")
            with open(model_path, "rb") as f:
                model_proto = f.read()
        self.model_path = model_path
        self.model_proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        self.bos_id = _id_or_none(self.sp.bos_id())
        self.eos_id = _id_or_none(self.sp.eos_id())

    @property
    def vocab_size(self) -> int:
        """Number of pieces."""
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no BOS/EOS added)."""
        return list(self.sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids."""
        return self.sp.decode([int(i) for i in ids])

    def save(self, directory: str) -> None:
        """Writes the model as directory/tokenizer.model."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
            f.write(self.model_proto)

    def save_hf(self, directory: str) -> None:
        """tokenizer.model + tokenizer_config.json for transformers' LlamaTokenizer."""
        self.save(directory)
        # HF's LlamaTokenizer prepends '▁' unless told the model has no dummy prefix
        dummy_prefix = self.sp.encode("a", out_type=str)[0].startswith("\u2581")
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": self.bos_id is not None,
                  "add_eos_token": False, "add_prefix_space": dummy_prefix,
                  "clean_up_tokenization_spaces": False, "legacy": False}
        for key, idx in (("bos_token", self.bos_id), ("eos_token", self.eos_id),
                         ("unk_token", _id_or_none(self.sp.unk_id()))):
            if idx is not None:
                config[key] = self.sp.id_to_piece(idx)
        _write_json(os.path.join(directory, "tokenizer_config.json"), config)


def find_sentencepiece_model(path: str) -> str | None:
    """A SentencePiece model file at `path` (a file, or tokenizer.model / *.model in a dir)."""
    if os.path.isfile(path):
        return path if _is_sentencepiece(path) else None
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        names.sort(key=lambda n: n != "tokenizer.model")
        for name in names:
            if name.endswith(".model") and _is_sentencepiece(os.path.join(path, name)):
                return os.path.join(path, name)
    return None


def load_tokenizer(path: str) -> Any:
    """Loads a tokenizer saved next to a model: ours, the run's SentencePiece, or HF files."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, META)):
        return BPETokenizer.load(path)
    model = find_sentencepiece_model(path)
    if model is not None:
        try:  # the project's own tokenizer class when it is there
            from effllm_jax.data import load_tokenizer as project_loader
        except ImportError:
            return SentencePieceTokenizer(model)
        return project_loader(model)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "tokenizer.json")):
        return BPETokenizer.load(path)
    raise ValueError(f"no tokenizer found at {path} (looked for {META}, a SentencePiece "
                     f".model file and tokenizer.json)")


def save_tokenizer(tokenizer: Any, directory: str) -> bool:
    """Saves a tokenizer object under `directory`; False when it cannot be saved."""
    if hasattr(tokenizer, "save"):
        os.makedirs(directory, exist_ok=True)
        tokenizer.save(directory)
        return True
    sp = as_sentencepiece(tokenizer)
    if sp is not None:
        sp.save(directory)
        return True
    return False


def as_sentencepiece(tokenizer: Any, source_path: str | None = None) -> SentencePieceTokenizer | None:
    """Our SentencePiece wrapper for a tokenizer object (or path) backed by SentencePiece."""
    if isinstance(tokenizer, SentencePieceTokenizer):
        return tokenizer
    proto = getattr(tokenizer, "model_proto", None)  # the project's data.Tokenizer
    if isinstance(proto, (bytes, bytearray)):
        return SentencePieceTokenizer(model_proto=bytes(proto))
    model = _model_file_of(tokenizer)
    if model is None and source_path is not None:
        model = find_sentencepiece_model(source_path)
    return SentencePieceTokenizer(model) if model is not None else None


def save_hf_tokenizer(tokenizer: Any, source_path: str | None, directory: str) -> str:
    """Writes Hugging Face tokenizer files; returns a note on what was written."""
    if isinstance(tokenizer, BPETokenizer):
        tokenizer.save_hf(directory)
        return "tokenizer: byte-level BPE as tokenizer.json"
    sp = as_sentencepiece(tokenizer, source_path)
    if sp is not None:
        sp.save_hf(directory)
        return "tokenizer: SentencePiece tokenizer.model as LlamaTokenizer"
    if tokenizer is None and source_path is None:
        return "tokenizer: none"
    log.warning("tokenizer %r is not SentencePiece or byte-level BPE: no Hugging Face "
                "tokenizer files written", tokenizer)
    return "tokenizer: not written (unsupported kind)"


def _model_file_of(tokenizer: Any) -> str | None:
    for attr in ("model_path", "model_file", "path", "source"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, str) and find_sentencepiece_model(value):
            return find_sentencepiece_model(value)
    return None


def _is_sentencepiece(path: str) -> bool:
    try:
        import sentencepiece as spm

        spm.SentencePieceProcessor(model_file=path)
        return True
    except Exception:  # noqa: BLE001 - any parse failure means "not a SentencePiece model"
        return False


def _id_or_none(i: int) -> int | None:
    return None if i < 0 else int(i)


def _token_str(token: Any) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
