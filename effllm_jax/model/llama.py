"""The Llama-family decoder (RoPE, GQA, SwiGLU, RMSNorm) with structured pruning masks.

One set of Flax NNX modules serves two models:
  * `Llama`: the dense *source* model. Its layers are stacked (leading `layers` axis) and
    scanned; pruning is expressed by tiny structured masks passed to `__call__`.
  * `CompactLlama` (model/compact.py): the physically sliced model, one `Block` per layer,
    each with its own head count, KV grouping and FFN width.

Masks act on activations, so a masked model computes exactly what its sliced twin computes
and pruned weights receive exactly zero gradient:
  hidden mask  [D]    residual-stream channels; RMSNorm statistics use kept channels only
  head mask    [L, H] query heads (a KV head is dead once all its query heads are)
  ffn mask     [L, F] SwiGLU channels
Every parameter carries logical axis names (`axes` metadata); sharding.py maps them to the mesh,
and activations are constrained by the same names (`sharding.constrain`, a no-op without a mesh).
The attention core (einsum, blockwise, fused kernels) lives in model/attention.py; the linear
projections go through model/projection.py (on CPU, weight gradients without transposed copies).

With `stats_block` set, the source model also returns the summed second moments x xᵀ of the
inputs of every linear layer whose input channels can be pruned (block-diagonal, blocks of
`stats_block`), under stop_gradient: the statistics of OBS compensation (pruning/compensate.py).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effllm_jax.model import attention as attention_lib
from effllm_jax.model.projection import project
from effllm_jax.sharding import constrain

Masks = dict[str, jax.Array]  # {'hidden': [D], 'heads': [L, H], 'ffn': [L, F]}, bool


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of the source model (hashable: used as a static jit argument)."""

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_dim: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dtype: str = "float32"  # compute dtype; parameters are always float32
    remat: str = "none"  # 'none' | 'full' | 'dots' (save matmul outputs)
    scan_layers: bool = True
    init_std: float = 0.02
    attention: str = "auto"  # attention core, see model/attention.py KINDS
    attention_block: int = 512  # KV block of the blockwise/splash cores
    mlp_chunk: int = 0  # SwiGLU over token chunks of this size, each recomputed in the backward
    # (only one chunk's [B, chunk, ffn] intermediates live); 0 = the whole sequence at once

    @classmethod
    def from_config(cls, model_config: Any) -> "ModelConfig":
        """From an ml_collections ConfigDict (or any mapping) with the same field names."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = dict(model_config)
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"unknown model config field(s) {unknown}; known: {sorted(fields)}")
        return cls(**values)

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float) -> jax.Array:
    return std * jax.random.normal(rngs.params(), shape, jnp.float32)


def stats_block_size(n: int, obs_block: int) -> int:
    """Block size of a second moment over n inputs: n (full) when obs_block is 0, else the
    largest divisor of n that is <= obs_block (block-diagonal)."""
    if obs_block <= 0 or obs_block >= n:
        return n
    return max(b for b in range(1, obs_block + 1) if n % b == 0)


def second_moment(x: jax.Array, obs_block: int) -> jax.Array:
    """sum over tokens of x xᵀ for x [..., n], block-diagonal: [n/b, b, b] float32, no gradient."""
    x = jax.lax.stop_gradient(x)
    n = x.shape[-1]
    b = stats_block_size(n, obs_block)
    x = x.reshape(-1, n // b, b)
    return jnp.einsum("tki,tkj->kij", x, x, preferred_element_type=jnp.float32)


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [T, head_dim/2] in the Hugging Face (rotate-half) pairing."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    angles = np.arange(seq_len, dtype=np.float32)[:, None] * inv_freq[None, :]
    return jnp.asarray(np.cos(angles)), jnp.asarray(np.sin(angles))


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, seq_axis: int = 1) -> jax.Array:
    """Rotates pairs (i, i + head_dim/2) of x [B, T, heads, head_dim] (seq_axis=2:
    [B, heads, T, head_dim])."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    table_shape = [1] * x.ndim
    table_shape[seq_axis], table_shape[-1] = cos.shape
    cos, sin = cos.reshape(table_shape), sin.reshape(table_shape)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def expand_kv(x: jax.Array, kv_index: tuple[int, ...], head_axis: int = 2) -> jax.Array:
    """KV heads [B, T, KV, hd] -> one per query head [B, T, H, hd] (head h reads kv_index[h];
    head_axis=1: [B, KV, T, hd] -> [B, H, T, hd])."""
    kv_heads, heads = x.shape[head_axis], len(kv_index)
    group = heads // max(kv_heads, 1)  # a layer may have lost every head
    if kv_heads and heads == group * kv_heads and kv_index == tuple(
            h // group for h in range(heads)):
        # Contiguous equal groups (every source model): a repeat, whose gradient is a sum;
        # jnp.take's is a scatter-add, ~4x slower on XLA:CPU.
        return jnp.repeat(x, group, axis=head_axis)
    return jnp.take(x, np.asarray(kv_index, dtype=np.int32), axis=head_axis)


class RMSNorm(nnx.Module):
    """RMSNorm whose statistics run over the kept hidden channels only."""

    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), axes=("embed",))
        self.eps = eps

    def __call__(self, x: jax.Array, hidden_mask: jax.Array | None = None) -> jax.Array:
        x32 = x.astype(jnp.float32)
        if hidden_mask is None:
            mean_square = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        else:
            x32 = x32 * hidden_mask
            kept = jnp.maximum(jnp.sum(hidden_mask), 1.0)
            mean_square = jnp.sum(x32 * x32, axis=-1, keepdims=True) / kept
        y = x32 * jax.lax.rsqrt(mean_square + self.eps) * self.scale[...]
        return y.astype(x.dtype)


class Attention(nnx.Module):
    """Causal GQA self-attention; `kv_index[h]` names the KV head that query head h reads."""

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 kv_index: tuple[int, ...], init_std: float, out_std: float, *, rngs: nnx.Rngs,
                 core: str = "einsum", block: int = 512):
        self.wq = nnx.Param(_normal(rngs, (d_model, num_heads, head_dim), init_std),
                            axes=("embed", "heads", "head_dim"))
        self.wk = nnx.Param(_normal(rngs, (d_model, num_kv_heads, head_dim), init_std),
                            axes=("embed", "kv_heads", "head_dim"))
        self.wv = nnx.Param(_normal(rngs, (d_model, num_kv_heads, head_dim), init_std),
                            axes=("embed", "kv_heads", "head_dim"))
        self.wo = nnx.Param(_normal(rngs, (num_heads, head_dim, d_model), out_std),
                            axes=("heads", "head_dim", "embed"))
        self.kv_index = tuple(int(i) for i in kv_index)
        self.core, self.block = core, int(block)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array,
                 head_mask: jax.Array | None = None, stats_block: int | None = None):
        dtype = x.dtype
        # Splash reads [B, H, T, hd]: projecting straight into it leaves no transposes around
        # RoPE and the kernel (on TPU each was a materialised, lane-padded copy per q/k/v).
        heads_first = attention_lib.resolve(self.core, x.shape[1], dtype) == "splash"
        head_axis, seq_axis = (1, 2) if heads_first else (2, 1)
        heads = (("batch", "heads", None, "head_dim") if heads_first
                 else ("batch", None, "heads", "head_dim"))
        weights = tuple(w[...].astype(dtype) for w in (self.wq, self.wk, self.wv))
        if heads_first:
            q, k, v = (jnp.einsum("btd,dhk->bhtk", x, w) for w in weights)
        else:  # weight gradients without transposed copies on CPU (model/projection.py)
            q, k, v = (project(x, w) for w in weights)
        q = constrain(q, heads)
        q, k = apply_rope(q, cos, sin, seq_axis), apply_rope(k, cos, sin, seq_axis)
        k, v = expand_kv(k, self.kv_index, head_axis), expand_kv(v, self.kv_index, head_axis)
        k, v = constrain(k, heads), constrain(v, heads)
        out = attention_lib.causal_attention(q, k, v, self.core, self.block, heads_first)
        if head_mask is not None:
            shape = [1, 1, 1, 1]
            shape[head_axis] = -1
            out = out * head_mask.astype(dtype).reshape(shape)
        out = constrain(out, heads)
        wo = self.wo[...].astype(dtype)
        y = (jnp.einsum("bhtk,hkd->btd", out, wo) if heads_first
             else project(out, wo, in_dims=2))
        y = constrain(y, ("batch", None, "embed"))
        if stats_block is None:
            return y
        o_in = out.transpose(0, 2, 1, 3) if heads_first else out  # [B, T, H, hd], as wo reads
        return y, second_moment(o_in.reshape(*o_in.shape[:2], -1), stats_block)


def _swiglu_hidden(x: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                   ffn_mask: jax.Array | None) -> jax.Array:
    """silu(x w_gate) * (x w_up), pruned channels zeroed: the input of the down projection."""
    h = jax.nn.silu(project(x, w_gate)) * project(x, w_up)
    return h if ffn_mask is None else h * ffn_mask.astype(x.dtype)


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate x) * up x)."""

    def __init__(self, d_model: int, ffn_dim: int, init_std: float, out_std: float, *,
                 rngs: nnx.Rngs, chunk: int = 0):
        self.chunk = chunk  # ModelConfig.mlp_chunk
        self.w_gate = nnx.Param(_normal(rngs, (d_model, ffn_dim), init_std), axes=("embed", "mlp"))
        self.w_up = nnx.Param(_normal(rngs, (d_model, ffn_dim), init_std), axes=("embed", "mlp"))
        self.w_down = nnx.Param(_normal(rngs, (ffn_dim, d_model), out_std), axes=("mlp", "embed"))

    def __call__(self, x: jax.Array, ffn_mask: jax.Array | None = None,
                 stats_block: int | None = None):
        dtype = x.dtype
        tokens = x.shape[1]
        if stats_block is None and 0 < self.chunk < tokens and tokens % self.chunk == 0:
            return self._chunked(x, ffn_mask)
        h = constrain(_swiglu_hidden(x, self.w_gate[...].astype(dtype),
                                     self.w_up[...].astype(dtype), ffn_mask), ("batch", None, "mlp"))
        y = constrain(project(h, self.w_down[...].astype(dtype)), ("batch", None, "embed"))
        return y if stats_block is None else (y, second_moment(h, stats_block))

    def _chunked(self, x: jax.Array, ffn_mask: jax.Array | None) -> jax.Array:
        """The same SwiGLU, a chunk of tokens at a time, each chunk rematerialised: the
        [B, T, ffn] gate/up/product buffers of a long sequence never live together (on TPU
        they were the largest per-row buffers at the step's memory peak)."""
        dtype = x.dtype
        w_gate, w_up, w_down = (w[...].astype(dtype) for w in (self.w_gate, self.w_up, self.w_down))

        @jax.checkpoint
        def piece(xc):
            return project(_swiglu_hidden(xc, w_gate, w_up, ffn_mask), w_down)

        b, t, d = x.shape
        chunks = x.reshape(b, t // self.chunk, self.chunk, d).swapaxes(0, 1)
        y = jax.lax.map(piece, chunks).swapaxes(0, 1).reshape(b, t, -1)
        return constrain(y, ("batch", None, "embed"))


class Block(nnx.Module):
    """One pre-norm decoder layer."""

    def __init__(self, cfg: ModelConfig, d_model: int, num_heads: int, num_kv_heads: int,
                 kv_index: tuple[int, ...], ffn_dim: int, *, rngs: nnx.Rngs):
        out_std = cfg.init_std / np.sqrt(2 * cfg.num_layers)
        self.attn_norm = RMSNorm(d_model, cfg.norm_eps)
        self.attn = Attention(d_model, num_heads, num_kv_heads, cfg.head_dim, kv_index,
                              cfg.init_std, out_std, rngs=rngs, core=cfg.attention,
                              block=cfg.attention_block)
        self.mlp_norm = RMSNorm(d_model, cfg.norm_eps)
        self.mlp = MLP(d_model, ffn_dim, cfg.init_std, out_std, rngs=rngs, chunk=cfg.mlp_chunk)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array,
                 hidden_mask: jax.Array | None = None, head_mask: jax.Array | None = None,
                 ffn_mask: jax.Array | None = None, stats_block: int | None = None):
        x = constrain(x, ("batch", None, "embed"))
        if stats_block is None:
            x = x + self.attn(self.attn_norm(x, hidden_mask), cos, sin, head_mask)
            return x + self.mlp(self.mlp_norm(x, hidden_mask), ffn_mask)
        # Statistics: second moments of the inputs of q/k/v, o, gate/up and down.
        attn_in = self.attn_norm(x, hidden_mask)
        attn_out, o_in = self.attn(attn_in, cos, sin, head_mask, stats_block)
        x = x + attn_out
        mlp_in = self.mlp_norm(x, hidden_mask)
        mlp_out, down_in = self.mlp(mlp_in, ffn_mask, stats_block)
        return x + mlp_out, {"attn_in": second_moment(attn_in, stats_block), "o_in": o_in,
                             "mlp_in": second_moment(mlp_in, stats_block), "down_in": down_in}


REMAT_POLICIES = ("none", "full", "dots")


def _remat(fn, policy: str):
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn)
    if policy == "dots":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    raise ValueError(f"model.remat={policy!r}; expected 'none', 'full' or 'dots'")


def embed_tokens(embed: jax.Array, tokens: jax.Array, dtype) -> jax.Array:
    """Token embeddings [B, T, D] in the compute dtype, rows laid out like the batch."""
    tokens = constrain(tokens, ("batch", None))
    return constrain(jnp.take(embed, tokens, axis=0).astype(dtype), ("batch", None, "embed"))


def unembed(x: jax.Array, embed: jax.Array, lm_head: jax.Array | None) -> jax.Array:
    """Logits in float32, through the tied embedding or the separate head."""
    weight = embed.T if lm_head is None else lm_head
    logits = jnp.einsum("btd,dv->btv", x, weight.astype(x.dtype),
                        preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", None, "vocab"))


class Llama(nnx.Module):
    """The dense source model with stacked, scanned layers and mask inputs."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Param(_normal(rngs, (cfg.vocab_size, cfg.d_model), cfg.init_std),
                               axes=("vocab", "embed"))
        kv_index = tuple(h // cfg.group_size for h in range(cfg.num_heads))

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(rngs: nnx.Rngs) -> Block:
            return Block(cfg, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, kv_index,
                         cfg.ffn_dim, rngs=rngs)

        self.layers = make_layers(rngs)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.lm_head = nnx.Param(_normal(rngs, (cfg.d_model, cfg.vocab_size), cfg.init_std),
                                     axes=("embed", "vocab"))

    def __call__(self, tokens: jax.Array, masks: Masks | None = None,
                 stats_block: int | None = None, return_hidden: bool = False):
        """Logits [B, T, V] (with return_hidden: the final-norm hidden states [B, T, D]), and
        with stats_block also the OBS input statistics: (out, stats)."""
        cfg = self.cfg
        dtype = cfg.compute_dtype
        hidden = None if masks is None else masks["hidden"].astype(jnp.float32)
        x = embed_tokens(self.embed[...], tokens, dtype)
        if hidden is not None:
            x = x * hidden.astype(dtype)
        cos, sin = rope_tables(tokens.shape[1], cfg.head_dim, cfg.rope_theta)
        if masks is None:
            layer_masks = (jnp.ones((cfg.num_layers, cfg.num_heads), bool),
                           jnp.ones((cfg.num_layers, cfg.ffn_dim), bool))
        else:
            layer_masks = (masks["heads"], masks["ffn"])
        graphdef, layer_state = nnx.split(self.layers)

        def layer(x, layer_state, head_mask, ffn_mask):
            block = nnx.merge(graphdef, layer_state)
            out = block(x, cos, sin, hidden, head_mask if masks is not None else None,
                        ffn_mask if masks is not None else None, stats_block)
            return (out, None) if stats_block is None else out  # (x, this layer's statistics)

        layer = _remat(layer, cfg.remat)
        if cfg.scan_layers:
            x, stats = jax.lax.scan(lambda x, xs: layer(x, *xs), x, (layer_state, *layer_masks))
        else:
            per_layer = []
            for i in range(cfg.num_layers):
                xs = jax.tree.map(lambda a: a[i], (layer_state, *layer_masks))
                x, layer_stats = layer(x, *xs)
                per_layer.append(layer_stats)
            stats = jax.tree.map(lambda *a: jnp.stack(a), *per_layer)
        x = self.final_norm(x, hidden)
        out = x if return_hidden else unembed(x, self.embed[...],
                                              None if cfg.tie_embeddings else self.lm_head[...])
        if stats_block is None:
            return out
        if not cfg.tie_embeddings:  # the untied head's input; a tied table is not compensated
            stats["final_in"] = second_moment(x, stats_block)
        return out, stats


# ----------------------------------------------------------------------------------------
# Functional boundary: the train state holds parameters as a plain nested dict of arrays.
# ----------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _graphdef_and_abstract_state(cfg: ModelConfig):
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    return nnx.split(abstract)


def init_params(cfg: ModelConfig, key: jax.Array) -> dict:
    """Fresh float32 parameters as a plain nested dict (call under jit to create them sharded)."""
    model = Llama(cfg, rngs=nnx.Rngs(params=key))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def abstract_params(cfg: ModelConfig) -> dict:
    """Shapes/dtypes of the parameters, without allocating them."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def param_axes(cfg: ModelConfig) -> dict:
    """Logical axis names of every parameter; stacked layer parameters lead with 'layers'."""
    _, state = _graphdef_and_abstract_state(cfg)

    def axes_of(path, variable):
        axes = tuple(variable.get_metadata()["axes"])
        return ("layers",) + axes if path[0] == "layers" else axes

    return nnx.to_pure_dict(nnx.map_state(axes_of, state))


def _bound(cfg: ModelConfig, params: dict) -> Llama:
    """The model of `cfg` holding `params` (a plain nested dict)."""
    graphdef, abstract_state = _graphdef_and_abstract_state(cfg)
    state = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def apply(cfg: ModelConfig, params: dict, tokens: jax.Array, masks: Masks | None = None,
          stats_block: int | None = None):
    """Logits [B, T, V] (float32) of the source model with optional pruning masks; with
    `stats_block`, (logits, input second moments) for OBS compensation."""
    return _bound(cfg, params)(tokens, masks, stats_block)


def hidden_states(cfg: ModelConfig, params: dict, tokens: jax.Array,
                  masks: Masks | None = None, stats_block: int | None = None):
    """Final-norm hidden states [B, T, D] (compute dtype): `apply` without the unembedding
    (with `stats_block`, (hidden, input second moments))."""
    return _bound(cfg, params)(tokens, masks, stats_block, return_hidden=True)


def logits_from_hidden(cfg: ModelConfig, params: dict, x: jax.Array) -> jax.Array:
    """float32 logits of hidden states x [..., T, D]: the unembedding that `apply` ends with."""
    return unembed(x, params["embed"], None if cfg.tie_embeddings else params["lm_head"])


def full_masks(cfg: ModelConfig) -> Masks:
    """Masks that keep every unit."""
    return {
        "hidden": jnp.ones((cfg.d_model,), bool),
        "heads": jnp.ones((cfg.num_layers, cfg.num_heads), bool),
        "ffn": jnp.ones((cfg.num_layers, cfg.ffn_dim), bool),
    }
