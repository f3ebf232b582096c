"""Next-token negative log-likelihood: one definition for training, eval loss and perplexity."""
from __future__ import annotations

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
