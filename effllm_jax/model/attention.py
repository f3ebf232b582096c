"""Causal self-attention cores: softmax(q k^T / sqrt(d)) v for q, k, v [B, T, H, head_dim].

The projections, RoPE, GQA grouping and the head mask live in llama.Attention; this module
only turns (q, k, v) with equal head counts into the per-head output, by one of:
  einsum       the reference: full [B, H, T, T] float32 scores (fastest for short sequences);
               on CPU run in query blocks that skip the keys above the diagonal, under one
               custom VJP (`_causal_core`)
  blockwise    flash-style in pure JAX: KV blocks with an online softmax and a custom VJP
               that recomputes scores per block; memory O(B H T block), any backend
  dot_product  jax.nn.dot_product_attention (cuDNN's fused kernel asked for on GPU, XLA elsewhere)
  splash       the Pallas splash-attention kernel on TPU (shard_map over the activation mesh)
  auto         splash on TPU (seq_len a multiple of 128), dot_product on GPU (bf16), else
               einsum up to `EINSUM_MAX_SEQ` tokens and blockwise beyond
All cores compute in float32 scores and cast probabilities to the compute dtype before the
value product, as the reference does; the head mask (applied by the caller to the output)
therefore acts identically whichever core runs.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from effllm_jax import sharding

KINDS = ("auto", "einsum", "blockwise", "dot_product", "splash")
EINSUM_MAX_SEQ = 1024  # 'auto' on CPU: above this, full scores cost more than blockwise saves
_NEG = -1e30  # finite "minus infinity": block 0 holds position 0, so no row is ever all-masked


def check_kind(kind: str, block: int) -> None:
    """Raises ValueError naming a bad `model.attention` / `model.attention_block`."""
    if kind not in KINDS:
        raise ValueError(f"model.attention={kind!r}; expected one of {KINDS}")
    if int(block) < 1:
        raise ValueError(f"model.attention_block={block} must be >= 1")


def resolve(kind: str, seq_len: int, dtype, platform: str | None = None) -> str:
    """The concrete core that `kind` means for this sequence length, dtype and platform."""
    if kind != "auto":
        return kind
    platform = sharding.current_platform() if platform is None else platform
    if platform == "tpu" and seq_len % 128 == 0:
        return "splash"
    if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "dot_product"
    return "einsum" if seq_len <= EINSUM_MAX_SEQ else "blockwise"


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, kind: str = "einsum",
                     block: int = 512, heads_first: bool = False) -> jax.Array:
    """Causal attention [B, T, H, hd] from q, k, v [B, T, H, hd] (same head count); with
    `heads_first`, all four are [B, H, T, hd] (splash's own layout: no transposes around it)."""
    if heads_first:
        if resolve(kind, q.shape[2], q.dtype) == "splash":
            return splash_attention(q, k, v, block, heads_first=True)
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
        return causal_attention(q, k, v, kind, block).transpose(0, 2, 1, 3)
    kind = resolve(kind, q.shape[1], q.dtype)
    if kind == "einsum":
        return einsum_attention(q, k, v)
    if kind == "blockwise":
        return blockwise_attention(q, k, v, block)
    if kind == "dot_product":
        return dot_product_attention(q, k, v)
    if kind == "splash":
        return splash_attention(q, k, v, block)
    raise ValueError(f"unknown attention kind {kind!r}; expected one of {KINDS}")


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """jax.nn.dot_product_attention, asking for cuDNN's fused kernel on GPU in half precision:
    the default (`implementation=None`) runs the XLA path there, which materialises the
    scores (measured on an H200, bench/accelerator.py: 6.5x slower fwd+bwd at 2048 tokens).
    Shapes cuDNN does not take fall back to that XLA path."""
    if sharding.current_platform() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        except (NotImplementedError, ValueError, RuntimeError):
            pass  # e.g. a head_dim cuDNN does not support
    return jax.nn.dot_product_attention(q, k, v, is_causal=True).astype(q.dtype)


def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """The reference: full float32 scores [B, H, T, T] (on CPU in query blocks that skip the
    scores above the diagonal, under one custom VJP: `_causal_core`)."""
    dtype = q.dtype
    # Scale q (B T H hd), not the scores (B H T T); heads-first operands give XLA:CPU plain
    # batched matmuls (the token-major einsum ran the forward ~3x slower at 8x256 tokens).
    q = q * np.float32(1.0 / np.sqrt(q.shape[-1])).astype(dtype)
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    if sharding.current_platform() == "cpu":
        return _causal_core(q, k, v, CPU_QUERY_BLOCK).transpose(0, 2, 1, 3)
    return reference_core(q, k, v).transpose(0, 2, 1, 3)


def reference_core(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal softmax(q kᵀ) v over full scores, for heads-first q (already scaled), k, v
    [B, H, T, hd], differentiated by autodiff."""
    scores = jnp.einsum("bhtk,bhsk->bhts", q, k, preferred_element_type=jnp.float32)
    seq_len = q.shape[2]
    causal = np.tril(np.ones((seq_len, seq_len), dtype=bool))
    scores = jnp.where(causal[None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bhts,bhsk->bhtk", probs, v)


# ----------------------------------------------------------------------------------------
# The einsum core on CPU: query blocks that skip the keys above the diagonal, one custom VJP.
# Block i of the queries reads only keys 0..end_i, so at T=256 in two blocks the [B, H, T, T]
# score, softmax and gradient passes shrink to 3/4, and the backward reuses the saved
# probabilities in one fused pass, ds = p (dp - delta), where autodiff's softmax, mask and
# division gradients took several (8m step: 10% less time, bench/RESULTS.md "fourth pass").
# ----------------------------------------------------------------------------------------

CPU_QUERY_BLOCK = 128  # rows per query block (a shorter or indivisible sequence: one block)


def _query_blocks(t: int, block: int) -> list[tuple[int, int]]:
    """(start, end) rows of each query block."""
    if t <= block or t % block:
        return [(0, t)]
    return [(start, start + block) for start in range(0, t, block)]


def _block_probs(q_blk, k_keys, start):
    """Causal softmax probabilities [B, H, tq, end] of one query block (rows start..end-1)
    against the keys 0..end-1, in float32."""
    tq, tk = q_blk.shape[2], k_keys.shape[2]
    s = jnp.einsum("bhtk,bhsk->bhts", q_blk, k_keys, preferred_element_type=jnp.float32)
    causal = (np.arange(tk)[None, :] <= start + np.arange(tq)[:, None])
    s = jnp.where(causal, s, jnp.finfo(jnp.float32).min)
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    return e * (1.0 / jnp.sum(e, axis=-1, keepdims=True))


def _core_forward(q, k, v, block):
    outs, probs = [], []
    for start, end in _query_blocks(q.shape[2], block):
        p = _block_probs(q[:, :, start:end], k[:, :, :end], start)
        outs.append(jnp.einsum("bhts,bhsk->bhtk", p.astype(v.dtype), v[:, :, :end]))
        probs.append(p)
    return jnp.concatenate(outs, axis=2), probs


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _causal_core(q, k, v, block):
    """`reference_core` in query blocks of `block` rows, with its own backward."""
    return _core_forward(q, k, v, block)[0]


def _causal_core_fwd(q, k, v, block):
    out, probs = _core_forward(q, k, v, block)
    return out, (q, k, v, out, probs)


def _causal_core_bwd(block, residuals, d_out):
    q, k, v, out, probs = residuals
    t = q.shape[2]
    # Row term of the softmax gradient: sum_s p ds = d_out · out (flash attention's delta).
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    dq, dk, dv = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    # Products in the operands' dtype, as autodiff's are (XLA:CPU has no bf16 x bf16 = f32
    # dot thunk); sums over blocks in float32.
    f32 = lambda x: x.astype(jnp.float32)
    for (start, end), p in zip(_query_blocks(t, block), probs):
        do_blk = d_out[:, :, start:end]
        dp = f32(jnp.einsum("bhtk,bhsk->bhts", do_blk, v[:, :, :end]))
        ds = (p * (dp - delta[:, :, start:end])).astype(q.dtype)
        dq.append(jnp.einsum("bhts,bhsk->bhtk", ds, k[:, :, :end]))
        pad = ((0, 0), (0, 0), (0, t - end), (0, 0))
        dk = dk + jnp.pad(f32(jnp.einsum("bhts,bhtk->bhsk", ds, q[:, :, start:end])), pad)
        dv = dv + jnp.pad(f32(jnp.einsum("bhts,bhtk->bhsk", p.astype(v.dtype), do_blk)), pad)
    dq = jnp.concatenate(dq, axis=2)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_causal_core.defvjp(_causal_core_fwd, _causal_core_bwd)


# ----------------------------------------------------------------------------------------
# Blockwise (flash-style) attention in pure JAX.
# ----------------------------------------------------------------------------------------

def _kv_blocks(x: jax.Array, block: int) -> jax.Array:
    """[B, S, H, hd] -> [S/block, B, H, block, hd] (the scan runs over KV blocks)."""
    b, s, h, d = x.shape
    return x.reshape(b, s // block, block, h, d).transpose(1, 0, 3, 2, 4)


def _block_scores(q, k_blk, j, block, scale):
    """Masked float32 scores [B, H, T, block] of all queries against KV block j."""
    s = jnp.einsum("bhtd,bhsd->bhts", q, k_blk, preferred_element_type=jnp.float32) * scale
    q_pos = jnp.arange(q.shape[2])[:, None]
    k_pos = j * block + jnp.arange(block)[None, :]
    return jnp.where(k_pos <= q_pos, s, _NEG)


def _flash_forward(q, k, v, block):
    """(output [B, H, T, hd], logsumexp [B, H, T]) with q, k, v in [B, H, T, hd]."""
    b, h, t, d = q.shape
    scale = 1.0 / np.sqrt(d)
    ks, vs = _kv_blocks(k.transpose(0, 2, 1, 3), block), _kv_blocks(v.transpose(0, 2, 1, 3), block)

    def step(carry, xs):
        out, row_max, row_sum = carry
        j, k_blk, v_blk = xs
        s = _block_scores(q, k_blk, j, block, scale)
        new_max = jnp.maximum(row_max, jnp.max(s, axis=-1))
        p = jnp.exp(s - new_max[..., None])
        correction = jnp.exp(row_max - new_max)
        row_sum = row_sum * correction + jnp.sum(p, axis=-1)
        pv = jnp.einsum("bhts,bhsd->bhtd", p.astype(v.dtype), v_blk,
                        preferred_element_type=jnp.float32)
        return (out * correction[..., None] + pv, new_max, row_sum), None

    init = (jnp.zeros((b, h, t, d), jnp.float32), jnp.full((b, h, t), -jnp.inf, jnp.float32),
            jnp.zeros((b, h, t), jnp.float32))
    (out, row_max, row_sum), _ = jax.lax.scan(step, init, (jnp.arange(ks.shape[0]), ks, vs))
    return (out / row_sum[..., None]).astype(q.dtype), row_max + jnp.log(row_sum)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash(q, k, v, block):
    return _flash_forward(q, k, v, block)[0]


def _flash_fwd(q, k, v, block):
    out, lse = _flash_forward(q, k, v, block)
    return out, (q, k, v, out, lse)


def _flash_bwd(block, residuals, d_out):
    q, k, v, out, lse = residuals
    scale = 1.0 / np.sqrt(q.shape[-1])
    ks, vs = _kv_blocks(k.transpose(0, 2, 1, 3), block), _kv_blocks(v.transpose(0, 2, 1, 3), block)
    d_out32 = d_out.astype(jnp.float32)
    delta = jnp.sum(d_out32 * out.astype(jnp.float32), axis=-1)  # [B, H, T]

    def step(dq, xs):
        j, k_blk, v_blk = xs
        p = jnp.exp(_block_scores(q, k_blk, j, block, scale) - lse[..., None])
        dv = jnp.einsum("bhts,bhtd->bhsd", p.astype(d_out.dtype), d_out,
                        preferred_element_type=jnp.float32)
        dp = jnp.einsum("bhtd,bhsd->bhts", d_out, v_blk, preferred_element_type=jnp.float32)
        ds = (p * (dp - delta[..., None]) * scale).astype(q.dtype)
        dq = dq + jnp.einsum("bhts,bhsd->bhtd", ds, k_blk, preferred_element_type=jnp.float32)
        dk = jnp.einsum("bhts,bhtd->bhsd", ds, q, preferred_element_type=jnp.float32)
        return dq, (dk, dv)

    dq, (dks, dvs) = jax.lax.scan(step, jnp.zeros(q.shape, jnp.float32),
                                  (jnp.arange(ks.shape[0]), ks, vs))

    def unblock(x):  # [S/block, B, H, block, hd] -> [B, H, S, hd]
        n, b, h, blk, d = x.shape
        return x.transpose(1, 2, 0, 3, 4).reshape(b, h, n * blk, d)

    return dq.astype(q.dtype), unblock(dks).astype(k.dtype), unblock(dvs).astype(v.dtype)


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, block: int = 512) -> jax.Array:
    """Flash-style causal attention: never more than [B, H, T, block] scores at once."""
    seq_len = q.shape[1]
    block = min(block, seq_len)
    pad = -seq_len % block
    if pad:  # padded keys sit after every query, so causality already hides them
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    heads_first = [x.transpose(0, 2, 1, 3) for x in (q, k, v)]
    out = _flash(*heads_first, block).transpose(0, 2, 1, 3)
    return out[:, :seq_len]


# ----------------------------------------------------------------------------------------
# Splash attention (Pallas, TPU only).
# ----------------------------------------------------------------------------------------

def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, block: int = 512,
                     heads_first: bool = False) -> jax.Array:
    """The TPU splash kernel, run per shard of the activation mesh (batch and heads), on
    [B, T, H, hd] (heads_first: [B, H, T, hd], the kernel's layout, taken as is)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash, splash_attention_mask as mask_lib)
    b, t, h, d = q.shape
    if heads_first:
        h, t = t, h
    blk = min(block, t)
    if t % blk or blk % 128:
        raise ValueError(f"splash attention needs seq_len ({t}) to be a multiple of a block "
                         f"(model.attention_block={block}) that is a multiple of 128")
    axes = ("batch", "heads", None, None) if heads_first else ("batch", None, "heads", None)
    spec = sharding.activation_spec(axes, q.shape)
    mesh = sharding.current_mesh()
    head_spec = None if spec is None else spec[axes.index("heads")]
    head_shards = 1 if mesh is None or head_spec is None else _axis_size(mesh, head_spec)
    local_heads = h // head_shards
    mask = mask_lib.MultiHeadMask([mask_lib.CausalMask((t, t))] * local_heads)
    sizes = splash.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk,
                              block_kv_dkv=blk, block_kv_dkv_compute=blk, block_q_dq=blk,
                              block_kv_dq=blk)
    kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1)
    scale = 1.0 / np.sqrt(d)

    def local(q, k, v):  # per shard; the kernel runs on [h, t, d] per row
        if heads_first:
            return jax.vmap(kernel)(q * scale, k, v).astype(q.dtype)
        qh, kh, vh = ((x.transpose(0, 2, 1, 3)) for x in (q * scale, k, v))
        return jax.vmap(kernel)(qh, kh, vh).transpose(0, 2, 1, 3).astype(q.dtype)

    if mesh is None:
        return local(q, k, v)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                         check_vma=False)(q, k, v)


def _axis_size(mesh, axes) -> int:
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return int(np.prod([mesh.shape[a] for a in axes]))
