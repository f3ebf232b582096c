"""Saliency of every minimal parameter group, from the training gradients themselves.

Per weight w, with g_t its mini-batch gradient at step t, ḡ the mean of g_t over the pruning
window (the steps since the last event) and F the diagonal Fisher estimate below:
  taylor         Σ_t |w·g_t|           per-step first-order Taylor term, summed over the window
  taylor_acc     |w·ḡ|                 first order of the window's gradient (LLM-Pruner):
                                       zero-mean gradient noise cancels instead of adding up
  fisher         ½·w²·F                diagonal-Fisher OBD term (second order alone)
  taylor_fisher  |w·ḡ − ½·w²·F|        LLM-Pruner's mix: |ΔL| of removing w to second order
and a group's saliency is the sum over exactly the weights it owns (groups.py).

F is Adam's own second moment: ν (bias-corrected) is an EMA of g_t² over the last ~1/(1-b2)
steps, already held in the optimizer state, so it costs nothing to keep. It estimates E[ḡ²]
of the batch-mean gradient; the Fisher of the per-sequence loss (the Gauss-Newton diagonal
of the Hessian of the mean loss) is about n·E[ḡ²] for n independent sequences per batch, so
F = n·ν̂ with n the batch's sequence count. (ν is of the clipped gradient, as Adam sees it.)

`taylor` sums its per-step group scores into mask-sized arrays (no weight-shaped buffer);
`taylor_acc` and `taylor_fisher` keep one params-shaped Σg accumulator ("grad_sum", sharded
like the params), allocated only for them; `fisher` needs no accumulator at all.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from effllm_jax.model import llama
from effllm_jax.model.llama import ModelConfig

CRITERIA = ("taylor", "taylor_acc", "fisher", "taylor_fisher")
NEEDS_GRAD_SUM = ("taylor_acc", "taylor_fisher")
GROUP_KEYS = ("heads", "kv_heads", "ffn", "hidden")


def zeros(cfg: ModelConfig, criterion: str = "taylor") -> dict:
    """An empty accumulator: one float per group, and Σg when the criterion needs it."""
    out = {
        "heads": jnp.zeros((cfg.num_layers, cfg.num_heads), jnp.float32),
        "kv_heads": jnp.zeros((cfg.num_layers, cfg.num_kv_heads), jnp.float32),
        "ffn": jnp.zeros((cfg.num_layers, cfg.ffn_dim), jnp.float32),
        "hidden": jnp.zeros((cfg.d_model,), jnp.float32),
        "steps": jnp.zeros((), jnp.float32),
    }
    if criterion in NEEDS_GRAD_SUM:
        out["grad_sum"] = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32),
                                       llama.abstract_params(cfg))
    return out


def group_sums(per_weight: dict) -> dict:
    """Sums a params-shaped tree of per-weight scores into heads, KV heads, FFN and hidden
    channels (each weight lands in its head/KV/FFN group and in its hidden channel)."""
    s = per_weight
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
    }


def taylor_step(params: dict, grads: dict) -> dict:
    """One step's Σ|w·g| per group."""
    return group_sums(jax.tree.map(
        lambda w, g: jnp.abs(w.astype(jnp.float32) * g.astype(jnp.float32)), params, grads))


def accumulate(total: dict, params: dict, grads: dict, criterion: str) -> dict:
    """Adds one step (inside the pruning window) to the running accumulator."""
    out = dict(total, steps=total["steps"] + 1.0)
    if criterion == "taylor":
        step = taylor_step(params, grads)
        out.update({k: total[k] + step[k] for k in GROUP_KEYS})
    if "grad_sum" in total:
        out["grad_sum"] = jax.tree.map(lambda a, g: a + g.astype(jnp.float32),
                                       total["grad_sum"], grads)
    return out


def accumulate_in_window(total: dict, params: dict, grads: dict, criterion: str,
                         collecting: jax.Array) -> dict:
    """accumulate() where `collecting` (inside the pruning window), else `total` unchanged.
    The group sums (small) go through a branch, so outside the window they cost nothing; Σg
    through a select, which updates it in place in the optimizer's pass over the gradients
    (through a branch, the params-sized Σg would get a second buffer on every chip)."""
    small = {k: v for k, v in total.items() if k != "grad_sum"}
    out = jax.lax.cond(collecting, lambda: accumulate(small, params, grads, criterion),
                       lambda: small)
    if "grad_sum" in total:
        out["grad_sum"] = jax.tree.map(
            lambda a, g: jnp.where(collecting, a + g.astype(jnp.float32), a),
            total["grad_sum"], grads)
    return out


def adam_fisher(nu: dict, count: jax.Array, b2: float, scale: float) -> dict:
    """Diagonal Fisher estimate F = scale · ν / (1 − b2^count) from Adam's second moment."""
    correction = 1.0 - b2 ** jnp.maximum(count, 1).astype(jnp.float32)
    return jax.tree.map(lambda v: v.astype(jnp.float32) * (scale / correction), nu)


def per_weight(criterion: str, w: jax.Array, mean_grad: jax.Array | None,
               fisher: jax.Array | None) -> jax.Array:
    """Per-weight score of the event-time criteria (see the module docstring)."""
    w = w.astype(jnp.float32)
    if criterion == "taylor_acc":
        return jnp.abs(w * mean_grad)
    if criterion == "fisher":
        return 0.5 * w * w * fisher
    if criterion == "taylor_fisher":
        return jnp.abs(w * mean_grad - 0.5 * w * w * fisher)
    raise ValueError(f"prune.criterion={criterion!r}; expected one of {CRITERIA}")


def event_saliency(total: dict, params: dict, criterion: str, fisher: dict | None = None) -> dict:
    """Group saliency at a pruning event from the window's accumulator (and F for the
    second-order criteria)."""
    if criterion == "taylor":
        return {k: total[k] for k in GROUP_KEYS}
    mean_grad = None
    if criterion in NEEDS_GRAD_SUM:
        steps = jnp.maximum(total["steps"], 1.0)
        mean_grad = jax.tree.map(lambda s: s / steps, total["grad_sum"])
    leaves = lambda t: t if t is not None else jax.tree.map(lambda _: None, params)
    scores = jax.tree.map(lambda w, g, f: per_weight(criterion, w, g, f), params,
                          leaves(mean_grad), leaves(fisher), is_leaf=lambda x: x is None)
    return group_sums(scores)


def group_saliency(params: dict, grads: dict, criterion: str, fisher: dict | None = None) -> dict:
    """One-shot group saliency from one gradient (e.g. calibration batches already summed):
    the window is that single gradient; `fisher` defaults to its square (empirical Fisher)."""
    if fisher is None and criterion in ("fisher", "taylor_fisher"):
        fisher = jax.tree.map(lambda g: jnp.square(g.astype(jnp.float32)), grads)
    total = accumulate(zeros_like_params(params, criterion), params, grads, criterion)
    return dict(event_saliency(total, params, criterion, fisher), steps=total["steps"])


def zeros_like_params(params: dict, criterion: str) -> dict:
    """An empty accumulator shaped from a params tree (no ModelConfig needed)."""
    attn, mlp = params["layers"]["attn"], params["layers"]["mlp"]
    layers, heads, kv_heads = attn["wq"].shape[0], attn["wq"].shape[2], attn["wk"].shape[2]
    out = {"heads": jnp.zeros((layers, heads), jnp.float32),
           "kv_heads": jnp.zeros((layers, kv_heads), jnp.float32),
           "ffn": jnp.zeros((mlp["w_up"].shape[0], mlp["w_up"].shape[2]), jnp.float32),
           "hidden": jnp.zeros(params["embed"].shape[1:], jnp.float32),
           "steps": jnp.zeros((), jnp.float32)}
    if criterion in NEEDS_GRAD_SUM:
        out["grad_sum"] = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params)
    return out
