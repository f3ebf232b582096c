"""The architecture spec: what the pruned model looks like, as JSON next to every checkpoint.

The spec is derived from the masks (host side) and carries what a reader needs without the
weights: per-layer kept heads (and how they share KV heads), FFN widths, hidden width, live
and dense parameter counts, progress, the pruned ratio of each group type, every pruning
event (step, tokens, group type, layer, index, normalised saliency of each removed unit), so
the evolution of the architecture can be plotted from the JSON alone, and the run's phases
(phases.py), so a reader can tell which phase a checkpoint is in.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from effllm_jax.model.llama import Masks, ModelConfig
from effllm_jax.pruning import groups
from effllm_jax.pruning import history as history_lib

EVENT_FIELDS = ("step", "tokens", "type", "layer", "index", "saliency")


@dataclasses.dataclass(frozen=True)
class PruneEvent:
    """One unit removed at a pruning event (layer -1 for a hidden channel)."""

    step: int
    tokens: int
    type: str  # the group type that removed it: heads, kv_groups, attn_blocks, ffn, ...
    layer: int
    index: int  # the head, FFN channel or hidden channel within its mask row
    saliency: float  # its group's score / the mean score of the event's removable groups


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One compact layer: query heads grouped by the KV head they read."""

    q_per_kv: tuple[int, ...]  # live query heads of each live KV head, in KV order
    ffn_dim: int

    @property
    def num_heads(self) -> int:
        return sum(self.q_per_kv)

    @property
    def num_kv_heads(self) -> int:
        return len(self.q_per_kv)

    @property
    def kv_index(self) -> tuple[int, ...]:
        """For each kept query head, the position of its KV head among the kept KV heads."""
        return tuple(k for k, n in enumerate(self.q_per_kv) for _ in range(n))


@dataclasses.dataclass(frozen=True)
class PhaseSpan:
    """One phase of a run ('pruning' | 'continued') and its 1-based, inclusive step range."""

    name: str
    first_step: int
    last_step: int


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """Architecture of a (possibly pruned) model plus the run's progress when it was taken."""

    model: dict[str, Any]  # ModelConfig fields of the source
    hidden_dim: int
    layers: tuple[LayerSpec, ...]
    live_params: int
    dense_params: int
    step: int = 0
    tokens_seen: int = 0
    events: tuple[PruneEvent, ...] = ()  # every unit removed so far, in event order
    phases: tuple[PhaseSpan, ...] = ()  # the run's phases; empty when not from a run
    # In-training compaction (compaction.py): the executed shapes and, per executed unit, the
    # source unit it holds (Compaction.to_json); None while the run executes the source shapes.
    executed: dict | None = None

    @classmethod
    def from_masks(cls, masks: Masks, cfg: ModelConfig, step: int = 0,
                   tokens_seen: int = 0, history: dict | None = None,
                   phases: tuple[PhaseSpan, ...] = ()) -> "ArchSpec":
        """Reads a (host or device) set of masks (and the state's pruning history) into a spec."""
        tokens_per_step = tokens_seen / step if step else 0
        events = tuple(PruneEvent(s, int(round(s * tokens_per_step)), kind, layer, index, score)
                       for s, kind, layer, index, score in
                       (history_lib.rows(history) if history is not None else ()))
        masks = {k: np.asarray(v, bool) for k, v in masks.items()}
        heads = masks["heads"].reshape(cfg.num_layers, cfg.num_kv_heads, cfg.group_size)
        layers = tuple(
            LayerSpec(q_per_kv=tuple(int(n) for n in heads[l].sum(-1) if n > 0),
                      ffn_dim=int(masks["ffn"][l].sum()))
            for l in range(cfg.num_layers))
        return cls(model=dataclasses.asdict(cfg), hidden_dim=int(masks["hidden"].sum()),
                   layers=layers, live_params=int(round(float(groups.count_params(masks, cfg)))),
                   dense_params=groups.dense_params(cfg), step=int(step),
                   tokens_seen=int(tokens_seen), events=events, phases=tuple(phases))

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig(**self.model)

    @property
    def phase(self) -> str:
        """The phase `step` belongs to ('' when the spec records no phases)."""
        current = [p.name for p in self.phases if p.first_step <= max(self.step, 1)]
        return current[-1] if current else ""

    @property
    def total_steps(self) -> int:
        """The run's planned length: the last step of its last phase (0 when unknown)."""
        return self.phases[-1].last_step if self.phases else 0

    @property
    def uniform(self) -> bool:
        """True when every layer has the same widths and even GQA groups (a stock Llama)."""
        first = self.layers[0]
        return all(l == first for l in self.layers) and len(set(first.q_per_kv)) <= 1

    def pruned_ratio(self) -> dict[str, float]:
        """Fraction of each group type removed so far."""
        cfg = self.model_config
        kept_heads = sum(l.num_heads for l in self.layers)
        kept_ffn = sum(l.ffn_dim for l in self.layers)
        return {
            "heads": 1.0 - kept_heads / (cfg.num_layers * cfg.num_heads),
            "ffn": 1.0 - kept_ffn / (cfg.num_layers * cfg.ffn_dim),
            "hidden": 1.0 - self.hidden_dim / cfg.d_model,
            "params": 1.0 - self.live_params / self.dense_params,
        }

    def summary(self) -> str:
        """A human-readable table of the architecture."""
        r = self.pruned_ratio()
        lines = [f"hidden {self.hidden_dim}/{self.model['d_model']}   live params "
                 f"{self.live_params:,} / {self.dense_params:,} ({1 - r['params']:.1%})",
                 "layer  heads(q per kv)          ffn"]
        for i, l in enumerate(self.layers):
            lines.append(f"{i:5d}  {l.num_heads:3d} {str(list(l.q_per_kv)):20s} {l.ffn_dim:6d}")
        lines.append(f"pruned: heads {r['heads']:.1%}, ffn {r['ffn']:.1%}, hidden {r['hidden']:.1%}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        """JSON-ready dict (round-trips through `from_json`)."""
        out = dataclasses.asdict(self)
        out["layers"] = [{"q_per_kv": list(l.q_per_kv), "ffn_dim": l.ffn_dim} for l in self.layers]
        out["pruned_ratio"] = self.pruned_ratio()
        # Columns (one list per field) keep a long history compact.
        out["events"] = {f: [getattr(e, f) for e in self.events] for f in EVENT_FIELDS}
        out["phase"] = self.phase
        return out

    def shape_key(self) -> str:
        """A string naming the architecture alone (not the run's progress): a cache key."""
        return json.dumps(dataclasses.replace(self, step=0, tokens_seen=0, events=(),
                                              phases=(), executed=None).to_json(),
                          sort_keys=True)

    @classmethod
    def from_json(cls, data: dict | str) -> "ArchSpec":
        """Parses a spec written by `to_json`, naming the first problem it finds."""
        if isinstance(data, str):
            data = json.loads(data)
        try:
            layers = tuple(LayerSpec(tuple(int(n) for n in l["q_per_kv"]), int(l["ffn_dim"]))
                           for l in data["layers"])
            spec = cls(model=dict(data["model"]), hidden_dim=int(data["hidden_dim"]),
                       layers=layers, live_params=int(data["live_params"]),
                       dense_params=int(data["dense_params"]), step=int(data.get("step", 0)),
                       tokens_seen=int(data.get("tokens_seen", 0)),
                       events=_events_from_json(data.get("events")),
                       phases=tuple(PhaseSpan(str(p["name"]), int(p["first_step"]),
                                              int(p["last_step"]))
                                    for p in data.get("phases", ())),
                       executed=data.get("executed") or None)
            cfg = spec.model_config
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed architecture spec: {e!r}") from e
        if len(layers) != cfg.num_layers:
            raise ValueError(f"architecture spec lists {len(layers)} layers; the model has "
                             f"{cfg.num_layers}")
        return spec


def _events_from_json(columns: dict | None) -> tuple[PruneEvent, ...]:
    """Events from their JSON columns (specs written before events existed have none)."""
    if not columns:
        return ()
    kinds = (int, int, str, int, int, float)
    return tuple(PruneEvent(*(k(v) for k, v in zip(kinds, row)))
                 for row in zip(*(columns[f] for f in EVENT_FIELDS)))
