"""The grain pipeline: packed windows, shuffled by seed, mixed by weight, sliced per process.

Each source's training documents form one token stream (`[BOS] doc EOS` after each other, see
`store`). Window i of a stream is `stream[i*L : i*L + L + 1]` (L = seq_len): inputs are
`[:-1]`, targets `[1:]`, and consecutive windows share one token so no target is lost. The
windows of a source are globally shuffled with grain's index shuffle, a fresh permutation per
epoch (grain reseeds with seed + epoch), then the sources are interleaved in proportion to their
weights. All of this is random access: global row r of step k is element k * global_batch + r,
so a batch is a pure function of (seed, k) and a resumed run just asks for step k again.
Process p of P reads rows [p * B/P, (p + 1) * B/P) of that global batch and nothing else.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import grain
import numpy as np

from effllm_jax import paths
from effllm_jax.data.fetch import DataError
from effllm_jax.data.store import TokenStore
from effllm_jax.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class PackedWindows:
    """A grain random-access source: window i = tokens[i*L : i*L + L + 1] as int32."""

    def __init__(self, store: TokenStore, seq_len: int):
        self._store, self._seq_len = store, seq_len
        self._len = (store.num_tokens - 1) // seq_len

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < self._len:
            raise IndexError(f"window {index} out of range [0, {self._len})")
        start = index * self._seq_len
        return np.asarray(self._store.tokens[start:start + self._seq_len + 1], dtype=np.int32)

    def __repr__(self) -> str:  # grain includes this in its dataset descriptions
        return f"PackedWindows({self._store.path.name}, seq_len={self._seq_len}, len={self._len})"


class ProcessRows(grain.MapDataset):
    """Process p's share of a global row stream: element j is global row (j // R) * B + p * R + j % R."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int, process_count: int):
        super().__init__(parent)
        self._global_batch = global_batch
        self._rows = global_batch // process_count
        self._offset = process_index * self._rows
        self._length = len(parent) // global_batch * self._rows

    def __len__(self) -> int:
        return self._length

    def _global_index(self, index: int) -> int:
        step, row = divmod(index, self._rows)
        return step * self._global_batch + self._offset + row

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._global_index(index)]

    def _getitems(self, indices: Sequence[int]):
        return self._parent._getitems([self._global_index(i) for i in indices])  # pylint: disable=protected-access

    def __str__(self) -> str:
        return f"ProcessRows(offset={self._offset}, rows={self._rows}, global_batch={self._global_batch})"


def _source_seed(seed: int, name: str) -> int:
    """A 32-bit shuffle seed per (run seed, source): sources never share a permutation."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{name}".encode()).digest()[:4], "big")


@dataclasses.dataclass
class CorpusDataset:
    """Packed, shuffled, mixed windows of real text with a tokenizer and a held-out split."""

    tokenizer: Tokenizer
    seq_len: int
    global_batch: int
    seed: int
    train: dict[str, TokenStore]  # source spec -> training stream
    heldout: dict[str, TokenStore]  # source spec -> held-out stream (may be empty)
    weights: dict[str, float]  # source spec -> mixture weight (normalised)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for spec, store in self.train.items():
            if (store.num_tokens - 1) // self.seq_len < 1:
                raise DataError(
                    f"source {spec!r} has {store.num_tokens} training tokens, fewer than one window of "
                    f"seq_len + 1 = {self.seq_len + 1} tokens; lower seq_len or add text")
        streams = []
        for spec, store in self.train.items():
            windows = grain.MapDataset.source(PackedWindows(store, self.seq_len))
            streams.append(windows.shuffle(seed=_source_seed(self.seed, spec)).repeat())
        self._rows = streams[0] if len(streams) == 1 else grain.MapDataset.mix(
            streams, [self.weights[s] for s in self.train])
        self._per_process: dict[tuple[int, int], grain.MapDataset] = {}
        self._val_windows = [(store, (store.num_tokens - 1) // self.seq_len) for store in self.heldout.values()]

    # -- training batches -----------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def windows_per_epoch(self) -> dict[str, int]:
        """Training windows per source; a source's epoch ends after that many of its rows."""
        return {spec: (s.num_tokens - 1) // self.seq_len for spec, s in self.train.items()}

    def _process_dataset(self, process_index: int, process_count: int) -> grain.MapDataset:
        if process_count < 1 or self.global_batch % process_count:
            raise ValueError(f"global_batch={self.global_batch} is not divisible by process_count={process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        key = (process_index, process_count)
        if key not in self._per_process:
            rows = ProcessRows(self._rows, self.global_batch, process_index, process_count)
            self._per_process[key] = rows.batch(self.global_batch // process_count, drop_remainder=True)
        return self._per_process[key]

    def local_batch(self, step: int, process_index: int = 0, process_count: int = 1) -> np.ndarray:
        """int32 [global_batch // process_count, seq_len + 1]: this process's rows of step `step`."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return self._process_dataset(process_index, process_count)[step]

    def batches(self, start_step: int = 0, process_index: int = 0, process_count: int = 1,
                num_threads: int = 2, prefetch: int = 8) -> Iterator[np.ndarray]:
        """local_batch(start_step), local_batch(start_step + 1), ... prefetched on threads."""
        ds = self._process_dataset(process_index, process_count)[start_step:]
        return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)))

    # -- held-out data --------------------------------------------------------------------
    @property
    def num_validation_windows(self) -> int:
        return sum(n for _, n in self._val_windows)

    def _validation_window(self, index: int) -> np.ndarray:
        for store, n in self._val_windows:
            if index < n:
                start = index * self.seq_len
                return np.asarray(store.tokens[start:start + self.seq_len + 1], dtype=np.int32)
            index -= n
        raise IndexError(index)

    def validation_batches(self, num_batches: int | None = None, *, batch_size: int | None = None,
                           process_index: int = 0, process_count: int = 1) -> Iterator[np.ndarray]:
        """Held-out windows in a fixed order, as int32 [batch_size // process_count, seq_len + 1].

        Yields the first `num_batches` full batches (all of them if None, fewer if the held-out
        split is smaller); the same windows on every call, so eval losses are comparable.
        """
        batch_size = batch_size or self.global_batch
        if batch_size % process_count or not 0 <= process_index < process_count:
            raise ValueError(f"batch_size={batch_size} / process {process_index} of {process_count} is invalid")
        available = self.num_validation_windows // batch_size
        if available == 0:
            log.warning("no validation batch: %d held-out windows < batch_size %d",
                        self.num_validation_windows, batch_size)
        count = available if num_batches is None else min(num_batches, available)
        rows = batch_size // process_count
        for b in range(count):
            first = b * batch_size + process_index * rows
            yield np.stack([self._validation_window(first + r) for r in range(rows)])

    # -- self-description -------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """A JSON-able summary: sources, documents, tokens, weights, cache hits, tokenizer."""
        return {
            "kind": "corpus", "seq_len": self.seq_len, "global_batch": self.global_batch, "seed": self.seed,
            "tokenizer": {"sha256": self.tokenizer.sha256, "vocab_size": self.vocab_size,
                          "eos_id": self.tokenizer.eos_id, "bos_id": self.tokenizer.bos_id,
                          "source": self.tokenizer.source},
            "sources": {spec: {"weight": self.weights[spec], "train_docs": s.num_docs, "train_tokens": s.num_tokens,
                               "windows_per_epoch": (s.num_tokens - 1) // self.seq_len,
                               "store": s.path.name, "store_built": s.built,
                               "heldout_docs": self.heldout[spec].num_docs if spec in self.heldout else 0,
                               "heldout_tokens": self.heldout[spec].num_tokens if spec in self.heldout else 0}
                        for spec, s in self.train.items()},
            "validation_windows": self.num_validation_windows,
            **self.info,
        }

    def save(self, workdir: str | Path) -> None:
        """Stores the tokenizer and a JSON description of the data in the run directory."""
        self.tokenizer.save(workdir)
        paths.write_text(paths.join(workdir, "data.json"), json.dumps(self.describe(), indent=1, default=str))

