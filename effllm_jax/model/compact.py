"""The compact model: the masked source physically sliced to its kept units.

Each layer is its own `Block` with its own head count, KV grouping and FFN width, and the
hidden width is reduced everywhere. `slice_params` turns (params, masks) of the source into
the compact model's parameters; a test holds the two models' logits equal.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effllm_jax.arch import ArchSpec
from effllm_jax.model.llama import Block, Masks, ModelConfig, RMSNorm, embed_tokens, rope_tables, unembed


class CompactLlama(nnx.Module):
    """A Llama whose layers may differ in heads (with uneven GQA groups) and FFN width."""

    def __init__(self, spec: ArchSpec, *, rngs: nnx.Rngs):
        cfg = spec.model_config
        self.cfg = cfg
        d = spec.hidden_dim
        self.embed = nnx.Param(cfg.init_std * jax.random.normal(rngs.params(), (cfg.vocab_size, d)),
                               axes=("vocab", "embed"))
        self.layers = nnx.List([
            Block(cfg, d, layer.num_heads, layer.num_kv_heads, layer.kv_index, layer.ffn_dim,
                  rngs=rngs)
            for layer in spec.layers])
        self.final_norm = RMSNorm(d, cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.lm_head = nnx.Param(
                cfg.init_std * jax.random.normal(rngs.params(), (d, cfg.vocab_size)),
                axes=("embed", "vocab"))

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """Logits [B, T, V]; or [B, 1, V] at one position per row (generation needs no more)."""
        cfg = self.cfg
        x = embed_tokens(self.embed[...], tokens, cfg.compute_dtype)
        cos, sin = rope_tables(tokens.shape[1], cfg.head_dim, cfg.rope_theta)
        for block in self.layers:
            x = block(x, cos, sin)
        if positions is not None:
            x = jnp.take_along_axis(x, positions[:, None, None], axis=1)
        x = self.final_norm(x)
        return unembed(x, self.embed[...], None if cfg.tie_embeddings else self.lm_head[...])


@functools.lru_cache(maxsize=None)
def _graphdef_and_abstract_state(spec_json: str):
    spec = ArchSpec.from_json(spec_json)
    return nnx.split(nnx.eval_shape(lambda: CompactLlama(spec, rngs=nnx.Rngs(0))))


def abstract_compact_params(spec: ArchSpec) -> dict:
    """Shapes/dtypes of the compact model's parameters."""
    _, state = _graphdef_and_abstract_state(spec.shape_key())
    return nnx.to_pure_dict(state)


def apply_compact(spec: ArchSpec, params: dict, tokens: jax.Array,
                  positions: jax.Array | None = None) -> jax.Array:
    """Logits [B, T, V] (float32) of the compact model ([B, 1, V] at `positions` if given)."""
    graphdef, abstract_state = _graphdef_and_abstract_state(spec.shape_key())
    state = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)(tokens, positions)


def slice_params(params: dict, masks: Masks, cfg: ModelConfig) -> tuple[ArchSpec, dict]:
    """Physically slices the source's kept units into compact parameters (host numpy)."""
    masks = {k: np.asarray(v, bool) for k, v in masks.items()}
    spec = ArchSpec.from_masks(masks, cfg)
    params = jax.tree.map(np.asarray, params)
    hidden = np.flatnonzero(masks["hidden"])
    layers = params["layers"]
    out_layers = {}
    for l in range(cfg.num_layers):
        heads = np.flatnonzero(masks["heads"][l])
        kv = np.unique(heads // cfg.group_size)
        ffn = np.flatnonzero(masks["ffn"][l])
        attn, mlp = layers["attn"], layers["mlp"]
        out_layers[l] = {
            "attn_norm": {"scale": layers["attn_norm"]["scale"][l][hidden]},
            "mlp_norm": {"scale": layers["mlp_norm"]["scale"][l][hidden]},
            "attn": {
                "wq": attn["wq"][l][hidden][:, heads],
                "wk": attn["wk"][l][hidden][:, kv],
                "wv": attn["wv"][l][hidden][:, kv],
                "wo": attn["wo"][l][heads][:, :, hidden],
            },
            "mlp": {
                "w_gate": mlp["w_gate"][l][hidden][:, ffn],
                "w_up": mlp["w_up"][l][hidden][:, ffn],
                "w_down": mlp["w_down"][l][ffn][:, hidden],
            },
        }
    out = {"embed": params["embed"][:, hidden], "layers": out_layers,
           "final_norm": {"scale": params["final_norm"]["scale"][hidden]}}
    if not cfg.tie_embeddings:
        out["lm_head"] = params["lm_head"][hidden]
    return spec, out
