"""The masked source model computes exactly what its physically sliced twin computes."""
import contextlib
import dataclasses
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from effllm_jax.model import llama, projection
from effllm_jax.model.compact import apply_compact, slice_params
from effllm_jax.pruning import groups

CFG = llama.ModelConfig(vocab_size=96, d_model=48, num_layers=3, num_heads=6, num_kv_heads=2,
                        head_dim=8, ffn_dim=40)


def random_masks(cfg, seed):
    rng = np.random.default_rng(seed)
    masks = {"hidden": rng.random(cfg.d_model) < 0.7,
             "heads": rng.random((cfg.num_layers, cfg.num_heads)) < 0.6,
             "ffn": rng.random((cfg.num_layers, cfg.ffn_dim)) < 0.5}
    masks["heads"][1, :cfg.group_size] = False  # a whole GQA group gone: its KV head too
    masks["heads"][2, :] = False  # a layer with no attention left
    masks["heads"][0, :] = True
    return masks


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_masked_logits_equal_sliced_model(tie, seed):
    cfg = dataclasses.replace(CFG, tie_embeddings=tie)
    params = llama.init_params(cfg, jax.random.key(seed))
    masks = random_masks(cfg, seed)
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, 11)))
    masked = llama.apply(cfg, params, tokens, masks)
    spec, compact = slice_params(params, masks, cfg)
    sliced = apply_compact(spec, compact, tokens)
    assert sliced.shape == masked.shape
    assert float(jnp.max(jnp.abs(masked - sliced))) <= 1e-5
    # the spec's parameter count is the sliced model's real size
    assert spec.live_params == sum(x.size for x in jax.tree.leaves(compact))
    assert spec.live_params == int(groups.count_params(masks, cfg))
    assert spec.layers[1].num_kv_heads == cfg.num_kv_heads - 1
    assert spec.layers[2].num_heads == 0 and spec.hidden_dim == int(masks["hidden"].sum())


def test_full_masks_change_nothing_and_scan_equals_loop():
    params = llama.init_params(CFG, jax.random.key(3))
    tokens = jnp.arange(20).reshape(2, 10) % CFG.vocab_size
    plain = llama.apply(CFG, params, tokens)
    masked = llama.apply(CFG, params, tokens, llama.full_masks(CFG))
    unrolled = llama.apply(dataclasses.replace(CFG, scan_layers=False, remat="full"), params,
                           tokens, llama.full_masks(CFG))
    np.testing.assert_allclose(plain, masked, atol=1e-5)
    np.testing.assert_allclose(plain, unrolled, atol=1e-5)


def test_bf16_compute_is_close_to_f32_and_params_stay_f32():
    cfg16 = dataclasses.replace(CFG, dtype="bfloat16")
    params = llama.init_params(cfg16, jax.random.key(4))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    tokens = jnp.arange(16).reshape(2, 8)
    lo = llama.apply(cfg16, params, tokens)
    hi = llama.apply(CFG, params, tokens)
    assert lo.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(lo - hi))) < 0.05


def test_causality_future_tokens_do_not_change_past_logits():
    params = llama.init_params(CFG, jax.random.key(5))
    a = jnp.array([[1, 2, 3, 4, 5, 6]])
    b = jnp.array([[1, 2, 3, 9, 9, 9]])
    la, lb = llama.apply(CFG, params, a), llama.apply(CFG, params, b)
    np.testing.assert_allclose(la[:, :3], lb[:, :3], atol=1e-6)
    assert float(jnp.max(jnp.abs(la[:, 3:] - lb[:, 3:]))) > 1e-4


def test_pruned_units_get_exactly_zero_gradient():
    params = llama.init_params(CFG, jax.random.key(6))
    masks = random_masks(CFG, 2)
    tokens = jnp.arange(24).reshape(2, 12) % CFG.vocab_size
    grads = jax.grad(lambda p: llama.apply(CFG, p, tokens, masks).sum())(params)
    pmask = groups.param_masks(masks, CFG)
    for g, m in zip(jax.tree.leaves(grads), jax.tree.leaves(pmask)):
        dead = ~np.broadcast_to(np.asarray(m), g.shape)
        assert np.all(np.asarray(g)[dead] == 0.0)


def test_splash_path_heads_first_equals_einsum(monkeypatch):
    """On TPU the layer projects q/k/v straight into splash's [B, H, T, hd] layout; run by the
    Pallas interpreter, the masked GQA model and its OBS statistics match the einsum core."""
    import functools
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    monkeypatch.setattr(splash, "make_splash_mha",
                        functools.partial(splash.make_splash_mha, interpret=True))
    cfg = dataclasses.replace(CFG, num_layers=2, attention="einsum")
    params = llama.init_params(cfg, jax.random.key(5))
    masks = random_masks(dataclasses.replace(cfg, num_layers=3), 5)
    masks["heads"], masks["ffn"] = masks["heads"][1:], masks["ffn"][1:]  # a dead GQA group
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 128)))
    ref, ref_stats = llama.apply(cfg, params, tokens, masks, stats_block=0)
    got, stats = llama.apply(dataclasses.replace(cfg, attention="splash"), params, tokens,
                             masks, stats_block=0)
    np.testing.assert_allclose(got, ref, atol=1e-4)
    np.testing.assert_allclose(stats["o_in"], ref_stats["o_in"], rtol=1e-4, atol=1e-3)


def test_cpu_projections_equal_autodiff_values_and_gradients(monkeypatch):
    # model/projection.py states the weight gradients itself (xᵀ g, no transposed copies on
    # CPU): values and gradients must equal plain autodiff's, for one projection (two
    # contracted axes, f32 and bf16) and for the whole masked model (the chunked MLP runs the
    # same projections; its own test compares it to the whole one).
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 4))
    w = jax.random.normal(jax.random.key(1), (3, 4, 7))
    cotangent = jax.random.normal(jax.random.key(2), (2, 5, 7))

    @jax.jit
    def both(x, w, cotangent):
        got, got_vjp = jax.vjp(lambda a, b: projection.project(a, b, 2), x, w)
        ref, ref_vjp = jax.vjp(lambda a, b: projection.plain_projection(a, b, 2), x, w)
        return (got, *got_vjp(cotangent)), (ref, *ref_vjp(cotangent))

    for dtype, rtol in ((jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)):
        got, ref = both(x.astype(dtype), w.astype(dtype), cotangent.astype(dtype))
        for g, r in zip(got, ref):
            assert g.shape == r.shape and g.dtype == r.dtype == dtype
            np.testing.assert_allclose(np.float32(g), np.float32(r), rtol=rtol, atol=rtol)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda x: projection.project(x, w, 2).sum()))(x))
    assert "custom_vjp" in jaxpr  # the CPU path really ran

    params = llama.init_params(CFG, jax.random.key(11))
    masks = random_masks(CFG, 4)
    tokens = jnp.arange(24).reshape(2, 12) % CFG.vocab_size
    loss = lambda p: (llama.apply(CFG, p, tokens, masks) ** 2).mean()
    got_loss, got = jax.jit(jax.value_and_grad(loss))(params)
    with monkeypatch.context() as m:
        m.setattr(llama, "project", projection.plain_projection)
        ref_loss, ref = jax.jit(jax.value_and_grad(loss))(params)
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-6)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(r))))

    # model.remat='dots' still sees the products as matmuls: it saves what it saved before
    dots = dataclasses.replace(CFG, remat="dots")

    def saved():
        with contextlib.redirect_stdout(io.StringIO()) as out:
            print_saved_residuals(lambda p: llama.apply(dots, p, tokens, masks).sum(), params)
        return sorted(line.split(" ")[0] for line in out.getvalue().splitlines())

    custom = saved()
    with monkeypatch.context() as m:
        m.setattr(llama, "project", projection.plain_projection)
        assert custom == saved()


def test_mlp_in_token_chunks_equals_whole_sequence_values_and_gradients():
    # model.mlp_chunk: the SwiGLU a chunk of tokens at a time (remat'd) must be the same
    # function; lengths the chunk does not divide run whole.
    params = llama.init_params(CFG, jax.random.key(7))
    masks = random_masks(CFG, 3)
    chunked = dataclasses.replace(CFG, mlp_chunk=4)
    for length in (12, 10):
        tokens = jnp.arange(2 * length).reshape(2, length) % CFG.vocab_size
        loss = lambda cfg: jax.jit(jax.value_and_grad(
            lambda p: (llama.apply(cfg, p, tokens, masks) ** 2).mean()))
        whole_loss, whole_grads = loss(CFG)(params)
        chunk_loss, chunk_grads = loss(chunked)(params)
        np.testing.assert_allclose(chunk_loss, whole_loss, rtol=1e-6)
        for g, w in zip(jax.tree.leaves(chunk_grads), jax.tree.leaves(whole_grads)):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
    jaxpr = str(jax.make_jaxpr(lambda p: llama.apply(chunked, p, tokens[:, :8], masks))(params))
    assert "checkpoint" in jaxpr or "remat" in jaxpr  # the chunked path really ran
