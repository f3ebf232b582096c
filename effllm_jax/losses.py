"""Next-token negative log-likelihood: one definition for training, eval loss and perplexity.

`token_nll` is the definition. `chunked_token_nll` computes the same sum from hidden states,
a slice of tokens at a time, so the whole [B, T, V] float32 logits never exist at once: each
chunk's logits are recomputed in the backward pass (jax.checkpoint) instead of being kept.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


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
    seq_len = hidden.shape[1]
    if chunk <= 0 or chunk >= seq_len:
        return token_nll(logits_fn(hidden), targets)
    pad = -seq_len % chunk
    weights = jnp.ones(targets.shape, jnp.float32)
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets, weights = (jnp.pad(x, ((0, 0), (0, pad))) for x in (targets, weights))
    pieces = (seq_len + pad) // chunk

    def split(x):  # [B, T, ...] -> [pieces, B, chunk, ...]
        return jnp.moveaxis(x.reshape(x.shape[0], pieces, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def piece_nll(h, t, w):
        return token_nll(logits_fn(h), t, w)

    def body(totals, xs):
        total, count = piece_nll(*xs)
        return (totals[0] + total, totals[1] + count), None

    zero = jnp.zeros((), jnp.float32)
    (total, count), _ = jax.lax.scan(body, (zero, zero),
                                     (split(hidden), split(targets), split(weights)))
    return total, count
