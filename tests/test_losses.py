"""The fused unembedding + loss (losses.unembed_nll) equals the plain logits -> token_nll path:
value and gradients, chunked and whole, tied and untied, in a masked model."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effllm_jax import losses, train_step
from effllm_jax.model import llama

CFG = llama.ModelConfig(vocab_size=97, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                        head_dim=8, ffn_dim=24, attention="einsum")


def reference_nll(h, table, targets):
    """The definition: float32 logits of the whole sequence, then token_nll."""
    logits = jnp.einsum("btd,vd->btv", h, table.astype(h.dtype),
                        preferred_element_type=jnp.float32)
    total, count = losses.token_nll(logits, targets)
    return total / count


@pytest.mark.parametrize("chunk", [0, 5, 13])  # whole; padded pieces (13 = 5 + 5 + 3); T
def test_unembed_nll_equals_reference_value_and_gradients(chunk):
    keys = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(keys[0], (2, 13, 16))
    table = jax.random.normal(keys[1], (97, 16))
    targets = jax.random.randint(keys[2], (2, 13), 0, 97)

    def fused(h, table):
        total, count = losses.unembed_nll(h, table, targets, chunk)
        return total / count

    np.testing.assert_allclose(jax.jit(fused)(h, table), reference_nll(h, table, targets),
                               rtol=1e-6)
    got = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(h, table)
    want = jax.value_and_grad(reference_nll, argnums=(0, 1))(h, table, targets)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for g, w in zip(got[1], want[1]):
        np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_train_loss_of_masked_model_equals_plain_logits(tied):
    """model_loss (fused) vs apply -> token_nll, gradients of every parameter; pruned hidden
    channels of the embedding/head get exactly zero gradient through the fused path."""
    cfg = dataclasses.replace(CFG, tie_embeddings=tied)
    params = llama.init_params(cfg, jax.random.key(1))
    masks = llama.full_masks(cfg)
    masks["hidden"] = masks["hidden"].at[jnp.array([1, 7, 30])].set(False)
    masks["heads"] = masks["heads"].at[0, 2].set(False)
    batch = jax.random.randint(jax.random.key(2), (3, 12), 0, cfg.vocab_size)
    inputs, targets = batch[:, :-1], batch[:, 1:]

    def plain(p):
        return losses.token_nll(llama.apply(cfg, p, inputs, masks), targets)[0] / targets.size

    def fused(p):
        return train_step.model_loss(cfg, p, masks, inputs, targets, loss_chunk=4)

    got = jax.jit(jax.value_and_grad(fused))(params)
    want = jax.jit(jax.value_and_grad(plain))(params)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for path, g in jax.tree_util.tree_leaves_with_path(got[1]):
        w = dict(jax.tree_util.tree_leaves_with_path(want[1]))[path]
        np.testing.assert_allclose(g, w, atol=1e-7, rtol=1e-5, err_msg=str(path))
    head = got[1]["embed"] if tied else got[1]["lm_head"].T
    assert not np.any(np.asarray(head)[:, [1, 7, 30]])


def test_bf16_hidden_is_close_to_reference():
    keys = jax.random.split(jax.random.key(3), 3)
    h = jax.random.normal(keys[0], (2, 8, 16)).astype(jnp.bfloat16)
    table = jax.random.normal(keys[1], (97, 16))
    targets = jax.random.randint(keys[2], (2, 8), 0, 97)
    fused = lambda h, t: losses.unembed_nll(h, t, targets, 0)[0] / targets.size
    # compiled: XLA:CPU folds the table gradient's transpose into a dot it has no bf16 x bf16
    # = f32 kernel for (UNIMPLEMENTED at run time), unless losses.py feeds it float32
    got = jax.jit(jax.grad(fused, argnums=(0, 1)))(h, table)
    want = jax.grad(reference_nll, argnums=(0, 1))(h, table, targets)
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.float32
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   atol=2e-2, rtol=5e-2)


def test_unembed_nll_gradient_never_holds_whole_logits():
    """With chunk < T the gradient's program (scan bodies included) has only chunk-sized
    logits; with chunk 0 it has the whole [B, T, V]."""
    hidden, table = jnp.ones((2, 64, 8)), jnp.ones((1000, 8))
    targets = jnp.zeros((2, 64), jnp.int32)

    def program(chunk):
        fn = jax.grad(lambda h, t: losses.unembed_nll(h, t, targets, chunk)[0], argnums=(0, 1))
        return str(jax.make_jaxpr(fn)(hidden, table))

    assert "f32[2,64,1000]" in program(0)
    assert "f32[2,64,1000]" not in program(16) and "f32[2,16,1000]" in program(16)
