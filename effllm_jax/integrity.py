"""The numbers of a run stay sound: bad steps are skipped and counted, and a non-finite or
silently altered state is never written or restored as if good.

- In the step (train_step.py): a step whose loss or gradient norm is not finite leaves the
  state as it was (`keep_if_finite`); `count_bad_steps` keeps, on device, the current run of
  bad steps, the longest run and the total, so the loop needs no extra host sync per step.
- In the loop (train.py): `BadStepGuard.check` reads those counters whenever metrics are read
  anyway; `train.max_bad_steps` bad steps in a row stop the run with `IntegrityError`, after the
  pending checkpoint writes finish, so the last good checkpoint is kept.
- At save and restore (checkpoint.py): `fingerprint` is one pass over the state on device that
  says which leaves are non-finite and gives a checksum per leaf (a wrapping sum of the leaf's
  bit patterns), so a checkpoint is never written from a non-finite state, and a restored one
  whose bytes changed on disk (even into finite values) is told from a good one.
"""
from __future__ import annotations

import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_MAX_BAD_STEPS = 20


class IntegrityError(RuntimeError):
    """The run's numbers went bad (non-finite steps or state); good checkpoints are kept."""


# ------------------------------------------------------------------------ inside the step

def zero_counters() -> dict:
    """Bad-step counters of a fresh state: the current run, the longest run and the total."""
    return {k: jnp.zeros((), jnp.int32) for k in ("in_a_row", "longest", "total")}


def count_bad_steps(counters: dict, bad: jax.Array) -> dict:
    """The counters after one more step (`bad`: its loss or gradient norm was not finite)."""
    in_a_row = jnp.where(bad, counters["in_a_row"] + 1, 0)
    return {"in_a_row": in_a_row, "longest": jnp.maximum(counters["longest"], in_a_row),
            "total": counters["total"] + bad.astype(jnp.int32)}


def keep_if_finite(finite: jax.Array, updated: Any, previous: Any) -> Any:
    """`updated` where `finite`, else `previous` (leaf by leaf; a select, not a branch)."""
    return jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, previous)


# ------------------------------------------------------------------------ in the loop

class BadStepGuard:
    """Stops a run after `max_bad_steps` bad steps in a row, keeping the good checkpoints."""

    def __init__(self, max_bad_steps: int, checkpointer: Any = None):
        self.max_bad_steps = max_bad_steps
        self.checkpointer = checkpointer
        self.reported = 0  # the bad-step total last seen (a resumed run's older ones count once)

    def check(self, step: int, metrics: dict) -> None:
        """Says (one line) when steps were skipped since the last check; raises IntegrityError
        when the run's longest run of bad steps reached the limit."""
        longest, total = (int(jax.device_get(metrics[k]))
                          for k in ("bad_steps_longest", "bad_steps_total"))
        if total > self.reported and jax.process_index() == 0:
            print(f"effllm_jax.train: warning: {total - self.reported} step(s) up to step {step} "
                  f"had a non-finite loss or gradient norm and were skipped ({total} in all)",
                  file=sys.stderr, flush=True)
        self.reported = total
        if longest < self.max_bad_steps:
            return
        kept = ""
        if self.checkpointer is not None:
            self.checkpointer.wait()  # the pending saves are of good states: let them land
            good = self.checkpointer.latest_step()
            kept = (f"; the last good checkpoint is step {good}" if good is not None
                    else "; no checkpoint was written")
        raise IntegrityError(
            f"{longest} training steps in a row had a non-finite loss or gradient norm "
            f"(train.max_bad_steps={self.max_bad_steps}; seen by step {step}); they were "
            f"skipped, but the run is diverging: lower optim.lr or raise optim.warmup_steps "
            f"and resume{kept}")


# ------------------------------------------------------------------------ state checks

def _bits(x: jax.Array) -> jax.Array:
    """The leaf's bit patterns as uint32 words (floats bitcast, so NaN payloads count too)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer):
        width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
        return jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)
    raise TypeError(f"no checksum for dtype {x.dtype}")


@jax.jit
def _fingerprint(tree: Any) -> tuple[list, list]:
    leaves = jax.tree.leaves(tree)
    finite = [jnp.isfinite(x).all() if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.array(True)
              for x in leaves]
    # Position-weighted, so that swapped words change the sum too; uint32 wraps identically
    # on every mesh, so the checksum does not depend on how the leaf is sharded.
    sums = [jnp.sum(_bits(x).ravel() * (jnp.arange(x.size, dtype=jnp.uint32) | 1),
                    dtype=jnp.uint32) for x in leaves]
    return finite, sums


def fingerprint(tree: Any) -> tuple[dict[str, bool], dict[str, int]]:
    """({leaf path: all finite}, {leaf path: checksum}) of an array tree, computed on device."""
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    # The results are replicated scalars: read this process's copy (works on multi-host too).
    finite, sums = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), _fingerprint(tree))
    return ({p: bool(f) for p, f in zip(paths, finite)},
            {p: int(s) for p, s in zip(paths, sums)})


def non_finite(finite: dict[str, bool]) -> list[str]:
    """The leaf paths that hold a NaN or an infinity."""
    return [path for path, ok in finite.items() if not ok]


def describe(leaves: list[str], limit: int = 3) -> str:
    """A short list of leaf paths for a one-line message."""
    more = f" and {len(leaves) - limit} more" if len(leaves) > limit else ""
    return ", ".join(leaves[:limit]) + more

