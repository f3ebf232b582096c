"""What a legal `prune` config section is: checked before anything compiles (config.validate
calls `validate_prune`), each problem named in one line.

Besides ranges and names, it refuses settings that cannot do what they ask: a run whose
`train.steps` ends before the last pruning event, KV-group pruning of a model without GQA,
uniform layers with block (depth) pruning, and a target below the smallest model that the
floors and the allowed group types can reach (`min_live_params`).
"""
from __future__ import annotations

from typing import Any

from effllm_jax.model.llama import ModelConfig
from effllm_jax.pruning import groups, saliency, select

FLOORS = ("min_heads_per_layer", "min_ffn", "min_hidden")


def select_config(prune: Any) -> select.SelectConfig:
    """The event's SelectConfig from a `prune` config section."""
    return select.SelectConfig(
        reduction=prune.reduction, uniform_layers=bool(prune.uniform_layers),
        group_types=tuple(prune.group_types), rounds=int(prune.rounds),
        round_to=int(prune.round_to), min_heads_per_layer=int(prune.min_heads_per_layer),
        min_ffn=int(prune.min_ffn), min_hidden=int(prune.min_hidden))


def target_params(prune: Any, cfg: ModelConfig) -> int:
    """The absolute live-parameter budget of a run."""
    if prune.target_params:
        return int(prune.target_params)
    return int(groups.dense_params(cfg) * float(prune.target_fraction))


def _floor_units(floor: int, width: int, multiple: int) -> int:
    """Units a floor keeps in a row whose removals come in bundles of `multiple`."""
    return min(width, -(-floor // multiple) * multiple)


def min_live_params(cfg: ModelConfig, sel: select.SelectConfig) -> int:
    """The smallest live count events can reach (worst case over which units the floors
    protect): the group types not allowed keep their full widths."""
    types, L, g = sel.group_types, cfg.num_layers, cfg.group_size
    d = _floor_units(sel.min_hidden, cfg.d_model, sel.round_to) if "hidden" in types else cfg.d_model
    heads, kv = cfg.num_heads, cfg.num_kv_heads
    if "attn_blocks" in types:
        heads = kv = 0
    elif sel.uniform_layers and ("heads" in types or "kv_groups" in types):
        kv_min, q_min = select.head_floors(cfg, sel)
        kv = kv_min if "kv_groups" in types else kv
        heads = kv * (q_min if "heads" in types else g)
    elif "heads" in types or "kv_groups" in types:
        kv = min(kv, sel.min_heads_per_layer)  # protected heads may sit in different groups
        heads = sel.min_heads_per_layer if "heads" in types else kv * g
    ffn = cfg.ffn_dim
    if "mlp_blocks" in types:
        ffn = 0
    elif "ffn" in types:
        ffn = _floor_units(sel.min_ffn, cfg.ffn_dim, sel.round_to)
    embeddings = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    per_layer = 2 * d + d * cfg.head_dim * 2 * (heads + kv) + 3 * d * ffn
    return embeddings + L * per_layer + d


def validate_prune(prune: Any, cfg: ModelConfig, train_steps: int) -> None:
    """Raises ValueError naming the first illegal `prune` setting."""
    p = prune
    dense = groups.dense_params(cfg)
    target = target_params(p, cfg)
    if not p.target_params and not 0.0 < p.target_fraction <= 1.0:
        raise ValueError(f"prune.target_fraction={p.target_fraction} must be in (0, 1]")
    if target > dense:
        raise ValueError(f"prune target ({target:,} params) is larger than the source model "
                         f"({dense:,} params)")
    if target < cfg.vocab_size:
        raise ValueError(f"prune target ({target:,} params) cannot fit: a model with even one "
                         f"hidden channel keeps vocab_size={cfg.vocab_size:,} embedding params")
    for name in ("warmup_steps", "prune_steps", "every"):
        if int(p[name]) < (0 if name == "warmup_steps" else 1):
            raise ValueError(f"prune.{name}={p[name]} is out of range")
    last_event = int(p.warmup_steps) + int(p.prune_steps)
    if train_steps < last_event:
        raise ValueError(f"train.steps={train_steps} ends before the last pruning event at step "
                         f"{last_event} (prune.warmup_steps + prune.prune_steps): the run would "
                         f"end above its target; raise train.steps or shorten the schedule")
    if int(p.round_to) < 1 or int(p.rounds) < 1:
        raise ValueError(f"prune.round_to={p.round_to} and prune.rounds={p.rounds} must be >= 1")
    for name in FLOORS:
        if int(p[name]) < 1:
            raise ValueError(f"prune.{name}={p[name]} must be >= 1 (to empty whole layers, "
                             f"add 'attn_blocks' / 'mlp_blocks' to prune.group_types)")
    for name, width in (("min_heads_per_layer", cfg.num_heads), ("min_ffn", cfg.ffn_dim),
                        ("min_hidden", cfg.d_model)):
        if int(p[name]) > width:
            raise ValueError(f"prune.{name}={p[name]} is more than the model has ({width})")
    if p.criterion not in saliency.CRITERIA:
        raise ValueError(f"prune.criterion={p.criterion!r}; expected one of {saliency.CRITERIA}")
    if p.reduction not in select.REDUCTIONS:
        raise ValueError(f"prune.reduction={p.reduction!r}; expected one of {select.REDUCTIONS}")
    types = tuple(p.group_types)
    unknown = set(types) - set(select.GROUP_TYPES)
    if unknown:
        raise ValueError(f"prune.group_types has unknown {sorted(unknown)}; "
                         f"known: {select.GROUP_TYPES}")
    if not types:
        raise ValueError("prune.group_types is empty: name at least one group type to prune")
    if "kv_groups" in types and cfg.num_kv_heads == cfg.num_heads:
        raise ValueError(f"prune.group_types has 'kv_groups' but the model has no GQA "
                         f"(num_kv_heads == num_heads == {cfg.num_heads}): a KV group is a "
                         f"single head; use 'heads'")
    blocks = sorted(set(types) & set(select.BLOCK_TYPES))
    if p.uniform_layers and blocks:
        raise ValueError(f"prune.uniform_layers=True cannot keep equal layers while removing "
                         f"whole blocks {blocks}; drop one of them")
    sel = select_config(p)
    smallest = min_live_params(cfg, sel)
    if target < smallest:
        raise ValueError(
            f"prune target ({target:,} params) cannot be reached: with group_types {types}, "
            f"min_heads_per_layer={sel.min_heads_per_layer}, min_ffn={sel.min_ffn}, "
            f"min_hidden={sel.min_hidden}, round_to={sel.round_to}, uniform_layers="
            f"{sel.uniform_layers} the smallest model has {smallest:,} params")
