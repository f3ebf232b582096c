"""The pruning history: for every unit, the step it was removed at and why, kept in the train
state as mask-sized arrays (no host sync at events) and read into the spec on the host.

Per unit of each mask (heads [L, H], ffn [L, F], hidden [D]):
  step   the step whose event removed it; -1 while it lives
  type   the group type that removed it (an index into select.GROUP_TYPES)
  score  its group's normalised saliency then (its score / the mean removable score)
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from effllm_jax.model.llama import ModelConfig
from effllm_jax.pruning.select import GROUP_TYPES, UNITS


def empty(cfg: ModelConfig) -> dict:
    """A history in which every unit is alive."""
    shapes = {"heads": (cfg.num_layers, cfg.num_heads), "ffn": (cfg.num_layers, cfg.ffn_dim),
              "hidden": (cfg.d_model,)}
    return {u: {"step": jnp.full(s, -1, jnp.int32), "type": jnp.full(s, -1, jnp.int32),
                "score": jnp.zeros(s, jnp.float32)} for u, s in shapes.items()}


def record(history: dict, removed: dict, step: Any) -> dict:
    """Writes one event's removals (select.select_with_record's record) at `step`."""
    out = {}
    for u in UNITS:
        how, score = removed[u]
        now = how >= 0
        h = history[u]
        out[u] = {"step": jnp.where(now, step, h["step"]).astype(jnp.int32),
                  "type": jnp.where(now, how, h["type"]).astype(jnp.int32),
                  "score": jnp.where(now, score, h["score"])}
    return out


def rows(history: dict) -> list[tuple[int, str, int, int, float]]:
    """Host side: (step, group type, layer (-1 for hidden), index, score) of every removed
    unit, ordered by step, then type, layer and index."""
    out = []
    for u in UNITS:
        h = {k: np.asarray(v) for k, v in history[u].items()}
        step = h["step"].reshape(-1, h["step"].shape[-1])
        for layer, index in zip(*np.nonzero(step >= 0)):
            at = (layer, index) if h["step"].ndim == 2 else (index,)
            out.append((int(h["step"][at]), GROUP_TYPES[int(h["type"][at])],
                        int(layer) if h["step"].ndim == 2 else -1, int(index),
                        float(h["score"][at])))
    return sorted(out, key=lambda r: (r[0], GROUP_TYPES.index(r[1]), r[2], r[3]))
