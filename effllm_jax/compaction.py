"""In-training physical compaction: once enough of the source is pruned, train a smaller model.

Masks keep shapes static, so a masked run pays for the whole source until the end. At a pruning
event whose budget falls to one of `prune.compact_at` (fractions of the source's parameters),
and after the last event with `prune.compact_after_last_event`, the train state is sliced down
to the kept units and the step is compiled once more for the smaller shapes:

  * The compacted model is again a *uniform* Llama (`ModelConfig` with smaller d_model, heads,
    KV heads and FFN width), so layers still scan and shard, and the step, saliency, selection,
    compensation and history code run on it unchanged. Per-layer widths differ, so heads (KV
    heads, and query heads per KV group) and FFN channels are padded to the widest layer, the
    hidden width to `prune.round_to`, and each padded width up to a multiple of the mesh axes it
    is sharded on (capped at the width it had). Padding units are simply dead in the masks, so
    the compacted step computes what the masked step computes.
  * Sliced: params and every params-shaped optimizer leaf (Adam's mu and nu), masks. Rebuilt
    empty at the new shapes: saliency, compensation statistics and history, which are empty
    anyway right after an event (the event resets them; compaction only happens there). The
    distillation teacher is the source and stays as it is.
  * `Compaction` records the executed shapes and, per executed unit, the source unit it holds
    (-1 for padding). The spec (arch.py) keeps speaking in source units: masks and history are
    mapped back, and the record travels in its `executed` field, so a restore builds the state
    at the executed shapes, and `expand` turns compacted params back into the source layout for
    export and evaluation (checkpoint.load_inference).

Public API: `compact_state(state, step_cfg, tx, mesh, rules, ...) -> (state, step_cfg, record)`
(used by the loop's `Compactor` and by benchmarks), `executed_step_config`, `expand`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from effllm_jax.arch import ArchSpec
from effllm_jax.model import llama
from effllm_jax.model.llama import ModelConfig
from effllm_jax.pruning import groups, history as history_lib, saliency

# The logical axes a unit map acts on, and the mask (or history) entry of each unit type.
UNIT_AXES = {"hidden": "embed", "heads": "heads", "kv_heads": "kv_heads", "ffn": "mlp"}
MASK_AXES = {"hidden": ("embed",), "heads": ("layers", "heads"), "ffn": ("layers", "mlp")}


@dataclasses.dataclass(frozen=True)
class Compaction:
    """Executed shapes of a compacted run and the source unit behind every executed unit."""

    hidden: tuple[int, ...]  # [D'] source hidden channel, or -1 for padding
    heads: tuple[tuple[int, ...], ...]  # [L, H'] source query head per executed head slot
    kv_heads: tuple[tuple[int, ...], ...]  # [L, K'] source KV head per executed KV slot
    ffn: tuple[tuple[int, ...], ...]  # [L, F'] source FFN channel per executed channel
    step: int  # the event step after which the state was compacted
    live_fraction: float  # the schedule's budget / dense parameters at that step

    def maps(self) -> dict[str, np.ndarray]:
        """The unit maps as int arrays, keyed by logical axis name."""
        return {axis: np.asarray(getattr(self, unit), np.int64)
                for unit, axis in UNIT_AXES.items()}

    def executed_config(self, source: ModelConfig) -> ModelConfig:
        """The uniform model config the compacted step runs."""
        return dataclasses.replace(source, d_model=len(self.hidden), num_heads=len(self.heads[0]),
                                   num_kv_heads=len(self.kv_heads[0]), ffn_dim=len(self.ffn[0]))

    def to_json(self) -> dict:
        return {"hidden": list(self.hidden), "heads": [list(r) for r in self.heads],
                "kv_heads": [list(r) for r in self.kv_heads], "ffn": [list(r) for r in self.ffn],
                "step": self.step, "live_fraction": self.live_fraction}

    @classmethod
    def from_json(cls, data: dict | None) -> "Compaction | None":
        if not data:
            return None
        rows = lambda k: tuple(tuple(int(i) for i in r) for r in data[k])
        return cls(tuple(int(i) for i in data["hidden"]), rows("heads"), rows("kv_heads"),
                   rows("ffn"), int(data["step"]), float(data["live_fraction"]))


# ---------------------------------------------------------------------------- config

def validate_config(prune: Any, target_fraction: float) -> None:
    """Raises ValueError naming an illegal `prune.compact_at` / `compact_after_last_event`."""
    at = prune.get("compact_at", ())
    if isinstance(at, (int, float)) or not all(
            isinstance(f, (int, float)) and not isinstance(f, bool) for f in at):
        raise ValueError(f"prune.compact_at={at!r} must be a tuple of numbers, e.g. (0.75, 0.5)")
    for f in at:
        if not 0 < f < 1:
            raise ValueError(f"prune.compact_at={tuple(at)}: {f} is not a fraction in (0, 1)")
        if f < target_fraction:
            raise ValueError(f"prune.compact_at={tuple(at)}: {f} lies below the target "
                             f"fraction {target_fraction:.3g}, so it would never be reached")
    if not isinstance(prune.get("compact_after_last_event", False), bool):
        raise ValueError("prune.compact_after_last_event must be True or False")


# ---------------------------------------------------------------------------- planning (host)

def _round_up(n: int, multiple: int, cap: int) -> int:
    """n rounded up to a multiple, at least 1, never above `cap` (the width it had)."""
    return min(max(1, -(-n // multiple) * multiple), cap)


def _mesh_multiple(axis: str, mesh, rules) -> int:
    """How many shards the mesh cuts a dimension of logical `axis` into."""
    target = dict(rules).get(axis)
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    return math.prod(mesh.shape[a] for a in targets) if mesh is not None else 1


def _pad(rows: list[list[int]], width: int) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(r) + (-1,) * (width - len(r)) for r in rows)


def plan(masks: dict, cfg: ModelConfig, round_to: int = 1, mesh=None,
         rules=()) -> dict[str, Any]:
    """Local unit maps (executed index -> index in `cfg`'s layout, -1 padding) that keep every
    live unit of `masks` in order, padded as the module docstring says."""
    masks = {k: np.asarray(v, bool) for k, v in masks.items()}
    mult = lambda axis, extra=1: math.lcm(extra, _mesh_multiple(axis, mesh, rules))
    kept = np.flatnonzero(masks["hidden"]).tolist()
    hidden = _pad([kept], _round_up(len(kept), mult("embed", round_to), cfg.d_model))[0]
    g = cfg.group_size
    heads = masks["heads"].reshape(cfg.num_layers, cfg.num_kv_heads, g)
    kv_rows = [[k for k in range(cfg.num_kv_heads) if heads[l, k].any()]
               for l in range(cfg.num_layers)]
    kv_width = _round_up(max(len(r) for r in kv_rows), mult("kv_heads"), cfg.num_kv_heads)
    group = max([int(heads[l, k].sum()) for l, r in enumerate(kv_rows) for k in r] + [1])
    heads_mult = mult("heads")
    while (kv_width * group) % heads_mult and group < g:  # sharded heads: whole shards
        group += 1
    head_rows = []
    for l, row in enumerate(kv_rows):
        slots = [-1] * (kv_width * group)
        for slot, k in enumerate(row):
            for j, q in enumerate(np.flatnonzero(heads[l, k])):
                slots[slot * group + j] = k * g + int(q)
        head_rows.append(slots)
    ffn_rows = [np.flatnonzero(r).tolist() for r in masks["ffn"]]
    ffn_width = _round_up(max(len(r) for r in ffn_rows), mult("mlp", round_to), cfg.ffn_dim)
    return {"embed": np.asarray(hidden), "heads": np.asarray(head_rows),
            "kv_heads": np.asarray(_pad(kv_rows, kv_width)), "mlp": np.asarray(_pad(ffn_rows, ffn_width))}


def _compose(outer: np.ndarray | None, inner: np.ndarray) -> np.ndarray:
    """Source indices of a map `inner` into a space that `outer` maps to the source."""
    if outer is None:
        return inner
    safe = np.maximum(inner, 0)
    picked = outer[safe] if inner.ndim == 1 else np.take_along_axis(outer, safe, axis=1)
    return np.where(inner >= 0, picked, -1)


# ---------------------------------------------------------------------------- slicing (device)

def _take(x: jax.Array, axes: tuple, maps: dict[str, np.ndarray]) -> jax.Array:
    """Gathers the executed units of every mapped axis of x (zeros where the map is -1)."""
    for dim, name in enumerate(axes):
        if name not in maps:
            continue
        idx = maps[name]
        shape = [1] * x.ndim
        if idx.ndim == 1:
            shape[dim] = idx.shape[0]
            x = jnp.take(x, np.maximum(idx, 0), axis=dim)
        else:  # per layer: dimension 0 holds the layers
            shape[0], shape[dim] = idx.shape
            full = list(x.shape)
            full[dim] = idx.shape[1]
            x = jnp.take_along_axis(x, np.broadcast_to(np.maximum(idx, 0).reshape(shape), full),
                                    axis=dim)
        x = jnp.where((idx >= 0).reshape(shape), x, jnp.zeros((), x.dtype))
    return x


def _put(x: np.ndarray, axes: tuple, maps: dict[str, np.ndarray], sizes: dict[str, int],
         fill: Any = 0) -> np.ndarray:
    """The inverse of `_take` on the host: x's units scattered to their source positions."""
    x = np.asarray(x)
    for dim, name in enumerate(axes):
        if name not in maps:
            continue
        idx = maps[name]
        out = np.full(x.shape[:dim] + (sizes[name],) + x.shape[dim + 1:], fill, x.dtype)
        if idx.ndim == 1:
            np.moveaxis(out, dim, 0)[idx[idx >= 0]] = np.moveaxis(x, dim, 0)[idx >= 0]
        else:
            for l, row in enumerate(idx):
                np.moveaxis(out[l], dim - 1, 0)[row[row >= 0]] = \
                    np.moveaxis(x[l], dim - 1, 0)[row >= 0]
        x = out
    return x


def executed_step_config(step_cfg, record: Compaction, source: ModelConfig):
    """The StepConfig of the compacted step (schedule, selection and criterion unchanged)."""
    kd = step_cfg.distill
    if kd is not None and kd.snapshot_step:  # the source copy is taken before any compaction
        kd = dataclasses.replace(kd, snapshot_step=0)
    return dataclasses.replace(step_cfg, model=record.executed_config(source), distill=kd)


def compact_state(state, step_cfg, tx: optax.GradientTransformation, mesh, rules,
                  round_to: int = 1, previous: Compaction | None = None,
                  source: ModelConfig | None = None, live_fraction: float = 0.0):
    """Slices a train state (right after a pruning event) to its live units.

    `step_cfg` is the step the state belongs to (source or already compacted, then `previous`
    is its record and `source` the source config). Returns (state placed on the new
    shardings, the compacted StepConfig, the record mapping executed units to source units).
    """
    from effllm_jax import train_step as ts  # late: train_step imports the whole step
    cfg = step_cfg.model
    source = cfg if source is None else source
    local = plan(jax.device_get(state.masks), cfg, round_to, mesh, rules)
    prev = previous.maps() if previous is not None else {}
    composed = {k: _compose(prev.get(k), v) for k, v in local.items()}
    record = Compaction(hidden=tuple(composed["embed"].tolist()),
                        heads=tuple(map(tuple, composed["heads"].tolist())),
                        kv_heads=tuple(map(tuple, composed["kv_heads"].tolist())),
                        ffn=tuple(map(tuple, composed["mlp"].tolist())),
                        step=int(jax.device_get(state.step)), live_fraction=float(live_fraction))
    new_cfg = executed_step_config(step_cfg, record, source)
    new_sh = ts.state_shardings(new_cfg, tx, mesh, rules)
    takers = jax.tree.map(lambda axes: functools.partial(_take, axes=axes, maps=local),
                          llama.param_axes(cfg), is_leaf=lambda a: isinstance(a, tuple))
    model = new_cfg.model

    def slice_state(state):
        params = jax.tree.map(lambda take, x: take(x), takers, state.params)
        opt_state = optax.tree_map_params(tx, lambda x, take: take(x), state.opt_state, takers,
                                          transform_non_params=lambda x: x)
        masks = {k: _take(v, MASK_AXES[k], local) for k, v in state.masks.items()}
        return state.replace(params=params, opt_state=opt_state, masks=masks,
                             saliency=saliency.zeros(model, step_cfg.criterion),
                             history=history_lib.empty(model), stats=new_cfg.zero_stats())

    new_state = jax.jit(slice_state, out_shardings=new_sh)(state)
    return new_state, new_cfg, record


# ---------------------------------------------------------------------------- back to the source

def _source_sizes(source: ModelConfig) -> dict[str, int]:
    return {"embed": source.d_model, "heads": source.num_heads,
            "kv_heads": source.num_kv_heads, "mlp": source.ffn_dim}


def source_masks(masks: dict, record: Compaction, source: ModelConfig) -> dict:
    """Executed masks in the source layout (host numpy bool)."""
    maps, sizes = record.maps(), _source_sizes(source)
    return {k: _put(np.asarray(v, bool), MASK_AXES[k], maps, sizes, False)
            for k, v in masks.items()}


def source_history(history: dict, record: Compaction, source: ModelConfig) -> dict:
    """The executed state's history (removals since the compaction) in the source layout."""
    maps, sizes = record.maps(), _source_sizes(source)
    fills = {"step": -1, "type": -1, "score": 0.0}
    return {u: {k: _put(np.asarray(v), MASK_AXES[u], maps, sizes, fills[k]) for k, v in h.items()}
            for u, h in history.items()}


def expand(params: dict, masks: dict, record: Compaction | None, source: ModelConfig,
           ) -> tuple[dict, dict]:
    """Compacted (params, masks) placed back into the source layout (host numpy): the masked
    source model that computes exactly what the compacted one computes."""
    if record is None:
        return params, masks
    maps, sizes = record.maps(), _source_sizes(source)
    axes = llama.param_axes(source)
    params = jax.tree.map(lambda a, x: _put(np.asarray(x), a, maps, sizes), axes, params,
                          is_leaf=lambda a: isinstance(a, tuple))
    return params, source_masks(masks, record, source)


def executed_params(record: Compaction | None, source: ModelConfig) -> int:
    """Parameters one step executes (the dense count of the executed shapes)."""
    return groups.dense_params(source if record is None else record.executed_config(source))


# ---------------------------------------------------------------------------- the loop's side

class Compactor:
    """When the training loop compacts, and the run's spec in source units throughout."""

    def __init__(self, prune: Any, source: ModelConfig, schedule, record: Compaction | None = None,
                 events_before: tuple = ()):
        self.thresholds = tuple(sorted((float(f) for f in prune.get("compact_at", ())),
                                       reverse=True))
        self.after_last_event = bool(prune.get("compact_after_last_event", False))
        self.round_to = int(prune.get("round_to", 1))
        self.source, self.schedule = source, schedule
        self.record, self.events_before = record, tuple(events_before)

    @classmethod
    def from_spec(cls, prune: Any, source: ModelConfig, schedule, spec: ArchSpec | None):
        """The compactor of a run resumed from a checkpoint with `spec` (None: a fresh run)."""
        record = Compaction.from_json(spec.executed) if spec is not None else None
        before = tuple(e for e in spec.events if e.step <= record.step) if record else ()
        return cls(prune, source, schedule, record, before)

    def due(self, step: int) -> bool:
        """Whether the state after `step` is compacted (host side, from the schedule alone)."""
        if not bool(self.schedule.is_event(step)):
            return False
        if self.after_last_event and step == self.schedule.last_event:
            return True
        fraction = self._fraction(step)
        last = self.record.live_fraction if self.record is not None else 1.0
        return any(fraction <= f < last for f in self.thresholds)

    def _fraction(self, step: int) -> float:
        return float(self.schedule.budget(step)) / self.schedule.dense_params

    def compact(self, state, step_cfg, tx, mesh, rules, tokens_seen: int):
        """Compacts `state` after its event step; returns (state, compacted StepConfig)."""
        step = int(jax.device_get(state.step))
        # Every removal so far, in source units: the sliced state's history starts empty.
        self.events_before = self.arch_spec(state, step, tokens_seen, ()).events
        state, step_cfg, self.record = compact_state(
            state, step_cfg, tx, mesh, rules, self.round_to, self.record, self.source,
            self._fraction(step))
        return state, step_cfg

    def arch_spec(self, state, step: int, tokens_seen: int, phases: tuple) -> ArchSpec:
        """The spec of the state, in source units, carrying the executed shapes."""
        masks, history = jax.device_get(state.masks), jax.device_get(state.history)
        if self.record is None:
            return ArchSpec.from_masks(masks, self.source, step, tokens_seen, history, phases)
        spec = ArchSpec.from_masks(source_masks(masks, self.record, self.source), self.source,
                                   step, tokens_seen,
                                   source_history(history, self.record, self.source), phases)
        return dataclasses.replace(spec, events=self.events_before + spec.events,
                                   executed=self.record.to_json())

    def executed_params(self) -> int:
        return executed_params(self.record, self.source)


def shape_summary(cfg: ModelConfig) -> dict[str, int]:
    """The widths a compaction changes, for a log line."""
    return {"d_model": cfg.d_model, "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads,
            "ffn": cfg.ffn_dim}
