"""Next-token negative log-likelihood: one definition for training, eval loss and perplexity.

`token_nll` is the definition. `chunked_token_nll` computes the same sum from hidden states,
a slice of tokens at a time, so the whole [B, T, V] float32 logits never exist at once: each
chunk's logits are recomputed in the backward pass (jax.checkpoint) instead of being kept.
`unembed_nll` (what training uses) fuses the unembedding with it under one custom gradient:
per chunk the logits are computed once, and the loss, d(logits) = softmax - onehot, d(hidden)
and d(table) come out of the same pass; the backward only scales them by the cotangent.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from effllm_jax import sharding


def token_nll(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None
              ) -> tuple[jax.Array, jax.Array]:
    """(sum of -log p(target), number of weighted targets) for logits [..., V], targets [...].

    Pure and jittable; the train step's loss is sum / count.
    """
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), -1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
    if weights is None:
        weights = jnp.ones_like(nll)
    weights = weights.astype(jnp.float32)
    return jnp.sum(nll * weights), jnp.sum(weights)


def chunked_token_nll(hidden: jax.Array, targets: jax.Array,
                      logits_fn: Callable[[jax.Array], jax.Array], chunk: int
                      ) -> tuple[jax.Array, jax.Array]:
    """`token_nll(logits_fn(hidden), targets)` for hidden [B, T, D], `chunk` positions at a time.

    Rows stay whole (the batch axis keeps its sharding); the sequence is cut into pieces of
    `chunk` positions (the last one padded with zero-weight targets). chunk >= T is one piece.
    """
    if chunk <= 0 or chunk >= hidden.shape[1]:
        return token_nll(logits_fn(hidden), targets)
    hidden, targets, weights = _pad_to_chunks(hidden, targets, chunk)

    @jax.checkpoint
    def piece_nll(h, t, w):
        return token_nll(logits_fn(h), t, w)

    def body(totals, xs):
        total, count = piece_nll(*xs)
        return (totals[0] + total, totals[1] + count), None

    zero = jnp.zeros((), jnp.float32)
    (total, count), _ = jax.lax.scan(
        body, (zero, zero), tuple(_split_positions(x, chunk) for x in (hidden, targets, weights)))
    return total, count


def _pad_to_chunks(hidden: jax.Array, targets: jax.Array, chunk: int
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(hidden, targets, weights) with the sequence padded to a multiple of `chunk` by
    zero-weight positions (no loss, no gradient); weights are 1 elsewhere."""
    pad = -hidden.shape[1] % chunk
    weights = jnp.ones(targets.shape, jnp.float32)
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets, weights = (jnp.pad(x, ((0, 0), (0, pad))) for x in (targets, weights))
    return hidden, targets, weights


def _split_positions(x: jax.Array, chunk: int) -> jax.Array:
    """[B, T, ...] -> [T / chunk, B, chunk, ...] (T a multiple of chunk)."""
    pieces = x.shape[1] // chunk
    return jnp.moveaxis(x.reshape(x.shape[0], pieces, chunk, *x.shape[2:]), 1, 0)


def _piece_nll_and_grads(hidden, table, targets, weights):
    """(sum of weighted nll, d sum/d hidden, d sum/d table) of one piece: hidden [B, c, D],
    table [V, D], targets/weights [B, c]."""
    dtype = hidden.dtype
    table_c = table.astype(dtype)
    logits = jnp.einsum("bcd,vd->bcv", hidden, table_c, preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), -1)[..., 0]
    total = jnp.sum((lse - target_logit) * weights)
    is_target = jnp.arange(logits.shape[-1], dtype=jnp.int32) == targets[..., None]
    probs = jnp.exp(logits - lse[..., None])
    dlogits = jnp.where(is_target, probs - 1.0, probs) * weights[..., None]
    d_hidden = jnp.einsum("bcv,vd->bcd", dlogits.astype(dtype), table_c,
                          preferred_element_type=jnp.float32)
    if dtype != jnp.float32 and sharding.current_platform() == "cpu":
        # XLA:CPU folds the transpose below into a dot it has no bf16 x bf16 = f32 kernel
        # for (UNIMPLEMENTED at run time): there this product takes float32 operands.
        hidden = hidden.astype(jnp.float32)
    else:
        dlogits = dlogits.astype(dtype)
    # [D, V] then transposed: summing over positions with dlogits as the right operand keeps
    # it in its own layout (XLA:CPU otherwise copies all of [B*c, V] transposed first).
    d_table = jnp.einsum("bcd,bcv->dv", hidden, dlogits, preferred_element_type=jnp.float32).T
    return total, d_hidden.astype(dtype), d_table


def _unembed_nll_with_grads(hidden, table, targets, weights, chunk):
    """(total, d total/d hidden, d total/d table), `chunk` positions at a time."""
    if chunk >= hidden.shape[1]:
        return _piece_nll_and_grads(hidden, table, targets, weights)

    def body(carry, xs):
        total, d_table = carry
        piece_total, d_hidden, piece_d_table = _piece_nll_and_grads(xs[0], table, *xs[1:])
        return (total + piece_total, d_table + piece_d_table), d_hidden

    zero = (jnp.zeros((), jnp.float32), jnp.zeros(table.shape, jnp.float32))
    (total, d_table), d_hidden = jax.lax.scan(
        body, zero, tuple(_split_positions(x, chunk) for x in (hidden, targets, weights)))
    d_hidden = jnp.moveaxis(d_hidden, 0, 1).reshape(hidden.shape)
    return total, d_hidden, d_table


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _unembed_nll(hidden, table, targets, weights, chunk):
    """The primal (no gradient asked for): the loss alone, one piece of logits at a time."""
    def piece_total(h, t, w):
        logits = jnp.einsum("bcd,vd->bcv", h, table.astype(h.dtype),
                            preferred_element_type=jnp.float32)
        return token_nll(logits, t, w)[0]

    if chunk >= hidden.shape[1]:
        return piece_total(hidden, targets, weights)
    totals = jax.lax.map(lambda xs: piece_total(*xs),
                         tuple(_split_positions(x, chunk) for x in (hidden, targets, weights)))
    return jnp.sum(totals)


def _unembed_nll_fwd(hidden, table, targets, weights, chunk):
    total, d_hidden, d_table = _unembed_nll_with_grads(hidden, table, targets, weights, chunk)
    return total, (d_hidden, d_table.astype(table.dtype), targets, weights)


def _unembed_nll_bwd(chunk, residuals, g):
    d_hidden, d_table, targets, weights = residuals
    zero_int = np.zeros(targets.shape, jax.dtypes.float0)
    return (d_hidden * g.astype(d_hidden.dtype), d_table * g, zero_int, jnp.zeros_like(weights))


_unembed_nll.defvjp(_unembed_nll_fwd, _unembed_nll_bwd)


def unembed_nll(hidden: jax.Array, table: jax.Array, targets: jax.Array, chunk: int
                ) -> tuple[jax.Array, jax.Array]:
    """`token_nll(hidden @ table.T, targets)` for hidden [B, T, D] and the vocab-major
    unembedding table [V, D], `chunk` positions at a time (0 or >= T: all at once), with the
    fused gradient described in the module docstring."""
    seq_len = hidden.shape[1]
    chunk = seq_len if chunk <= 0 or chunk >= seq_len else chunk
    hidden, targets, weights = _pad_to_chunks(hidden, targets, chunk)
    total = _unembed_nll(hidden, table, targets, weights, chunk)
    return total, jnp.float32(targets.shape[0] * seq_len)
