"""Saliency of every minimal parameter group, from the training gradients themselves.

Per weight, with w the weight and g its (mini-batch) gradient at this step:
  taylor         |w * g|                first-order Taylor estimate of the loss change
  fisher         1/2 * w^2 * g^2        diagonal empirical-Fisher OBD term (E[g^2] over steps)
  taylor_fisher  |w * g| + 1/2 (w g)^2  both terms of the second-order expansion
Each step the per-weight scores are summed into their groups right away, so the accumulator
is as small as the masks (no weight-shaped buffers); pruning events then normalise by the
group's live parameter count (select.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from effllm_jax.model.llama import ModelConfig

CRITERIA = ("taylor", "fisher", "taylor_fisher")


def elementwise(w: jax.Array, g: jax.Array, criterion: str) -> jax.Array:
    """Per-weight saliency."""
    wg = w.astype(jnp.float32) * g.astype(jnp.float32)
    if criterion == "taylor":
        return jnp.abs(wg)
    if criterion == "fisher":
        return 0.5 * wg * wg
    if criterion == "taylor_fisher":
        return jnp.abs(wg) + 0.5 * wg * wg
    raise ValueError(f"prune.criterion={criterion!r}; expected one of {CRITERIA}")


def zeros(cfg: ModelConfig) -> dict:
    """An empty accumulator: one float per group."""
    return {
        "heads": jnp.zeros((cfg.num_layers, cfg.num_heads), jnp.float32),
        "kv_heads": jnp.zeros((cfg.num_layers, cfg.num_kv_heads), jnp.float32),
        "ffn": jnp.zeros((cfg.num_layers, cfg.ffn_dim), jnp.float32),
        "hidden": jnp.zeros((cfg.d_model,), jnp.float32),
        "steps": jnp.zeros((), jnp.float32),
    }


def group_saliency(params: dict, grads: dict, criterion: str) -> dict:
    """Sums the per-weight saliency of one step into heads, KV heads, FFN and hidden channels."""
    s = jax.tree.map(lambda w, g: elementwise(w, g, criterion), params, grads)
    layers, attn, mlp = s["layers"], s["layers"]["attn"], s["layers"]["mlp"]
    hidden = (s["embed"].sum(0) + s["final_norm"]["scale"]
              + layers["attn_norm"]["scale"].sum(0) + layers["mlp_norm"]["scale"].sum(0)
              + attn["wq"].sum((0, 2, 3)) + attn["wk"].sum((0, 2, 3)) + attn["wv"].sum((0, 2, 3))
              + attn["wo"].sum((0, 1, 2))
              + mlp["w_gate"].sum((0, 2)) + mlp["w_up"].sum((0, 2)) + mlp["w_down"].sum((0, 1)))
    if "lm_head" in s:
        hidden = hidden + s["lm_head"].sum(1)
    return {
        "heads": attn["wq"].sum((1, 3)) + attn["wo"].sum((2, 3)),
        "kv_heads": attn["wk"].sum((1, 3)) + attn["wv"].sum((1, 3)),
        "ffn": mlp["w_gate"].sum(1) + mlp["w_up"].sum(1) + mlp["w_down"].sum(2),
        "hidden": hidden,
        "steps": jnp.ones((), jnp.float32),
    }


def accumulate(total: dict, step_saliency: dict) -> dict:
    """Adds one step's group saliency to the running sums."""
    return jax.tree.map(jnp.add, total, step_saliency)
