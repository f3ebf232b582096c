"""Synthetic token data for tests of the trainer: no download, no tokenizer."""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np


@dataclasses.dataclass
class SyntheticDataset:
    """Random tokens with a learnable pattern (each token predicts the next): for tests only."""

    vocab_size: int
    seq_len: int
    global_batch: int
    seed: int
    tokenizer: object = None

    def _global_batch(self, seed: Any, step: int) -> np.ndarray:
        rng = np.random.default_rng([seed, step])
        start = rng.integers(0, self.vocab_size, size=(self.global_batch, 1))
        stride = rng.integers(1, 4, size=(self.global_batch, 1))
        return (start + stride * np.arange(self.seq_len + 1)) % self.vocab_size

    def local_batch(self, step: int, process_index: int = 0, process_count: int = 1) -> np.ndarray:
        """int32 [global_batch // process_count, seq_len + 1] of step `step`."""
        rows = self.global_batch // process_count
        batch = self._global_batch(self.seed, step)
        return batch[process_index * rows:(process_index + 1) * rows].astype(np.int32)

    def validation_batches(self, num_batches: int | None = None, *, batch_size: int | None = None,
                           process_index: int = 0, process_count: int = 1) -> Iterator[np.ndarray]:
        """Batches from a held-out random stream (another seed); 8 batches if unspecified."""
        if batch_size not in (None, self.global_batch):
            raise ValueError("synthetic validation batches have global_batch rows")
        rows = self.global_batch // process_count
        for b in range(8 if num_batches is None else num_batches):
            batch = self._global_batch(2 ** 32 + self.seed, b)  # a seed no training step uses
            yield batch[process_index * rows:(process_index + 1) * rows].astype(np.int32)

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary."""
        return {"kind": "synthetic", "vocab_size": self.vocab_size, "seq_len": self.seq_len,
                "global_batch": self.global_batch, "seed": self.seed}

    def save(self, workdir: str) -> None:
        """Nothing to store: synthetic data has no tokenizer."""
