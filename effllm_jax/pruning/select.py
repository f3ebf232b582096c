"""The pruning event: rank every live group by normalised saliency and remove the least
salient until the live-parameter budget is met. Pure, shape-static, runs inside jit.

Heads, FFN channels and hidden channels compete in one global ranking: each group's
accumulated saliency is divided by the live parameters it owns (reduction 'mean'), so a
score is "saliency per parameter" whatever the group's size. A query head also carries its
share of its KV head (the KV head's saliency and parameters split evenly among the live
query heads reading it), so removing a GQA group's last head accounts for the KV rows too.

With `uniform_layers`, heads and FFN channels are removed as *slices*: the k-th least
salient unit of every layer together, so all layers keep equal widths.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from effllm_jax.model.llama import Masks, ModelConfig
from effllm_jax.pruning import groups

GROUP_TYPES = ("heads", "ffn", "hidden")
REDUCTIONS = ("mean", "sum")


@dataclasses.dataclass(frozen=True)
class SelectConfig:
    """How an event chooses what to remove."""

    reduction: str = "mean"  # 'mean': saliency per live parameter; 'sum': raw group sum
    uniform_layers: bool = False  # heads/FFN removed as per-layer slices (equal widths)
    group_types: tuple[str, ...] = GROUP_TYPES  # which group types may be pruned
    rounds: int = 3  # re-rank with updated sizes; sizes shrink as other groups go
    round_to: int = 1  # keep FFN and hidden widths multiples of this (8, 64, 128 for MXUs)


def group_scores(masks: Masks, saliency: dict, cfg: ModelConfig, reduction: str) -> dict:
    """Per-group (score, cost): cost is the live parameters removing the group frees."""
    sizes = groups.group_sizes(masks, cfg)
    g = cfg.group_size
    live_per_kv = masks["heads"].reshape(cfg.num_layers, cfg.num_kv_heads, g).sum(-1)
    share = 1.0 / jnp.repeat(jnp.maximum(live_per_kv, 1), g, axis=1)
    sums = {
        "heads": saliency["heads"] + jnp.repeat(saliency["kv_heads"], g, axis=1) * share,
        "ffn": saliency["ffn"],
        "hidden": saliency["hidden"],
    }
    costs = {
        "heads": sizes["head"] + sizes["kv_head"] * share,
        "ffn": jnp.broadcast_to(sizes["ffn"], saliency["ffn"].shape),
        "hidden": jnp.broadcast_to(sizes["hidden"], saliency["hidden"].shape),
    }
    if reduction == "mean":
        scores = {k: sums[k] / jnp.maximum(costs[k], 1.0) for k in sums}
    elif reduction == "sum":
        scores = sums
    else:
        raise ValueError(f"prune.reduction={reduction!r}; expected one of {REDUCTIONS}")
    return {k: (scores[k], costs[k]) for k in sums}


def _layer_slices(score: jax.Array, cost: jax.Array, alive: jax.Array):
    """Slice j = the j-th least salient live unit of every layer (uniform widths)."""
    keyed = jnp.where(alive, score, -jnp.inf)  # dead units sort first in every layer
    order = jnp.argsort(keyed, axis=1)
    slice_score = jnp.take_along_axis(keyed, order, 1).mean(0)
    slice_cost = jnp.take_along_axis(cost, order, 1).sum(0)
    rank = jnp.argsort(order, axis=1)
    return slice_score, slice_cost, jnp.isfinite(slice_score), rank


def _remove_cheapest(scores: jax.Array, costs: jax.Array, alive: jax.Array, needed) -> jax.Array:
    """Removes candidates in order of score until their costs cover `needed`."""
    key = jnp.where(alive, scores, jnp.inf)
    order = jnp.argsort(key)
    sorted_alive = jnp.isfinite(key[order])
    sorted_cost = jnp.where(sorted_alive, costs[order], 0.0)
    before = jnp.cumsum(sorted_cost) - sorted_cost
    remove_sorted = sorted_alive & (before < needed)
    return jnp.zeros_like(alive).at[order].set(remove_sorted)


def _select_once(masks: Masks, saliency: dict, cfg: ModelConfig, budget, sel: SelectConfig) -> Masks:
    needed = groups.count_params(masks, cfg) - budget
    scored = group_scores(masks, saliency, cfg, sel.reduction)
    candidates, unpack = [], []
    for name in GROUP_TYPES:
        score, cost = scored[name]
        alive = masks[name] & (name in sel.group_types)
        if name != "hidden" and sel.uniform_layers:
            s, c, a, rank = _layer_slices(score, cost, alive)
            candidates.append((s, c, a))
            unpack.append(lambda removed, rank=rank: removed[rank])
        else:
            candidates.append((score.reshape(-1), cost.reshape(-1), alive.reshape(-1)))
            unpack.append(lambda removed, shape=score.shape: removed.reshape(shape))
    sizes = [c[0].shape[0] for c in candidates]
    removed = _remove_cheapest(*(jnp.concatenate(parts) for parts in zip(*candidates)), needed)
    new_masks, offset = {}, 0
    for name, n, to_mask in zip(GROUP_TYPES, sizes, unpack):
        new_masks[name] = masks[name] & ~to_mask(removed[offset:offset + n])
        offset += n
    if sel.round_to > 1:
        for name in ("ffn", "hidden"):
            new_masks[name] = _round_widths(masks[name], new_masks[name], scored[name][0],
                                            sel.round_to)
    return new_masks


def _round_widths(old: jax.Array, new: jax.Array, score: jax.Array, multiple: int) -> jax.Array:
    """Keeps the most salient units of each row so the kept count is the multiple nearest the
    selection's (never more than were alive before: no revival)."""
    kept = new.sum(-1, keepdims=True)
    rounded = jnp.round(kept / multiple) * multiple
    rounded = jnp.clip(rounded, 0, old.sum(-1, keepdims=True))
    key = jnp.where(old, score, -jnp.inf)
    rank = jnp.argsort(jnp.argsort(-key, axis=-1), axis=-1)  # 0 = most salient
    return old & (rank < rounded)


def select(masks: Masks, saliency: dict, cfg: ModelConfig, budget, sel: SelectConfig) -> Masks:
    """New masks whose live parameter count is at most `budget` (to within one group)."""
    for _ in range(sel.rounds):
        masks = _select_once(masks, saliency, cfg, budget, sel)
    return masks
