"""Knowledge distillation: the loss against numpy, the teacher slot inside the step, teachers by path."""
import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_tiny_config

from effllm_jax import checkpoint as ckpt_lib
from effllm_jax import config as config_lib
from effllm_jax import distill, sharding, train
from effllm_jax.arch import ArchSpec
from effllm_jax.data import build_dataset
from effllm_jax.export import export_model, load_language_model
from effllm_jax.model import llama
from effllm_jax.model.compact import abstract_compact_params, apply_compact, slice_params
from effllm_jax.train_step import cross_entropy


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _reference_loss(student, teacher, targets, alpha, temperature):
    """alpha * CE + (1 - alpha) * T^2 * KL(teacher || student), in float64 numpy."""
    student, teacher = student.astype(np.float64), teacher.astype(np.float64)
    logp = _log_softmax(student)
    ce = -np.take_along_axis(logp, targets[..., None], -1).mean()
    s, t = _log_softmax(student / temperature), _log_softmax(teacher / temperature)
    kl = (np.exp(t) * (t - s)).sum(-1).mean()
    return alpha * ce + (1 - alpha) * temperature ** 2 * kl


@pytest.fixture(scope="module")
def logits():
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    student = 3.0 * jax.random.normal(k1, (2, 5, 11))
    teacher = 3.0 * jax.random.normal(k2, (2, 5, 11))
    targets = jax.random.randint(k3, (2, 5), 0, 11)
    return student, teacher, targets


@pytest.mark.parametrize("alpha, temperature", [(0.3, 2.0), (0.0, 1.0), (0.7, 0.5)])
def test_kd_loss_equals_a_numpy_reference(logits, alpha, temperature):
    student, teacher, targets = logits
    loss, parts = distill.distill_loss(student, teacher, targets, alpha, temperature)
    expected = _reference_loss(*map(np.asarray, logits), alpha, temperature)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(parts["kl"]) > 0.1  # distinct distributions: the KL term really counts


def test_kd_loss_with_alpha_one_or_inactive_is_cross_entropy_exactly(logits):
    student, teacher, targets = logits
    ce_loss, ce_grad = jax.value_and_grad(cross_entropy)(student, targets)
    for alpha, active in [(1.0, True), (0.3, False)]:
        loss, grad = jax.value_and_grad(
            lambda s: distill.distill_loss(s, teacher, targets, alpha, 2.0, active)[0])(student)
        np.testing.assert_array_equal(np.asarray(loss), np.asarray(ce_loss))
        np.testing.assert_array_equal(np.asarray(grad), np.asarray(ce_grad))


def test_kd_gradient_flows_to_the_student_only(logits):
    student, teacher, targets = logits
    alpha, temperature = 0.0, 2.0  # the KL term alone
    grad_s, grad_t = jax.grad(
        lambda s, t: distill.distill_loss(s, t, targets, alpha, temperature)[0],
        argnums=(0, 1))(student, teacher)
    assert not np.any(np.asarray(grad_t))
    # d/ds T^2 KL(p_t || softmax(s/T)) = T (p_s - p_t), averaged over the 10 tokens
    p_s = np.exp(_log_softmax(np.asarray(student, np.float64) / temperature))
    p_t = np.exp(_log_softmax(np.asarray(teacher, np.float64) / temperature))
    np.testing.assert_allclose(np.asarray(grad_s), temperature * (p_s - p_t) / 10, atol=1e-6)


def test_chunked_sums_add_up_to_the_whole(logits):
    student, teacher, targets = logits
    whole = distill.kd_sums(student, teacher, targets, 2.0)
    chunks = [distill.kd_sums(student[:, i:i + 2], teacher[:, i:i + 2], targets[:, i:i + 2], 2.0)
              for i in (0, 2, 4)]
    for total, parts in zip(whole, zip(*chunks)):
        np.testing.assert_allclose(float(total), float(sum(parts)), rtol=1e-6)


@pytest.mark.parametrize("field, value, message", [
    ("alpha", 1.5, "distill.alpha=1.5 must be in [0, 1]"),
    ("temperature", 0.0, "distill.temperature=0.0 must be > 0"),
    ("phases", ("finetune",), "distill.phases=('finetune',) must name distinct phases"),
    ("phases", ("continued",), "leaves no step to distil in"),
    ("teacher", "/nonexistent/teacher", "distill.teacher=/nonexistent/teacher: no such file"),
])
def test_bad_distill_settings_get_one_clear_line(field, value, message):
    config = make_tiny_config()
    config.distill.teacher = "source_at_first_event"
    config.distill[field] = value
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("[", r"\[")
                       .replace("(", r"\(").replace(")", r"\)")):
        config_lib.validate(config, jax.device_count())


# ------------------------------------------------------------------ the source as teacher

def source_teacher_config():
    config = make_tiny_config(steps=12, checkpoint_every=6, eval_every=0)
    config.continued.update(steps=4, warmup_steps=1)
    config.distill.update(teacher="source_at_first_event", alpha=0.5, temperature=2.0)
    config.mesh.shape = (2, 2, 2)
    return config


@pytest.fixture(scope="module")
def source_run():
    """16 steps (12 pruning + 4 continued) with teacher=source_at_first_event, stepped by hand."""
    config = source_teacher_config()
    trainer = train.cached_trainer(config)
    t = config.train
    data = build_dataset(config.data, seq_len=t.seq_len, global_batch=t.global_batch, seed=t.seed)
    state = trainer.init(jax.random.key(t.seed))
    params_by_step, teachers, history = {}, {}, []
    for i in range(16):
        params_by_step[i] = jax.device_get(state.params)  # the state is donated: copy it out
        batch = sharding.global_batch_array(data.local_batch(i), trainer.mesh, trainer.rules)
        state, metrics = trainer.step(state, batch)
        teachers[i + 1] = jax.device_get(state.teacher)
        history.append(jax.device_get(metrics))
    return config, trainer, state, params_by_step, teachers, history


def _assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(jax.device_get(x)), np.asarray(jax.device_get(y)))


def test_teacher_is_the_source_entering_the_first_event_and_stays_frozen(source_run):
    config, trainer, state, params_by_step, teachers, history = source_run
    first_event = trainer.step_cfg.schedule.event_steps()[0]
    assert first_event == 4 and trainer.step_cfg.distill.snapshot_step == 4
    assert not np.any(jax.tree.leaves(teachers[3]["params"])[0])  # empty before the event
    for step in range(first_event, 17):  # the params step 4 started from, then never again
        _assert_trees_equal(teachers[step]["params"], params_by_step[first_event - 1])
    assert all(np.all(m) for m in jax.tree.leaves(teachers[16]["masks"]))  # the dense source
    assert np.any(params_by_step[first_event - 1]["embed"]
                  != jax.device_get(state.params)["embed"])  # the student moved on
    active = [bool(m["distill_active"]) for m in history]
    assert active == [False] * first_event + [True] * (16 - first_event)
    kl = [float(m["distill_kl"]) for m in history]
    assert kl[first_event] > 0 and all(np.isfinite(kl))
    wq = state.teacher["params"]["layers"]["attn"]["wq"]  # same mesh, same logical rules
    assert wq.sharding == trainer.state_shardings.params["layers"]["attn"]["wq"]
    assert trainer.step._cache_size() == 1  # copy, events and both phases: one compilation


@pytest.fixture(scope="module")
def source_run_dir(source_run, tmp_path_factory):
    """The same run through train.run (same compiled step): a pruned, distilled run directory."""
    workdir = tmp_path_factory.mktemp("source_run")
    train.run(source_run[0], str(workdir))
    return workdir


def test_distilled_run_resumes_bit_identically_after_the_first_event(source_run, source_run_dir,
                                                                     tmp_path):
    config, trainer, state, *_ = source_run
    workdir = tmp_path / "run"
    shutil.copytree(source_run_dir, workdir)
    for step in ("12", "16"):  # as if killed after the step-6 checkpoint (after the first event)
        shutil.rmtree(workdir / "checkpoints" / step)
    resumed, spec = train.run(config, str(workdir))
    _assert_trees_equal(resumed, state)  # also equal to the run stepped by hand above
    assert trainer.step._cache_size() == 1
    ckpt = ckpt_lib.Checkpointer(str(workdir), async_save=False)
    assert [ckpt.restore_meta(s)[1].phase for s in (6, 12, 16)] == ["pruning", "pruning",
                                                                    "continued"]
    ckpt.close()
    assert spec.total_steps == 16 and spec.step == 16


# ------------------------------------------------------------------ a teacher from a path

def test_a_run_directory_teacher_of_another_shape_distils(source_run_dir, tmp_path):
    teacher_dir = str(source_run_dir)  # pruned unevenly, and itself distilled
    teacher_lm = load_language_model(teacher_dir)
    assert not teacher_lm.spec.uniform  # pruned unevenly: padding must be exact
    config = make_tiny_config(steps=4, eval_every=0, checkpoint_every=100)
    config.model.update(d_model=24, num_heads=2, num_kv_heads=1, ffn_dim=40)  # another shape
    config.prune.update(warmup_steps=1, prune_steps=2, every=1)
    config.distill.update(teacher=teacher_dir, alpha=0.2, temperature=1.5, phases=("pruning",))
    config.mesh.shape = (2, 2, 2)
    state, _ = train.run(config, str(tmp_path / "student"))
    trainer = train.cached_trainer(config)
    kd = trainer.step_cfg.distill
    assert kd.teacher_model.d_model == teacher_lm.spec.hidden_dim
    tokens = np.arange(32, dtype=np.int32).reshape(2, 16) % 128
    padded = jax.jit(functools.partial(llama.apply, kd.teacher_model))(
        state.teacher["params"], jnp.asarray(tokens), state.teacher["masks"])  # after 4 steps
    np.testing.assert_allclose(np.asarray(padded), np.asarray(teacher_lm.logits(tokens)),
                               atol=2e-5)
    assert state.teacher["params"]["embed"].sharding == trainer.state_shardings.teacher[
        "params"]["embed"]
    assert trainer.step._cache_size() == 1


def test_padding_a_compact_teacher_into_a_dense_one_is_exact():
    cfg = llama.ModelConfig(vocab_size=32, d_model=16, num_layers=2, num_heads=6,
                            num_kv_heads=3, head_dim=4, ffn_dim=12)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: rng.normal(0, 0.5, a.shape).astype(np.float32),
                          llama.abstract_params(cfg))
    hidden = np.ones(16, bool)
    hidden[[1, 5, 6, 11]] = False
    heads = np.array([[1, 1, 0, 0, 1, 0], [0, 0, 0, 1, 0, 0]], bool)  # uneven GQA; a dead KV head
    ffn = np.zeros((2, 12), bool)
    ffn[0, [0, 3, 4, 8, 9, 11]], ffn[1, [2, 7]] = True, True
    spec, compact = slice_params(params, {"hidden": hidden, "heads": heads, "ffn": ffn}, cfg)
    teacher_cfg = distill.padded_config(spec, cfg)
    assert (teacher_cfg.d_model, teacher_cfg.num_kv_heads, teacher_cfg.num_heads,
            teacher_cfg.ffn_dim) == (12, 2, 4, 6)
    padded, masks = distill.padded_params(spec, compact, teacher_cfg)
    tokens = jnp.asarray(rng.integers(0, 32, (2, 9)), jnp.int32)
    np.testing.assert_allclose(np.asarray(llama.apply(teacher_cfg, padded, tokens, masks)),
                               np.asarray(apply_compact(spec, compact, tokens)), atol=1e-5)


def test_a_teacher_of_another_vocabulary_is_refused(tmp_path):
    other = llama.ModelConfig(vocab_size=64, d_model=16, num_layers=1, num_heads=2,
                              num_kv_heads=1, head_dim=8, ffn_dim=16)
    spec = ArchSpec.from_masks(llama.full_masks(other), other)
    params = jax.tree.map(lambda a: np.full(a.shape, 0.01, np.float32),
                          abstract_compact_params(spec))
    export_model(str(tmp_path / "export"), spec, params, "flax")
    config = make_tiny_config()
    config.distill.teacher = str(tmp_path / "export")
    message = "has a vocabulary of 64 tokens but the student's is 128"
    with pytest.raises(ValueError, match=message):
        train.run(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert ArchSpec.from_json((tmp_path / "export" / "spec.json").read_text()) == spec
