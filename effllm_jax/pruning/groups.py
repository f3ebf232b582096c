"""Minimal parameter groups: which weights a head, an FFN channel and a hidden channel own.

Masks are tiny structured boolean vectors (see model/llama.py). Everything here is a pure
function that works on numpy arrays (host) and jax arrays (inside jit) alike.
  head h of layer l    wq[l, :, h, :], wo[l, h, :, :]  (+ its KV head's wk/wv rows once the
                       last query head reading that KV head is gone: GQA-aware)
  FFN channel f of l   w_gate[l, :, f], w_up[l, :, f], w_down[l, f, :]
  hidden channel d     embed[:, d], lm_head[d, :], every RMSNorm gain [d], the input columns d
                       of wq/wk/wv/w_gate/w_up and the output rows d of wo/w_down in every layer
"""
from __future__ import annotations

from typing import Any

from effllm_jax.model.llama import Masks, ModelConfig


def kv_alive(head_mask: Any, cfg: ModelConfig) -> Any:
    """[L, K]: a KV head lives while any query head that reads it lives."""
    num_layers = head_mask.shape[0]
    return head_mask.reshape(num_layers, cfg.num_kv_heads, cfg.group_size).any(axis=-1)


def param_masks(masks: Masks, cfg: ModelConfig) -> dict:
    """Per-parameter masks (broadcastable to each weight) in the layout of the params dict."""
    hidden, heads, ffn = masks["hidden"], masks["heads"], masks["ffn"]
    kv = kv_alive(heads, cfg)
    layers = {
        "attn_norm": {"scale": hidden[None, :]},
        "mlp_norm": {"scale": hidden[None, :]},
        "attn": {
            "wq": hidden[None, :, None, None] & heads[:, None, :, None],
            "wk": hidden[None, :, None, None] & kv[:, None, :, None],
            "wv": hidden[None, :, None, None] & kv[:, None, :, None],
            "wo": heads[:, :, None, None] & hidden[None, None, None, :],
        },
        "mlp": {
            "w_gate": hidden[None, :, None] & ffn[:, None, :],
            "w_up": hidden[None, :, None] & ffn[:, None, :],
            "w_down": ffn[:, :, None] & hidden[None, None, :],
        },
    }
    out = {"embed": hidden[None, :], "layers": layers, "final_norm": {"scale": hidden}}
    if not cfg.tie_embeddings:
        out["lm_head"] = hidden[:, None]
    return out


def unit_counts(masks: Masks, cfg: ModelConfig) -> dict:
    """Live units: hidden width, and per layer query heads, KV heads and FFN channels."""
    return {
        "hidden": masks["hidden"].sum(),
        "heads": masks["heads"].sum(axis=-1),
        "kv_heads": kv_alive(masks["heads"], cfg).sum(axis=-1),
        "ffn": masks["ffn"].sum(axis=-1),
    }


def count_params(masks: Masks, cfg: ModelConfig) -> Any:
    """Live parameter count implied by the masks (embedding and head included)."""
    n = unit_counts(masks, cfg)
    d = n["hidden"] * 1.0
    embeddings = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    attention = d * cfg.head_dim * 2 * (n["heads"] + n["kv_heads"])
    per_layer = 2 * d + attention + 3 * d * n["ffn"]
    return embeddings + per_layer.sum() + d


def dense_params(cfg: ModelConfig) -> int:
    """Parameter count of the unpruned source model (exact Python int)."""
    embeddings = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    attention = cfg.d_model * cfg.head_dim * 2 * (cfg.num_heads + cfg.num_kv_heads)
    per_layer = 2 * cfg.d_model + attention + 3 * cfg.d_model * cfg.ffn_dim
    return embeddings + cfg.num_layers * per_layer + cfg.d_model


def group_sizes(masks: Masks, cfg: ModelConfig) -> dict:
    """Live parameters each group owns now: per head (q+o), per KV head (k+v), per FFN
    channel, per hidden channel."""
    n = unit_counts(masks, cfg)
    d = n["hidden"] * 1.0
    per_hidden = (cfg.vocab_size * (1 if cfg.tie_embeddings else 2) + 1
                  + (2 + cfg.head_dim * 2 * (n["heads"] + n["kv_heads"]) + 3 * n["ffn"]).sum())
    return {
        "head": 2 * d * cfg.head_dim,
        "kv_head": 2 * d * cfg.head_dim,
        "ffn": 3 * d,
        "hidden": per_hidden * 1.0,
    }
