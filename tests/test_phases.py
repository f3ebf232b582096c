"""The run's phases: one learning-rate schedule over pruning and continued pretraining, recorded
in the architecture spec."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_tiny_config

from effllm_jax import checkpoint as ckpt_lib
from effllm_jax import config as config_lib
from effllm_jax import phases
from effllm_jax.arch import ArchSpec, PhaseSpan
from effllm_jax.model import llama
from effllm_jax.train_step import make_optimizer

LR, MIN_RATIO, WARMUP, STEPS = 1e-2, 0.1, 2, 12  # the pruning phase (make_tiny_config)


def continued_config(schedule, **continued):
    config = make_tiny_config(steps=STEPS)
    config.optim.update(lr=LR, min_lr_ratio=MIN_RATIO, warmup_steps=WARMUP)
    config.continued.update(steps=10, lr=4e-3, warmup_steps=3, schedule=schedule,
                            min_lr_ratio=0.25, decay_fraction=0.3)
    config.continued.update(**continued)
    return config


def values(schedule, counts):
    return np.array([float(schedule(c)) for c in counts])


def test_without_a_continued_phase_the_schedule_is_todays_exactly():
    config = make_tiny_config(steps=STEPS)
    lr = phases.lr_schedule(config)
    counts = range(STEPS + 3)
    np.testing.assert_array_equal(values(lr, counts), values(make_optimizer(
        config.optim, STEPS)[1], counts))
    assert phases.total_steps(config) == STEPS
    assert phases.spans(config) == (PhaseSpan("pruning", 1, STEPS),)


def test_pruning_phase_then_a_rewarm_and_cosine_decay():
    config = continued_config("cosine")
    lr = phases.lr_schedule(config)
    plain = phases.lr_schedule(make_tiny_config(steps=STEPS))
    # The pruning phase is untouched: warm-up to LR at count 2, cosine to LR * MIN_RATIO.
    np.testing.assert_array_equal(values(lr, range(STEPS)), values(plain, range(STEPS)))
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(WARMUP)), LR, rtol=1e-6)
    # Count 12 is step 13, the first continued step: it starts where the pruning phase ended,
    # re-warms to 4e-3 over 3 steps, then decays by cosine to 4e-3 * 0.25 at the phase's end.
    start, peak, end = LR * MIN_RATIO, 4e-3, 4e-3 * 0.25
    np.testing.assert_allclose(values(lr, [12, 13, 15]), [start, start + (peak - start) / 3,
                                                          peak], rtol=1e-5)
    middle = STEPS + 3 + 3.5  # halfway through the 7 decay steps
    np.testing.assert_allclose(float(lr(middle)), (peak + end) / 2, rtol=1e-5)
    np.testing.assert_allclose(float(lr(STEPS + 10)), end, rtol=1e-5)
    jitted = jax.jit(lr)  # one compiled function of the count, equal to the host values
    np.testing.assert_allclose(values(jitted, range(STEPS + 11)), values(lr, range(STEPS + 11)),
                               rtol=1e-6)
    assert jitted._cache_size() == 1
    assert phases.total_steps(config) == 22
    assert phases.spans(config) == (PhaseSpan("pruning", 1, 12), PhaseSpan("continued", 13, 22))


def test_wsd_is_warmup_then_flat_then_linear_decay():
    config = continued_config("wsd")  # 10 steps: 3 warm-up, 4 flat, 3 (0.3 of 10) decay
    lr = phases.lr_schedule(config)
    start, peak, end = LR * MIN_RATIO, 4e-3, 4e-3 * 0.25
    counts = [12, 15, 16, 18, 19, 20, 21, 22]
    expected = [start, peak, peak, peak, peak, peak - (peak - end) / 3,
                peak - 2 * (peak - end) / 3, end]
    np.testing.assert_allclose(values(lr, counts), expected, rtol=1e-5)


def test_continued_lr_zero_means_the_pruning_phase_peak():
    lr = phases.lr_schedule(continued_config("wsd", lr=0.0))
    np.testing.assert_allclose(float(lr(STEPS + 3)), LR, rtol=1e-6)


@pytest.mark.parametrize("field, value, message", [
    ("schedule", "linear", "continued.schedule='linear'; expected one of ('cosine', 'wsd')"),
    ("steps", -1, "continued.steps=-1 must be >= 0"),
    ("warmup_steps", 10, "continued.warmup_steps=10 leaves no decay"),
    ("decay_fraction", 0.0, "continued.decay_fraction=0.0 must be in (0, 1]"),
    ("decay_fraction", 0.9, "plus WSD decay (9 = decay_fraction 0.9 of 10) is longer"),
    ("min_lr_ratio", 2.0, "continued.min_lr_ratio=2.0 must be in [0, 1]"),
])
def test_bad_continued_settings_get_one_clear_line(field, value, message):
    config = continued_config("wsd")
    config.continued[field] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[")):
        config_lib.validate(config, jax.device_count())


def test_continued_pretraining_must_start_after_the_last_event():
    config = continued_config("cosine")
    config.train.steps = 8  # the tiny schedule's last event is step 10
    with pytest.raises(ValueError, match="ends before the last pruning event at step 10"):
        config_lib.validate(config, jax.device_count())


def test_the_spec_and_checkpoint_record_the_phase(tmp_path):
    config = continued_config("cosine")
    cfg = config_lib.model_config(config)
    masks = jax.tree.map(np.asarray, llama.full_masks(cfg))
    specs = {step: ArchSpec.from_masks(masks, cfg, step, 0, phases=phases.spans(config))
             for step in (0, 12, 13, 22)}
    assert [s.phase for s in specs.values()] == ["pruning", "pruning", "continued", "continued"]
    assert {s.total_steps for s in specs.values()} == {22}
    assert specs[13].to_json()["phase"] == "continued"
    assert specs[13].shape_key() == specs[0].shape_key()  # progress, not architecture
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(13, {"x": jnp.zeros(2)}, specs[13], {"step": 13})
    _, restored, _ = ckpt.restore_meta(13)
    ckpt.close()
    assert restored == specs[13] and restored.phase == "continued"
    assert restored.phases[1] == PhaseSpan("continued", 13, 22)
    legacy = specs[13].to_json()
    del legacy["phases"], legacy["phase"]  # a spec written before phases were recorded
    assert ArchSpec.from_json(legacy).phase == ""
