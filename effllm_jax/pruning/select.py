"""The pruning event: rank every removable group by normalised saliency and remove the least
salient until the live-parameter budget holds. Pure, shape-static, runs inside jit.

Group types (`SelectConfig.group_types`, all in one global ranking):
  heads        one query head (it carries an even share of its KV head, so removing a GQA
               group's last head accounts for the KV rows too)
  kv_groups    one KV head with all its query heads
  attn_blocks  every head of one layer (depth pruning: the layer keeps only its MLP)
  ffn          one SwiGLU channel
  mlp_blocks   every FFN channel of one layer
  hidden       one residual-stream channel
A group's score is its saliency divided by the live parameters it owns (reduction 'mean'), so
every type competes on "saliency per parameter".

Shapes: with `round_to=r`, FFN and hidden channels go in *bundles* of r (the r least salient
live channels of a row together), so widths stay multiples of r; with `uniform_layers`, heads,
KV groups and FFN bundles go as *slices* (the k-th least salient of every layer, and for heads
of every KV group, together), so every layer keeps the same widths and the same even GQA
grouping. Floors (`min_heads_per_layer`, `min_ffn`, `min_hidden`) protect each row's most
salient units; only the block types may empty a layer.

Budget: a pass removes groups in score order until their estimated costs cover the excess.
Estimates never undercount what a removal frees (removing heads and hidden channels together
frees less than the sum), so a pass never overshoots by more than its last group; passes
repeat (`lax.while_loop`) until the live count is at most the budget or nothing removable is
left. The final count is thus <= budget and within one group (bundle, slice) of it.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from effllm_jax.model.llama import Masks, ModelConfig
from effllm_jax.pruning import groups

GROUP_TYPES = ("heads", "kv_groups", "attn_blocks", "ffn", "mlp_blocks", "hidden")
DEFAULT_GROUP_TYPES = ("heads", "ffn", "hidden")
BLOCK_TYPES = ("attn_blocks", "mlp_blocks")
REDUCTIONS = ("mean", "sum")
UNITS = ("heads", "ffn", "hidden")  # the mask each type removes units of
TYPE_UNIT = {"heads": "heads", "kv_groups": "heads", "attn_blocks": "heads", "ffn": "ffn",
             "mlp_blocks": "ffn", "hidden": "hidden"}


@dataclasses.dataclass(frozen=True)
class SelectConfig:
    """How an event chooses what to remove."""

    reduction: str = "mean"  # 'mean': saliency per live parameter; 'sum': raw group sum
    uniform_layers: bool = False  # equal head/KV/FFN widths and GQA grouping in every layer
    group_types: tuple[str, ...] = DEFAULT_GROUP_TYPES  # which group types may be pruned
    rounds: int = 3  # kept for old configs: passes now repeat until the budget holds
    round_to: int = 1  # FFN and hidden widths stay multiples of this (8, 64, 128 for MXUs)
    min_heads_per_layer: int = 1  # floors (only attn_blocks / mlp_blocks go below them)
    min_ffn: int = 1
    min_hidden: int = 1


def head_floors(cfg: ModelConfig, sel: SelectConfig) -> tuple[int, int]:
    """Uniform layers: (KV groups kept per layer, query heads kept per KV group) at least, whose
    product covers `min_heads_per_layer`."""
    need = min(sel.min_heads_per_layer, cfg.num_heads)
    if "kv_groups" in sel.group_types:
        kv_min = max(1, -(-need // cfg.group_size))
    else:
        kv_min = cfg.num_kv_heads  # nothing else removes a KV group in uniform mode
    return kv_min, max(1, -(-need // kv_min)) if need else 0


def _top(key: jax.Array, k: int) -> jax.Array:
    """[R, N] bool: the k highest keys of every row."""
    rank = jnp.argsort(jnp.argsort(-key, axis=1, stable=True), axis=1)
    return rank < k


def _bundles(sums, costs, unit_score, alive, chunk: int, keep: int, uniform: bool):
    """Bundles of `chunk` units of a [R, N] row ranked by score (most salient first; the top
    ceil(keep/chunk) bundles protected); with `uniform`, bundle j of every row together.

    Returns flat (sum, cost, removable) with the least salient bundle first in each row, and
    `spread(values) -> [R, N]`: each unit gets the value of its bundle."""
    rows, n = alive.shape
    key = jnp.where(alive, unit_score, -jnp.inf)
    order = jnp.argsort(-key, axis=1, stable=True)  # dead units last
    n_chunks = -(-n // chunk)

    def chunked(x):
        x = jnp.pad(jnp.take_along_axis(x, order, 1), ((0, 0), (0, n_chunks * chunk - n)))
        return x.reshape(rows, n_chunks, chunk).sum(-1)

    live = alive.astype(jnp.float32)
    s, c = chunked(sums * live), chunked(costs * live)
    removable = (chunked(live) > 0) & (jnp.arange(n_chunks) >= -(-keep // chunk))[None]
    if uniform:
        s, c, removable = s.sum(0, keepdims=True), c.sum(0, keepdims=True), removable.any(0, keepdims=True)
    chunk_of = jnp.argsort(order, axis=1) // chunk  # [R, N] each unit's bundle

    def spread(values):
        values = values.reshape(s.shape)[:, ::-1]
        if uniform:
            return values[0][chunk_of]
        return jnp.take_along_axis(values, chunk_of, 1)

    flip = lambda x: x[:, ::-1].reshape(-1)  # least salient first: stable ties pick it first
    return flip(s), flip(c), flip(removable), spread


def candidates(masks: Masks, saliency: dict, cfg: ModelConfig, sel: SelectConfig) -> list:
    """Every removable group of each enabled type: (type, sum, cost, removable, spread) with
    `spread(values)` giving each unit of the type's mask the value of its group."""
    L, H, K, g = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.group_size
    sizes = groups.group_sizes(masks, cfg)
    heads, ffn, hidden = masks["heads"], masks["ffn"], masks["hidden"]
    per_param = lambda s, c: s / jnp.maximum(c, 1.0)
    live_per_kv = heads.reshape(L, K, g).sum(-1)
    kv_sal = saliency["kv_heads"] * (live_per_kv > 0)
    share = 1.0 / jnp.repeat(jnp.maximum(live_per_kv, 1), g, axis=1)
    head_sum = saliency["heads"] + jnp.repeat(kv_sal, g, axis=1) * share
    head_cost = sizes["head"] + sizes["kv_head"] * share
    head_score = per_param(head_sum, head_cost)
    group_sum = (saliency["heads"] * heads).reshape(L, K, g).sum(-1) + kv_sal
    group_cost = live_per_kv * sizes["head"] + (live_per_kv > 0) * sizes["kv_head"]
    ffn_cost = jnp.broadcast_to(sizes["ffn"], ffn.shape)
    out = []
    types = sel.group_types
    uniform = sel.uniform_layers
    if "heads" in types:
        if uniform:  # per KV group rows: slice j = the j-th least salient head of every group
            _, q_min = head_floors(cfg, sel)
            s, c, r, unpack = _bundles(head_sum.reshape(L * K, g), head_cost.reshape(L * K, g),
                                       head_score.reshape(L * K, g), heads.reshape(L * K, g),
                                       1, q_min, True)
            out.append(("heads", s, c, r, lambda x, u=unpack: u(x).reshape(L, H)))
        else:
            out.append(("heads",) + _bundles(head_sum, head_cost, head_score, heads, 1,
                                             sel.min_heads_per_layer, False))
    if "kv_groups" in types:
        group_score = per_param(group_sum, group_cost)
        if uniform:
            kv_min, _ = head_floors(cfg, sel)
            alive = live_per_kv > 0
            keep = kv_min
        else:  # a group holding one of the layer's protected heads stays
            protected = _top(jnp.where(heads, head_score, -jnp.inf), sel.min_heads_per_layer)
            alive = (live_per_kv > 0) & ~(protected & heads).reshape(L, K, g).any(-1)
            keep = 0
        s, c, r, unpack = _bundles(group_sum, group_cost, group_score, alive, 1, keep, uniform)
        out.append(("kv_groups", s, c, r, lambda x, u=unpack: jnp.repeat(u(x), g, axis=1)))
    if "attn_blocks" in types:
        bsum, bcost = group_sum.sum(1, keepdims=True), group_cost.sum(1, keepdims=True)
        s, c, r, unpack = _bundles(bsum, bcost, per_param(bsum, bcost), heads.any(1, keepdims=True),
                                   1, 0, False)
        out.append(("attn_blocks", s, c, r, lambda x, u=unpack: jnp.broadcast_to(u(x), (L, H))))
    if "ffn" in types:
        out.append(("ffn",) + _bundles(saliency["ffn"], ffn_cost,
                                       per_param(saliency["ffn"], ffn_cost), ffn,
                                       sel.round_to, sel.min_ffn, uniform))
    if "mlp_blocks" in types:
        bsum = (saliency["ffn"] * ffn).sum(1, keepdims=True)
        bcost = (ffn_cost * ffn).sum(1, keepdims=True)
        s, c, r, unpack = _bundles(bsum, bcost, per_param(bsum, bcost), ffn.any(1, keepdims=True),
                                   1, 0, False)
        out.append(("mlp_blocks", s, c, r, lambda x, u=unpack: jnp.broadcast_to(u(x), ffn.shape)))
    if "hidden" in types:
        hcost = jnp.broadcast_to(sizes["hidden"], hidden.shape)[None]
        s, c, r, unpack = _bundles(saliency["hidden"][None], hcost,
                                   per_param(saliency["hidden"], hcost[0])[None], hidden[None],
                                   sel.round_to, sel.min_hidden, False)
        out.append(("hidden", s, c, r, lambda x, u=unpack: u(x)[0]))
    return out


def max_group_cost(masks: Masks, cfg: ModelConfig, sel: SelectConfig) -> float:
    """An upper bound on what any one removable group (bundle, slice) of an event starting
    from `masks` frees: how far below its budget an event may land."""
    sizes = {k: float(v) for k, v in groups.group_sizes(masks, cfg).items()}
    rows = cfg.num_layers if sel.uniform_layers else 1
    head = sizes["head"] + sizes["kv_head"]
    bounds = {"heads": head * rows * (cfg.num_kv_heads if sel.uniform_layers else 1),
              "kv_groups": head * cfg.group_size * rows,
              "attn_blocks": head * cfg.num_heads,
              "ffn": sizes["ffn"] * sel.round_to * rows,
              "mlp_blocks": sizes["ffn"] * cfg.ffn_dim,
              "hidden": sizes["hidden"] * sel.round_to}
    return max(bounds[t] for t in sel.group_types)


def _remove_cheapest(scores: jax.Array, costs: jax.Array, alive: jax.Array, needed) -> jax.Array:
    """Removes candidates in order of score until their costs cover `needed`."""
    key = jnp.where(alive, scores, jnp.inf)
    order = jnp.argsort(key, stable=True)
    sorted_alive = alive[order]
    sorted_cost = jnp.where(sorted_alive, costs[order], 0.0)
    before = jnp.cumsum(sorted_cost) - sorted_cost
    remove_sorted = sorted_alive & (before < needed)
    return jnp.zeros_like(alive).at[order].set(remove_sorted)


def empty_record(cfg: ModelConfig) -> dict:
    """Per unit: the group type that removed it in this event (-1: none) and its score."""
    shapes = {"heads": (cfg.num_layers, cfg.num_heads), "ffn": (cfg.num_layers, cfg.ffn_dim),
              "hidden": (cfg.d_model,)}
    return {u: (jnp.full(s, -1, jnp.int32), jnp.zeros(s, jnp.float32)) for u, s in shapes.items()}


def _select_pass(masks: Masks, record: dict, saliency: dict, cfg: ModelConfig, budget,
                 sel: SelectConfig):
    needed = groups.count_params(masks, cfg) - budget
    cands = candidates(masks, saliency, cfg, sel)
    scores = [s / jnp.maximum(c, 1.0) if sel.reduction == "mean" else s
              for _, s, c, _, _ in cands]
    removable = jnp.concatenate([r for *_, r, _ in cands])
    all_scores = jnp.concatenate(scores)
    removed = _remove_cheapest(all_scores, jnp.concatenate([c for _, _, c, _, _ in cands]),
                               removable, needed)
    # Normalised score: relative to the mean score of the removable groups of this pass.
    mean_score = (jnp.where(removable, all_scores, 0.0).sum()
                  / jnp.maximum(removable.sum(), 1))
    norm = jnp.where(mean_score != 0, mean_score, 1.0)
    new_masks, record, offset = dict(masks), dict(record), 0
    for (name, s, _, _, spread), score in zip(cands, scores):
        n = s.shape[0]
        unit = TYPE_UNIT[name]
        gone = spread(removed[offset:offset + n]) & new_masks[unit]
        how, at = record[unit]
        record[unit] = (jnp.where(gone, GROUP_TYPES.index(name), how),
                        jnp.where(gone, spread(score / norm), at))
        new_masks[unit] = new_masks[unit] & ~gone
        offset += n
    return new_masks, record


def select_with_record(masks: Masks, saliency: dict, cfg: ModelConfig, budget,
                       sel: SelectConfig) -> tuple[Masks, dict]:
    """New masks (live count <= budget, within one group of it, floors kept) and, per unit
    removed now, (group type index into GROUP_TYPES, normalised score); -1 elsewhere."""
    def still_over(carry):
        masks, _, progressed = carry
        return progressed & (groups.count_params(masks, cfg) > budget)

    def one_pass(carry):
        masks, record, _ = carry
        new, record = _select_pass(masks, record, saliency, cfg, budget, sel)
        progressed = jnp.any(jnp.stack([jnp.any(new[u] != masks[u]) for u in UNITS]))
        return new, record, progressed

    masks = {u: jnp.asarray(masks[u], bool) for u in UNITS}
    init = (masks, empty_record(cfg), jnp.asarray(True))
    masks, record, _ = jax.lax.while_loop(still_over, one_pass, init)
    return masks, record


def select(masks: Masks, saliency: dict, cfg: ModelConfig, budget, sel: SelectConfig) -> Masks:
    """New masks whose live parameter count is at most `budget` and within one group of it."""
    return select_with_record(masks, saliency, cfg, budget, sel)[0]
