"""Gradient accumulation: microbatches summed inside the step equal one big batch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_tiny_config

from effllm_jax import config as config_lib
from effllm_jax import sharding, train
from effllm_jax import train_step as ts
from effllm_jax.data import build_dataset
from effllm_jax.model import llama


def assert_close(got, want, rtol):
    """Equal within float32 summation-order error, relative to the array's scale."""
    want = np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * float(np.abs(want).max()))


def test_microbatch_means_and_sums_equal_the_whole_batch():
    cfg = config_lib.model_config(make_tiny_config())
    params = llama.init_params(cfg, jax.random.key(0))
    masks = llama.full_masks(cfg)
    masks["ffn"] = masks["ffn"].at[0, :5].set(False)
    batch = jax.random.randint(jax.random.key(1), (8, 17), 0, cfg.vocab_size)

    def fn(inputs, targets, _):
        def loss(p):
            hidden, stats = llama.hidden_states(cfg, p, inputs, masks, 0)
            return ts.hidden_nll(cfg, p, hidden, targets, 0), stats
        (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return value, {"loss": value}, grads, stats

    rows = (batch[:, :-1], batch[:, 1:], None)
    whole = jax.jit(fn)(*rows)
    for steps in (2, 4):
        micro = jax.jit(lambda r: ts.accumulate_microbatches(fn, r, steps))(rows)
        for got, want in zip(jax.tree.leaves(micro), jax.tree.leaves(whole)):
            assert_close(got, want, 2e-5)


CONFIG = make_tiny_config(global_batch=16, steps=6)
CONFIG.prune.update(warmup_steps=0, prune_steps=4, every=4, compensation="obs")


@pytest.fixture(scope="module")
def first_steps():
    """One step (in the pruning window, with OBS statistics) at 1 and at 2 microbatches."""
    out = {}
    for accum in (1, 2):
        config = make_tiny_config(global_batch=16, steps=6, grad_accum_steps=accum)
        config.prune.update(CONFIG.prune)
        trainer = train.build_trainer(config)
        t = config.train
        data = build_dataset(config.data, seq_len=t.seq_len, global_batch=t.global_batch,
                             seed=t.seed)
        state = trainer.init(jax.random.key(0))
        batch = sharding.global_batch_array(data.local_batch(0), trainer.mesh, trainer.rules)
        state, metrics = trainer.step(state, batch)
        out[accum] = jax.device_get((state, metrics))
    return out


def test_accumulated_step_equals_the_big_batch_step(first_steps):
    (state1, m1), (state2, m2) = first_steps[1], first_steps[2]
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-4)
    for got, want in zip(jax.tree.leaves((state2.saliency, state2.stats, state2.params)),
                         jax.tree.leaves((state1.saliency, state1.stats, state1.params))):
        assert_close(got, want, 1e-4)
    assert np.abs(np.asarray(jax.tree.leaves(state1.stats)[0])).sum() > 0  # statistics ran


@pytest.mark.parametrize("accum, batch, message", [
    (0, 16, "grad_accum_steps=0"), (3, 16, "divisible by 24"), (4, 16, "divisible by 32")])
def test_bad_grad_accum_steps_are_named_before_compiling(accum, batch, message):
    config = make_tiny_config(global_batch=batch, grad_accum_steps=accum)
    with pytest.raises(ValueError, match=message):
        config_lib.validate(config, jax.device_count())
