"""When pruning happens and how many parameters may live at each step.

Warm-up (dense) for `warmup_steps`, then the live-parameter budget falls linearly from the
dense count to `target_params` over `prune_steps`, with one pruning event every `every`
steps (the last pruning step is always an event), then training continues at the fixed
architecture. Steps are 1-based: step s is the s-th completed update. Works on Python ints
(host) and jax scalars (inside the step) alike.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class PruneSchedule:
    """The linear budget schedule of a pruning-aware pretraining run."""

    dense_params: int
    target_params: int
    warmup_steps: int
    prune_steps: int
    every: int

    @property
    def last_event(self) -> int:
        return self.warmup_steps + self.prune_steps

    def budget(self, step: Any) -> Any:
        """Live parameters allowed after step `step`."""
        frac = jnp.clip((step - self.warmup_steps) / self.prune_steps, 0.0, 1.0)
        return self.dense_params - (self.dense_params - self.target_params) * frac

    def is_event(self, step: Any) -> Any:
        """Whether step `step` ends with a pruning event."""
        since = step - self.warmup_steps
        return (since > 0) & (since <= self.prune_steps) & (
            (since % self.every == 0) | (since == self.prune_steps))

    def collecting(self, step: Any) -> Any:
        """Whether step `step` contributes saliency (inside the pruning window)."""
        return (step > self.warmup_steps) & (step <= self.last_event)

    def event_steps(self) -> list[int]:
        """All event steps (host helper for logs and tests)."""
        return [s for s in range(self.warmup_steps + 1, self.last_event + 1) if self.is_event(s)]
