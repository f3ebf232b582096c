"""Lean attention cores and the chunked loss equal their reference definitions, with gradients."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effllm_jax import losses
from effllm_jax.model import attention, llama

CFG = llama.ModelConfig(vocab_size=96, d_model=48, num_layers=2, num_heads=6, num_kv_heads=2,
                        head_dim=8, ffn_dim=40, attention="einsum")


def qkv(seed, batch=2, seq=13, heads=3, dim=8):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(k, (batch, seq, heads, dim), jnp.float32) for k in keys]


@pytest.mark.parametrize("kind,block", [("blockwise", 4), ("blockwise", 5), ("blockwise", 64),
                                        ("dot_product", 0)])
def test_core_equals_einsum_forward_and_gradient(kind, block):
    q, k, v = qkv(0)
    weights = jax.random.normal(jax.random.key(1), q.shape)  # a loss that weighs every output

    def loss(core, q, k, v):
        return jnp.sum(core(q, k, v) * weights)

    reference = lambda q, k, v: attention.einsum_attention(q, k, v)
    lean = lambda q, k, v: attention.causal_attention(q, k, v, kind, block)
    np.testing.assert_allclose(lean(q, k, v), reference(q, k, v), atol=2e-6, rtol=1e-5)
    grad = jax.jit(jax.grad(loss, argnums=(1, 2, 3)), static_argnums=0)
    want, got = grad(reference, q, k, v), grad(lean, q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-4)


def test_cpu_causal_core_in_query_blocks_equals_reference_values_and_gradients():
    # On CPU the einsum core runs in query blocks under its own VJP (attention._causal_core):
    # values and q/k/v gradients must equal the autodiffed full-score reference, in f32 with
    # the blocks dividing the sequence (three blocks of 4 rows), in bf16 with one block.
    def both(q, k, v, weights, block):
        got, got_vjp = jax.vjp(lambda *a: attention._causal_core(*a, block), q, k, v)
        ref, ref_vjp = jax.vjp(attention.reference_core, q, k, v)
        return (got, *got_vjp(weights)), (ref, *ref_vjp(weights))

    for dtype, seq, tol in ((jnp.float32, 12, 1e-5), (jnp.bfloat16, 13, 2e-2)):
        q, k, v = (x.transpose(0, 2, 1, 3).astype(dtype) for x in qkv(3, seq=seq))
        weights = jax.random.normal(jax.random.key(4), q.shape, dtype)
        got, ref = jax.jit(both, static_argnums=4)(q, k, v, weights, 4)
        for g, r in zip(got, ref):
            assert g.dtype == r.dtype == dtype
            np.testing.assert_allclose(np.float32(g), np.float32(r), rtol=tol,
                                       atol=tol * float(jnp.max(jnp.abs(np.float32(r)))))
    assert len(attention._query_blocks(12, 4)) == 3 and len(attention._query_blocks(13, 4)) == 1
    q = qkv(0)[0]
    jaxpr = str(jax.make_jaxpr(attention.einsum_attention)(q, q, q))
    assert "custom_vjp" in jaxpr  # the CPU einsum path really runs the blocked core


def test_blockwise_in_bf16_is_close_to_einsum():
    q, k, v = (x.astype(jnp.bfloat16) for x in qkv(2, seq=32))
    lean = attention.blockwise_attention(q, k, v, 8)
    assert lean.dtype == jnp.bfloat16
    ref = attention.einsum_attention(q, k, v)
    assert float(jnp.max(jnp.abs(lean.astype(jnp.float32) - ref.astype(jnp.float32)))) < 0.03


def test_auto_picks_by_platform_and_length():
    assert attention.resolve("auto", 128, jnp.float32, "cpu") == "einsum"
    assert attention.resolve("auto", 4096, jnp.float32, "cpu") == "blockwise"
    assert attention.resolve("auto", 2048, jnp.bfloat16, "tpu") == "splash"
    assert attention.resolve("auto", 2048, jnp.bfloat16, "gpu") == "dot_product"
    with pytest.raises(ValueError, match="model.attention='flash'"):
        attention.check_kind("flash", 512)


@pytest.mark.parametrize("kind", ["blockwise", "dot_product"])
def test_model_with_head_masks_and_gqa_matches_einsum_model(kind):
    """The whole masked model, logits and parameter gradients, with uneven head masks."""
    rng = np.random.default_rng(0)
    masks = {"hidden": rng.random(CFG.d_model) < 0.8,
             "heads": rng.random((CFG.num_layers, CFG.num_heads)) < 0.6,
             "ffn": rng.random((CFG.num_layers, CFG.ffn_dim)) < 0.7}
    masks["heads"][1, :CFG.group_size] = False  # a whole GQA group pruned
    params = llama.init_params(CFG, jax.random.key(0))
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (2, 11)))
    lean_cfg = dataclasses.replace(CFG, attention=kind, attention_block=4)

    def loss(cfg, p):
        return jnp.sum(jnp.sin(llama.apply(cfg, p, tokens, masks)))

    apply = jax.jit(llama.apply, static_argnums=0)
    np.testing.assert_allclose(apply(lean_cfg, params, tokens, masks),
                               apply(CFG, params, tokens, masks), atol=1e-5)
    grad = jax.jit(jax.grad(loss, argnums=1), static_argnums=0)
    want, got = grad(CFG, params), grad(lean_cfg, params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4)
    dead = ~masks["heads"][0]  # pruned heads still get exactly zero gradient
    assert np.all(np.asarray(got["layers"]["attn"]["wq"])[0][:, dead] == 0.0)


@pytest.mark.parametrize("chunk", [4, 5, 11, 0])
def test_chunked_cross_entropy_equals_full(chunk):
    hidden = jax.random.normal(jax.random.key(3), (2, 11, 16))
    weight = jax.random.normal(jax.random.key(4), (16, 40))
    targets = jax.random.randint(jax.random.key(5), (2, 11), 0, 40)

    def full(h, w):
        total, count = losses.token_nll(jnp.einsum("btd,dv->btv", h, w), targets)
        return total / count

    def chunked(h, w):
        total, count = losses.chunked_token_nll(
            h, targets, lambda x: jnp.einsum("btd,dv->btv", x, w), chunk)
        return total / count

    np.testing.assert_allclose(chunked(hidden, weight), full(hidden, weight), rtol=1e-6)
    for g, w in zip(jax.jit(jax.grad(chunked, argnums=(0, 1)))(hidden, weight),
                    jax.jit(jax.grad(full, argnums=(0, 1)))(hidden, weight)):
        np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-5)


def test_chunked_loss_never_holds_whole_logits():
    """The jaxpr of the chunked loss's gradient has no [B, T, V] array; the full one does."""
    hidden, weight = jnp.ones((2, 64, 8)), jnp.ones((8, 1000))
    targets = jnp.zeros((2, 64), jnp.int32)

    def program(chunk):  # the gradient's jaxpr, scan bodies included
        fn = jax.grad(lambda h: losses.chunked_token_nll(
            h, targets, lambda x: jnp.einsum("btd,dv->btv", x, weight), chunk)[0])
        return str(jax.make_jaxpr(fn)(hidden))

    assert "f32[2,64,1000]" in program(0)
    assert "f32[2,64,1000]" not in program(16) and "f32[2,16,1000]" in program(16)


def test_config_names_bad_attention_and_loss_settings():
    from conftest import make_tiny_config
    from effllm_jax import config as config_lib
    for field, value, message in [("model.attention", "flash", "model.attention='flash'"),
                                  ("model.attention_block", 0, "model.attention_block=0"),
                                  ("train.loss_chunk", -1, "train.loss_chunk=-1")]:
        config = make_tiny_config()
        section, name = field.split(".")
        config[section][name] = value
        with pytest.raises(ValueError, match=message):
            config_lib.validate(config, 8)


def test_splash_kernel_in_interpret_mode_equals_einsum(monkeypatch):
    """The TPU splash path (layout, scaling, causal mask), run by the Pallas interpreter on CPU."""
    import functools
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    monkeypatch.setattr(splash, "make_splash_mha",
                        functools.partial(splash.make_splash_mha, interpret=True))
    q, k, v = qkv(6, batch=1, seq=128, heads=2, dim=128)

    def loss(core, q):
        return jnp.sum(core(q, k, v) ** 2)

    lean = lambda q, k, v: attention.splash_attention(q, k, v, 128)
    np.testing.assert_allclose(lean(q, k, v), attention.einsum_attention(q, k, v), atol=1e-5)
    np.testing.assert_allclose(jax.grad(loss, argnums=1)(lean, q),
                               jax.grad(loss, argnums=1)(attention.einsum_attention, q), atol=1e-4)


def test_dot_product_asks_for_cudnn_on_gpu_in_half_precision(monkeypatch):
    # jax's default implementation on GPU is the XLA path, which materialises the scores and
    # ran 6.5x slower than cuDNN's kernel on an H200 (bench/accelerator.py); CPU cannot run
    # cuDNN, so this checks the request, and that a refusal falls back to the XLA path.
    asked = []

    def fake(q, k, v, is_causal, implementation=None):
        asked.append(implementation)
        if implementation == "cudnn" and q.shape[-1] > 128:
            raise ValueError("head_dim too large for cuDNN")
        return q

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    monkeypatch.setattr(attention.sharding, "current_platform", lambda: "gpu")
    bf16 = jnp.zeros((1, 8, 2, 16), jnp.bfloat16)
    attention.causal_attention(bf16, bf16, bf16, "dot_product")
    attention.causal_attention(bf16.astype(jnp.float32), bf16, bf16, "dot_product")
    wide = jnp.zeros((1, 8, 2, 256), jnp.bfloat16)
    attention.causal_attention(wide, wide, wide, "dot_product")
    assert asked == ["cudnn", None, "cudnn", None]
    monkeypatch.setattr(attention.sharding, "current_platform", lambda: "cpu")
    attention.causal_attention(bf16, bf16, bf16, "dot_product")
    assert asked[-1] is None
