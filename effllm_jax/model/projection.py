"""Linear projections whose weight gradients need no transposed copy of an activation (XLA:CPU).

Autodiff differentiates y = x w (x [N, I], w [I, O], cotangent g [N, O]) by transposing the
product: it emits dot_general(g, x) contracting the token axes, an [O, I] result, then a
transpose. Inside the whole train step XLA:CPU's layout assignment turned that into a matmul
whose operands had to be materialised transposed: per layer d(gate) and d(up) as [768, 2048]
copies, and three to four [256, 2048] ones (15% of the 8m step's op time, bench/RESULTS.md).
Here the backward states the weight gradient directly as dW = xᵀ g, a dot_general contracting
axis 0 of both operands with the output already [I, O]: XLA:CPU runs it as one matmul over
the operands as they lie in memory, and the step compiles with no activation-sized transposed
copy around the projections.

The forward product stays a plain dot_general beside a custom-VJP term that is zero going
forward and carries the gradient, so remat policies (`model.remat='dots'`) still see and save
it. The arithmetic is the same products and sums; only the summation order inside a kernel may
differ (float rounding). Off CPU `project` is plain autodiff: the TPU and GPU compilers pick
their own layouts, and nothing here was measured there.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from effllm_jax import sharding

_TOKENS = (((0,), (0,)), ((), ()))  # contract axis 0 (tokens) of both operands
_FEATURES = (((1,), (1,)), ((), ()))  # contract axis 1 (output features) of both


def project(x: jax.Array, w: jax.Array, in_dims: int = 1) -> jax.Array:
    """x [..., *I] times w [*I, *O] (the last `in_dims` axes of x contracted with the first
    `in_dims` of w): [..., *O] in x's dtype."""
    y = plain_projection(x, w, in_dims)
    if sharding.current_platform() != "cpu":
        return y
    # The product stays a plain dot_general (so remat policies such as model.remat='dots'
    # see and save it); its gradient comes from `_gradient`, which adds zero going forward.
    return jax.lax.stop_gradient(y) + _gradient(x, w, in_dims)


def plain_projection(x: jax.Array, w: jax.Array, in_dims: int = 1) -> jax.Array:
    """The autodiff reference: one tensordot."""
    return jnp.tensordot(x, w, axes=in_dims)


def _flat(x: jax.Array, w: jax.Array, in_dims: int) -> tuple[jax.Array, jax.Array]:
    """x as [N, I] and w as [I, O] (row-major reshapes, free; any of them may be 0, as in a
    layer that lost every head)."""
    split = x.ndim - in_dims
    inner = math.prod(x.shape[split:])
    return (x.reshape(math.prod(x.shape[:split]), inner),
            w.reshape(inner, math.prod(w.shape[in_dims:])))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _gradient(x, w, in_dims):
    """Zeros shaped like x w; its VJP is that of x w."""
    return jnp.zeros((*x.shape[:x.ndim - in_dims], *w.shape[in_dims:]), x.dtype)


def _gradient_fwd(x, w, in_dims):
    return _gradient(x, w, in_dims), (x, w)


def _gradient_bwd(in_dims, residuals, g):
    x, w = residuals
    x2, w2 = _flat(x, w, in_dims)
    g2 = g.reshape(x2.shape[0], w2.shape[1])
    dx = jax.lax.dot_general(g2, w2, _FEATURES)  # g wᵀ
    dw = jax.lax.dot_general(x2, g2, _TOKENS)  # xᵀ g, already [I, O]: no transpose after
    return dx.reshape(x.shape), dw.reshape(w.shape)


_gradient.defvjp(_gradient_fwd, _gradient_bwd)
