"""Local second-order (OBS / SparseGPT-style) weight compensation at a pruning event.

A linear layer y = x W (W [n_in, n_out]) whose input channels M are removed keeps its output
as close as possible, in the least-squares sense over the inputs it has seen, when the kept
rows K move to
    W'_K = W_K + (H_KK + λI)⁻¹ H_KM W_M,          H = Σ x xᵀ  (summed input second moments),
which equals OBS's δW = −W_M ([H⁻¹]_MM)⁻¹ [H⁻¹]_M,: with the damped H (λ = damping · mean
diag H over the live inputs). In static shapes it is one solve per layer, with the rows and
columns of H outside K replaced by the identity, so it runs inside jit with no recompiles.

Which layers, and from which statistics (model/llama.py returns them with `stats_block`):
  heads removed        wo      [H·hd -> D]   input: per-head attention outputs   'o_in'
  FFN channels         w_down  [F -> D]      input: the SwiGLU hidden            'down_in'
  hidden channels      wq/wk/wv              input: attn-normed residual         'attn_in'
                       w_gate/w_up           input: mlp-normed residual          'mlp_in'
                       lm_head (untied only) input: final-normed residual        'final_in'
A tied embedding is not moved: it is also the input table, and moving it to serve the head
would change what every token writes into the residual stream. The effect of a removed
hidden channel on RMSNorm's statistics (a per-token rescale) is not modelled.

H is block-diagonal with blocks of `obs_block` along the inputs (0: the full matrix); a
removed channel is then compensated only by the kept channels of its own block. Memory per
layer is n·b floats instead of n², and the event's solve costs n·b² instead of n³.
The statistics are sharded like the input dimension of the weights they serve.

Adam moments of moved weights are kept. The move is a small, loss-preserving correction, so
the moments still describe the gradients those weights see; resetting them would discard
the optimizer's state of nearly every weight at each hidden-channel event (the move touches
every kept row of q/k/v/gate/up), and the moments of removed weights are zeroed anyway.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from effllm_jax.model.llama import Masks, ModelConfig, stats_block_size

COMPENSATIONS = ("none", "obs")
_LAYER_STATS = {  # statistic -> (input size, logical axis of the input)
    "attn_in": (lambda c: c.d_model, "embed"),
    "o_in": (lambda c: c.num_heads * c.head_dim, "heads"),
    "mlp_in": (lambda c: c.d_model, "embed"),
    "down_in": (lambda c: c.ffn_dim, "mlp"),
}


def validate(prune_config: Any) -> None:
    """Raises ValueError naming an illegal compensation setting."""
    p = prune_config
    if p.compensation not in COMPENSATIONS:
        raise ValueError(f"prune.compensation={p.compensation!r}; expected one of {COMPENSATIONS}")
    if not float(p.damping) > 0.0:
        raise ValueError(f"prune.damping={p.damping} must be > 0 (relative to mean diag H)")
    if int(p.obs_block) < 0:
        raise ValueError(f"prune.obs_block={p.obs_block} must be >= 0 (0: full H)")


def _shape(n: int, obs_block: int) -> tuple[int, int, int]:
    b = stats_block_size(n, obs_block)
    return (n // b, b, b)


def zero_stats(cfg: ModelConfig, obs_block: int) -> dict:
    """Empty statistics: per layer [L, n/b, b, b] second moments (+ the untied head's input)."""
    stats = {name: jnp.zeros((cfg.num_layers,) + _shape(size(cfg), obs_block), jnp.float32)
             for name, (size, _) in _LAYER_STATS.items()}
    if not cfg.tie_embeddings:
        stats["final_in"] = jnp.zeros(_shape(cfg.d_model, obs_block), jnp.float32)
    return stats


def stats_axes(cfg: ModelConfig, obs_block: int) -> dict:
    """Logical axes of the statistics: rows of H are sharded like the weights' input dim."""
    def axes(n: int, name: str) -> tuple:
        blocks = _shape(n, obs_block)[0]
        return (name, None, None) if blocks > 1 else (None, name, None)

    out = {k: ("layers",) + axes(size(cfg), name) for k, (size, name) in _LAYER_STATS.items()}
    if not cfg.tie_embeddings:
        out["final_in"] = axes(cfg.d_model, "embed")
    return out


def accumulate(total: dict, batch_stats: dict) -> dict:
    """Adds one batch's second moments to the running sums."""
    return jax.tree.map(jnp.add, total, batch_stats)


def compensate_rows(w: jax.Array, h: jax.Array, kept: jax.Array, removed: jax.Array,
                    damping: float) -> jax.Array:
    """One layer: w [n, out] (input rows), h [n/b, b, b], kept/removed [n] -> moved w.

    Only kept rows move; removed rows are returned unchanged (the caller zeroes them)."""
    blocks, b, _ = h.shape
    k = kept.astype(jnp.float32).reshape(blocks, b)
    m = removed.astype(jnp.float32).reshape(blocks, b)
    h = h.astype(jnp.float32)
    live = jnp.maximum(k, m)
    diag = jnp.diagonal(h, axis1=-2, axis2=-1)
    mean_diag = jnp.sum(diag * live) / jnp.maximum(jnp.sum(live), 1.0)
    lam = damping * jnp.where(mean_diag > 0, mean_diag, 1.0)
    eye = jnp.eye(b, dtype=jnp.float32)
    a = k[:, :, None] * h * k[:, None, :] + eye * ((1.0 - k) + lam * k)[:, :, None]
    w32 = w.astype(jnp.float32).reshape(blocks, b, -1)
    rhs = jnp.einsum("kij,kjo->kio", k[:, :, None] * h * m[:, None, :], w32)
    delta = jnp.linalg.solve(a, rhs)  # zero on rows outside K (identity there, rhs 0)
    return (w32 + delta).reshape(w.shape).astype(w.dtype)


def _compensate_if(removed: jax.Array, fn, w: jax.Array) -> jax.Array:
    """Runs the solve only when some input of this kind was removed (events are rare)."""
    return jax.lax.cond(removed.any(), fn, lambda w: w, w)


def compensate(params: dict, old_masks: Masks, new_masks: Masks, stats: dict,
               cfg: ModelConfig, damping: float) -> dict:
    """Params with the kept weights moved to make up for the inputs the new masks remove.

    Removed weights are left as they were (zero them with the new masks afterwards)."""
    layers = params["layers"]
    attn, mlp = dict(layers["attn"]), dict(layers["mlp"])
    L, H, hd, D = cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.d_model
    solve = jax.vmap(compensate_rows, in_axes=(0, 0, 0, 0, None))

    # Heads: the input rows of wo, head-major (h, k).
    kept_heads = jnp.repeat(new_masks["heads"], hd, axis=1)
    removed_heads = jnp.repeat(old_masks["heads"] & ~new_masks["heads"], hd, axis=1)
    attn["wo"] = _compensate_if(removed_heads, lambda w: solve(
        w.reshape(L, H * hd, D), stats["o_in"], kept_heads, removed_heads, damping
    ).reshape(w.shape), attn["wo"])

    # FFN channels: the input rows of w_down.
    removed_ffn = old_masks["ffn"] & ~new_masks["ffn"]
    mlp["w_down"] = _compensate_if(removed_ffn, lambda w: solve(
        w, stats["down_in"], new_masks["ffn"], removed_ffn, damping), mlp["w_down"])

    # Hidden channels: the input rows of q/k/v, gate/up (each layer), and the untied head.
    kept_hidden = new_masks["hidden"]
    removed_hidden = old_masks["hidden"] & ~kept_hidden
    per_layer = lambda x: jnp.broadcast_to(x, (L,) + x.shape)  # noqa: E731

    def moved_together(names: tuple[str, ...], module: dict, stat: str) -> None:
        widths = [module[n][0, 0].size for n in names]
        joined = jnp.concatenate([module[n].reshape(L, D, -1) for n in names], axis=-1)
        joined = _compensate_if(removed_hidden, lambda w: solve(
            w, stats[stat], per_layer(kept_hidden), per_layer(removed_hidden), damping), joined)
        splits = jnp.split(joined, list(np.cumsum(widths)[:-1]), axis=-1)
        for n, part in zip(names, splits):
            module[n] = part.reshape(module[n].shape)

    moved_together(("wq", "wk", "wv"), attn, "attn_in")
    moved_together(("w_gate", "w_up"), mlp, "mlp_in")
    out = dict(params)
    out["layers"] = dict(layers, attn=attn, mlp=mlp)
    if "lm_head" in params:
        out["lm_head"] = _compensate_if(removed_hidden, lambda w: compensate_rows(
            w, stats["final_in"], kept_hidden, removed_hidden, damping), params["lm_head"])
    return out
