"""Bad numbers never win: a non-finite step is skipped (state unchanged) and counted; a
diverging run stops and keeps its finite checkpoints; a non-finite state is never written; a
damaged newest checkpoint (truncated, or bytes silently flipped) falls back to the one before."""
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trees_equal, host, make_resume_config, make_tiny_config

from effllm_jax import checkpoint as ckpt_lib
from effllm_jax import config as config_lib
from effllm_jax import integrity, sharding, train
from effllm_jax.arch import ArchSpec
from effllm_jax.data import build_dataset
from effllm_jax.model import llama

CONFIG = make_resume_config()
POISON = 1000  # a token id past the vocabulary: the loss of such a batch is NaN


def poison_from(monkeypatch, first_bad_index: int) -> None:
    """Every batch from `first_bad_index` on (step index + 1 = step) holds an unknown token."""
    build = train.data_lib.build_dataset

    def poisoned_build(*args, **kwargs):
        dataset = build(*args, **kwargs)
        local_batch = dataset.local_batch

        def batch(index, *rest):
            tokens = local_batch(index, *rest)
            return np.full_like(tokens, POISON) if index >= first_bad_index else tokens
        dataset.local_batch = batch
        return dataset
    monkeypatch.setattr(train.data_lib, "build_dataset", poisoned_build)


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """An uninterrupted run: checkpoints at 4 and 8, and its final state on the host."""
    workdir = tmp_path_factory.mktemp("good")
    state, _ = train.run(CONFIG, str(workdir))
    return workdir, host(state)


def test_a_non_finite_step_changes_nothing_but_the_step_and_an_event_still_prunes():
    trainer = train.cached_trainer(CONFIG)
    t = CONFIG.train
    data = build_dataset(CONFIG.data, seq_len=t.seq_len, global_batch=t.global_batch, seed=t.seed)
    batch = lambda i: sharding.global_batch_array(data.local_batch(i), trainer.mesh, trainer.rules)
    poisoned = sharding.global_batch_array(np.full_like(data.local_batch(0), POISON),
                                           trainer.mesh, trainer.rules)
    state = trainer.init(jax.random.key(0))
    for i in range(2):
        state, _ = trainer.step(state, batch(i))
    before = host(state)
    state, metrics = trainer.step(state, poisoned)  # step 3: inside the pruning window
    m, after = host(metrics), host(state)
    assert np.isnan(m["loss"]) and m["bad_step"] and int(after.step) == 3
    for field in ("params", "opt_state", "saliency", "masks", "history", "stats"):
        assert_trees_equal(getattr(after, field), getattr(before, field))
    state, metrics = trainer.step(state, poisoned)  # step 4: an event step, also bad
    m, after = host(metrics), host(state)
    assert m["bad_step"] and m["pruning_event"] and int(m["bad_steps_longest"]) == 2
    units = lambda masks: sum(int(np.sum(v)) for v in masks.values())
    assert units(after.masks) < units(before.masks)  # the schedule went on
    assert np.isfinite(after.params["layers"]["attn"]["wq"]).all()
    state, metrics = trainer.step(state, batch(4))  # a good step ends the run of bad ones
    m = host(metrics)
    assert not m["bad_step"] and np.isfinite(m["loss"])
    assert host(state.bad_steps) == {"in_a_row": 0, "longest": 2, "total": 2}


def test_a_diverging_run_stops_after_max_bad_steps_and_keeps_its_good_checkpoint(
        good_run, tmp_path, monkeypatch, capfd):
    config = make_tiny_config(steps=8, checkpoint_every=2, log_every=1, max_bad_steps=2)
    config.mesh.shape, config.prune.prune_steps = (4, 2, 1), 6
    shared = train.cached_trainer(CONFIG)  # these loop fields do not change the compiled step
    monkeypatch.setattr(train, "cached_trainer", lambda _: shared)
    poison_from(monkeypatch, 4)  # steps 5, 6, ... are bad
    with pytest.raises(integrity.IntegrityError,
                       match=r"2 training steps in a row had a non-finite loss or gradient norm "
                             r"\(train.max_bad_steps=2; .* the last good checkpoint is step 6"):
        train.run(config, str(tmp_path))
    assert ("effllm_jax.train: warning: 1 step(s) up to step 5 had a non-finite loss or gradient "
            "norm and were skipped (1 in all)") in capfd.readouterr().err
    ckpt = ckpt_lib.Checkpointer(str(tmp_path))
    assert ckpt.all_steps() == [2, 4, 6]  # step 6 holds step 4's weights, pruned at event 6
    loaded = ckpt_lib.load_inference(str(tmp_path), 4)
    good = ckpt_lib.load_inference(str(good_run[0]), 4)
    assert_trees_equal(loaded.params, good.params)  # the same first four steps
    latest = ckpt_lib.load_inference(str(tmp_path))
    assert latest.step == 6
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(latest.params))
    ckpt.close()


def test_a_non_finite_state_is_never_written_and_rotation_keeps_the_good_one(tmp_path):
    cfg = config_lib.model_config(CONFIG)
    spec = ArchSpec.from_masks(llama.full_masks(cfg), cfg)
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=1, async_save=False)
    ckpt.save(1, {"params": {"wk": jnp.ones(4)}}, spec, {"step": 1})
    with pytest.raises(integrity.IntegrityError,
                       match=r"refusing to write checkpoint step 2: .*\['wk'\].*last good "
                             r"checkpoint is step 1"):
        ckpt.save(2, {"params": {"wk": jnp.array([1.0, jnp.nan, 2.0, 3.0])}}, spec, {"step": 2})
    assert ckpt.all_steps() == [1]
    assert not (tmp_path / "checkpoints" / "2").exists()
    ckpt.close()


def _damage(step_dir, how: str) -> None:
    """Truncates, or flips 64 bytes in the middle of, the array data file of a step (OCDBT's
    merged store: the per-process stores beside it are no longer read)."""
    path = max((step_dir / "state" / "d").iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[:len(data) // 2]))
    else:
        middle = len(data) // 2
        data[middle:middle + 64] = bytes(b ^ 0x5A for b in data[middle:middle + 64])
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "flipped"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(good_run, tmp_path, capfd, how):
    good_dir, good_state = good_run
    run = tmp_path / "run"
    shutil.copytree(good_dir, run)
    _damage(run / "checkpoints" / "8", how)
    damaged = sorted(p.relative_to(run / "checkpoints" / "8")
                     for p in (run / "checkpoints" / "8").rglob("*"))
    capfd.readouterr()
    loaded = ckpt_lib.load_inference(str(run))  # a reader falls back and moves nothing
    err = capfd.readouterr().err
    assert loaded.step == 4 and loaded.spec.step == 4
    assert "skipping checkpoint step 8:" in err, err
    assert (run / "checkpoints" / "8").exists()
    # The trainer sets step 8 aside (kept), resumes from 4 and writes step 8 again, exactly.
    state, spec = train.run(CONFIG, str(run))
    assert "moved bad checkpoint step 8" in capfd.readouterr().err
    assert_trees_equal(state, good_state)
    assert ckpt_lib.Checkpointer(str(run)).all_steps() == [4, 8]
    kept = run / ckpt_lib.SKIPPED_DIR / "8"
    assert sorted(p.relative_to(kept) for p in kept.rglob("*")) == damaged
    assert ckpt_lib.load_inference(str(run)).step == 8


def _two_steps(tmp_path, second: jax.Array) -> ckpt_lib.Checkpointer:
    """A checkpointer with a good step 1 and a step 2 holding `second` as `wk`."""
    cfg = config_lib.model_config(CONFIG)
    spec = ArchSpec.from_masks(llama.full_masks(cfg), cfg)
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(1, {"wk": jnp.arange(4.0)}, spec, {"step": 1})
    ckpt.manager.save(2, args=ckpt_lib.ocp.args.Composite(  # past the guard, as a bug might
        state=ckpt_lib.ocp.args.StandardSave({"wk": second}),
        spec=ckpt_lib.ocp.args.JsonSave(spec.to_json()),
        data=ckpt_lib.ocp.args.JsonSave({"step": 2})))
    return ckpt


def test_restored_non_finite_values_fall_back_to_the_step_before(tmp_path, capfd):
    ckpt = _two_steps(tmp_path, jnp.array([0.0, jnp.inf, 2.0, 3.0]))
    step, state = ckpt.restore_good_state({"wk": jax.ShapeDtypeStruct((4,), jnp.float32)})
    assert step == 1 and np.array_equal(state["wk"], np.arange(4.0))
    assert "skipping checkpoint step 2: checkpoint step 2 restores NaN or infinite values in " \
           "['wk']" in capfd.readouterr().err
    ckpt.close()


def test_finite_but_altered_values_fail_their_checksum_and_fall_back(tmp_path, capfd):
    ckpt = _two_steps(tmp_path, jnp.arange(4.0))
    # Step 3's checksums are of other values: as if its bytes had changed on disk since.
    ckpt.manager.save(3, args=ckpt_lib.ocp.args.Composite(
        state=ckpt_lib.ocp.args.StandardSave({"wk": jnp.arange(4.0) + 1}),
        integrity=ckpt_lib.ocp.args.JsonSave({"checksums": integrity.fingerprint(
            {"wk": jnp.arange(4.0)})[1]})))
    step, _ = ckpt.restore_good_state({"wk": jax.ShapeDtypeStruct((4,), jnp.float32)})
    assert step == 2  # no checksum record at step 2 (saved past the guard): finiteness only
    err = capfd.readouterr().err
    assert "skipping checkpoint step 3: checkpoint step 3 does not hold the bytes it was saved " \
           "with (checksum mismatch in ['wk'])" in err, err
    ckpt.close()


@pytest.mark.parametrize("value", [0, -1])  # (a float or bool is refused by the ConfigDict)
def test_max_bad_steps_must_be_a_whole_number_of_at_least_one(value):
    config = make_tiny_config(max_bad_steps=value)
    with pytest.raises(ValueError, match=r"train.max_bad_steps=.* must be a whole number >= 1"):
        config_lib.validate(config, jax.device_count())


def test_a_checkpoint_saved_before_the_bad_step_counters_restores_with_them_zeroed(tmp_path):
    trainer = train.cached_trainer(CONFIG)
    state = trainer.init(jax.random.key(0))
    older = {f: getattr(state, f) for f in ("step", "params", "opt_state", "masks", "saliency",
                                            "history", "stats")}  # as saved before bad_steps
    cfg = config_lib.model_config(CONFIG)
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(3, older, ArchSpec.from_masks(llama.full_masks(cfg), cfg), {"step": 3})
    abstract = ckpt_lib.abstract_with_shardings(jax.eval_shape(lambda: state),
                                                trainer.state_shardings)
    restored = ckpt.restore_state(abstract, 3)
    ckpt.close()
    assert_trees_equal(restored.params, state.params)
    assert_trees_equal(restored.opt_state, state.opt_state)
    assert all(int(v) == 0 for v in jax.tree.leaves(host(restored.bad_steps)))
    assert restored.bad_steps.keys() == state.bad_steps.keys()
