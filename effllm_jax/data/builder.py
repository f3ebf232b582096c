"""Turns `config.data` into a CorpusDataset: read, split, tokenise (all cached), then pipeline.

With a run directory and several processes, process 0 alone resolves (trains or loads) the
tokenizer and stores it in the run directory; after a barrier every other process reads that
copy, so all hosts tokenise with the same bytes. Token caches stay local to each host.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Sequence

from effllm_jax import paths
from effllm_jax.data import sources as sources_lib
from effllm_jax.data.corpora import Document
from effllm_jax.data.fetch import DataError, cache_root, file_lock
from effllm_jax.data.pipeline import CorpusDataset
from effllm_jax.data.store import build_token_store, text_digest
from effllm_jax.data.tokenizer import (MODEL_FILENAME, Tokenizer, load_tokenizer, stored_tokenizer,
                                       train_tokenizer)

log = logging.getLogger(__name__)
TOKENIZER_FORMAT = 2  # bump when train_tokenizer's fixed options change (2: fixed thread count)


def as_tuple(value: Any) -> tuple:
    """Config lists may be tuples, lists or comma-separated strings ('austen,milton')."""
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return tuple(value)


def _trained_tokenizer(tcfg: Any, docs: Sequence[Document], digests: Sequence[str], root: Path) -> Tokenizer:
    """Trains the configured tokenizer on `docs`, or takes it from the cache if trained before."""
    options = {"format": TOKENIZER_FORMAT, "vocab_size": int(tcfg.vocab_size), "model_type": tcfg.model_type,
               "character_coverage": float(tcfg.character_coverage), "max_sentences": int(tcfg.max_sentences)}
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for digest in digests:
        h.update(digest.encode())
    key = h.hexdigest()[:32]
    path = root / "tokenizers" / f"{key}.model"
    with file_lock(root, f"tokenizer-{key}"):
        if path.is_file():
            tok = load_tokenizer(path)
            tok.source = f"trained:{tcfg.model_type}:{tcfg.vocab_size}:{key}"
            return tok
        log.info("training a %s tokenizer (vocab %d) on %d documents", tcfg.model_type, tcfg.vocab_size, len(docs))
        tok = train_tokenizer([d.text for d in docs], vocab_size=int(tcfg.vocab_size), model_type=tcfg.model_type,
                              character_coverage=float(tcfg.character_coverage),
                              max_sentences=int(tcfg.max_sentences))
        tok.source = f"trained:{tcfg.model_type}:{tcfg.vocab_size}:{key}"
        tok.save(path)
        return tok


def resolve_tokenizer(tcfg: Any, docs: Sequence[Document], digests: Sequence[str], root: Path,
                      workdir: str | None) -> Tokenizer:
    """The run's tokenizer: the one already in `workdir` (a resumed run), else configured/trained."""
    own = stored_tokenizer(workdir) if workdir else None
    if own is not None:
        tok = load_tokenizer(own)
        if tcfg.path and load_tokenizer(tcfg.path).sha256 != tok.sha256:
            raise DataError(f"{own} differs from config.data.tokenizer.path={tcfg.path!r}: a run cannot "
                            "change its tokenizer; use a new workdir")
        if not tcfg.path and tok.vocab_size != int(tcfg.vocab_size):
            raise DataError(f"{own} has vocab {tok.vocab_size} but config.data.tokenizer.vocab_size is "
                            f"{tcfg.vocab_size}: a run cannot change its tokenizer; use a new workdir")
        log.info("using the run's own tokenizer %s", own)
        return tok
    if tcfg.path:
        return load_tokenizer(tcfg.path)
    return _trained_tokenizer(tcfg, docs, digests, root)


def _shared_tokenizer(tcfg: Any, docs: Sequence[Document], digests: Sequence[str], root: Path,
                      workdir: str | None, process_index: int,
                      barrier: Callable[[str], None] | None) -> Tokenizer:
    """The run's tokenizer, resolved by process 0 alone and read from `workdir` by the others."""
    if not workdir or barrier is None:
        return resolve_tokenizer(tcfg, docs, digests, root, workdir)
    if process_index == 0:
        tokenizer = resolve_tokenizer(tcfg, docs, digests, root, workdir)
        tokenizer.save(workdir)
    barrier("tokenizer")
    if process_index == 0:
        return tokenizer
    own = stored_tokenizer(workdir)
    if own is None:
        raise DataError(f"{paths.join(workdir, MODEL_FILENAME)} is missing although process 0 has stored the run's tokenizer: "
                        "the run directory is not shared between the processes")
    log.info("using the tokenizer process 0 stored in %s", own)
    return load_tokenizer(own)


def _weights(config_weights: Any, train: dict[str, Any]) -> dict[str, float]:
    """Normalised mixture weights; none configured means proportional to each source's size."""
    weights = as_tuple(config_weights)
    if not weights:
        weights = tuple(s.num_tokens for s in train.values())
    if len(weights) != len(train):
        raise DataError(f"config.data.weights has {len(weights)} entries for {len(train)} sources {list(train)}")
    try:
        weights = tuple(float(w) for w in weights)
    except (TypeError, ValueError) as e:
        raise DataError(f"config.data.weights must be numbers, got {weights!r}") from e
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise DataError(f"config.data.weights must be positive and finite, got {weights}")
    total = sum(weights)
    return {spec: w / total for spec, w in zip(train, weights)}


def build_corpus_dataset(cfg: Any, *, seq_len: int, global_batch: int, seed: int,
                         workdir: str | None = None, process_index: int = 0,
                         barrier: Callable[[str], None] | None = None) -> CorpusDataset:
    """Builds the real-text dataset described by `cfg` (= config.data with kind='corpus').

    With `workdir`, process 0 stores the tokenizer and data.json there; given a `barrier`
    (a multi-process run), the other processes wait for it and read the stored tokenizer.
    """
    if seq_len < 1 or global_batch < 1:
        raise ValueError(f"seq_len ({seq_len}) and global_batch ({global_batch}) must be positive")
    if cfg.encoding_errors not in ("strict", "replace", "ignore"):
        raise DataError(f"config.data.encoding_errors must be strict/replace/ignore, got {cfg.encoding_errors!r}")
    root = cache_root(cfg.cache_dir or None)
    specs = as_tuple(cfg.sources)
    if not specs:
        raise DataError("config.data.sources is empty: name a corpus (e.g. 'austen') or files")
    if len(set(specs)) != len(specs):
        raise DataError(f"config.data.sources lists a source twice: {specs}")
    threads = int(cfg.num_threads) or None

    docs = {spec: sources_lib.read_source(spec, root=root, text_field=cfg.text_field,
                                          errors=cfg.encoding_errors) for spec in specs}
    train, heldout = sources_lib.split_heldout(docs, as_tuple(cfg.heldout), float(cfg.heldout_fraction))
    digests = {spec: [text_digest(d.text) for d in ds] for spec, ds in train.items()}
    held_digests = {spec: [text_digest(d.text) for d in ds] for spec, ds in heldout.items()}

    all_train = [d for spec in specs for d in train[spec]]
    tokenizer = _shared_tokenizer(cfg.tokenizer, all_train, [h for spec in specs for h in digests[spec]],
                                  root, workdir, process_index, barrier)
    train_stores = {spec: build_token_store(train[spec], tokenizer, root, digests=digests[spec],
                                            add_bos=cfg.add_bos, num_threads=threads) for spec in specs}
    held_stores = {spec: build_token_store(heldout[spec], tokenizer, root, digests=held_digests[spec],
                                           add_bos=cfg.add_bos, num_threads=threads)
                   for spec in specs if heldout[spec]}
    ds = CorpusDataset(tokenizer, seq_len, global_batch, seed, train_stores, held_stores,
                       _weights(cfg.weights, train_stores),
                       info={"heldout_documents": [d.name for spec in specs for d in heldout[spec]],
                             "cache_dir": str(root)})
    if held_stores and ds.num_validation_windows == 0:
        tokens = sum(s.num_tokens for s in held_stores.values())
        raise DataError(f"the held-out split has {tokens} tokens, fewer than one window of seq_len + 1 = "
                        f"{seq_len + 1}; hold out more text (config.data.heldout) or lower seq_len")
    if not held_stores:
        log.warning("no held-out documents (config.data.heldout=%s): validation_batches yields nothing",
                    cfg.heldout)
    if workdir and process_index == 0:
        ds.save(workdir)
    return ds
