"""The sharded train step: meshes, pruning inside the step, the schedule, zeros, checkpoints."""
import json
import shutil

import jax
import numpy as np
import optax
import pytest
from conftest import make_resume_config, make_tiny_config

from effllm_jax import checkpoint as ckpt_lib
from effllm_jax import config as config_lib
from effllm_jax import sharding, train
from effllm_jax.arch import ArchSpec
from effllm_jax.data import build_dataset
from effllm_jax.pruning import groups
from effllm_jax.model import llama
from effllm_jax.pruning.select import max_group_cost

CONFIG = make_tiny_config(steps=12)
MESHES = [(8, 1, 1), (2, 2, 2), (1, 2, 4)]


def run_steps(trainer, config, steps):
    """Runs `steps` steps from a fresh state; returns (state, per-step metrics)."""
    t = config.train
    data = build_dataset(config.data, seq_len=t.seq_len, global_batch=t.global_batch, seed=t.seed)
    state = trainer.init(jax.random.key(t.seed))
    history = []
    for i in range(steps):
        batch = sharding.global_batch_array(data.local_batch(i), trainer.mesh, trainer.rules)
        state, metrics = trainer.step(state, batch)
        history.append(jax.device_get(metrics))
    return state, history


@pytest.fixture(scope="module")
def runs():
    """One compiled trainer and a 12-step run (5 pruning events) per mesh."""
    out = {}
    for shape in MESHES:
        trainer = train.build_trainer(CONFIG, sharding.make_mesh(shape))
        state, history = run_steps(trainer, CONFIG, CONFIG.train.steps)
        out[shape] = (trainer, state, history)
    return out


def test_same_loss_masks_and_history_on_every_mesh(runs):
    losses = {shape: np.array([m["loss"] for m in h]) for shape, (_, _, h) in runs.items()}
    for shape in MESHES[1:]:
        np.testing.assert_allclose(losses[shape], losses[MESHES[0]], rtol=2e-5, atol=2e-5)
    assert losses[MESHES[0]][-1] < losses[MESHES[0]][0]  # it learns
    first = jax.device_get(runs[MESHES[0]][1])
    assert not np.asarray(first.masks["ffn"]).all()  # something was pruned
    for shape in MESHES[1:]:
        other = jax.device_get(runs[shape][1])
        for unit in first.masks:  # the same units removed, at the same steps, by the same type
            np.testing.assert_array_equal(other.masks[unit], first.masks[unit])
            np.testing.assert_array_equal(other.history[unit]["step"], first.history[unit]["step"])
            np.testing.assert_array_equal(other.history[unit]["type"], first.history[unit]["type"])


def test_params_really_are_sharded(runs):
    trainer, state, _ = runs[(1, 2, 4)]
    wq = state.params["layers"]["attn"]["wq"]  # [L, D, H, hd]: embed over fsdp, heads over tensor
    assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert len(wq.addressable_shards) == 8 and wq.addressable_shards[0].data.shape == (2, 16, 1, 8)


def test_masks_change_inside_the_step_without_recompiling(runs):
    trainer, state, history = runs[(2, 2, 2)]
    events = [i + 1 for i, m in enumerate(history) if m["pruning_event"]]
    assert events == trainer.step_cfg.schedule.event_steps() == [4, 6, 8, 10]
    live = [float(m["live_params"]) for m in history]
    assert len(set(live[e - 1] for e in events)) == len(events)  # every event removed something
    assert trainer.step._cache_size() == 1  # one compilation for all 12 steps and 4 events


def test_live_params_follow_the_schedule_and_end_at_target(runs):
    trainer, state, history = runs[(8, 1, 1)]
    schedule = trainer.step_cfg.schedule
    masks = jax.tree.map(np.asarray, jax.device_get(state.masks))
    # any one group's size at the first event bounds every later one (sizes only shrink)
    biggest_group = max_group_cost(llama.full_masks(trainer.step_cfg.model),
                                   trainer.step_cfg.model, trainer.step_cfg.select)
    for i, m in enumerate(history):
        step = i + 1
        budget = float(schedule.budget(step))
        if m["pruning_event"]:
            assert budget - biggest_group < m["live_params"] <= budget
        if step <= schedule.warmup_steps:
            assert m["live_params"] == schedule.dense_params
    final = float(history[-1]["live_params"])
    assert schedule.target_params - biggest_group < final <= schedule.target_params
    spec = ArchSpec.from_masks(masks, trainer.step_cfg.model)
    assert spec.live_params == final


def test_spec_records_every_pruning_event(runs):
    trainer, state, history = runs[(8, 1, 1)]
    cfg, t = trainer.step_cfg.model, CONFIG.train
    host = jax.device_get(state)
    spec = ArchSpec.from_masks(host.masks, cfg, 12, 12 * t.global_batch * t.seq_len, host.history)
    parsed = ArchSpec.from_json(json.loads(json.dumps(spec.to_json())))  # JSON alone suffices
    assert parsed == spec and parsed.events == spec.events
    dead = {u: set(map(tuple, np.argwhere(~np.asarray(host.masks[u])))) for u in host.masks}
    seen = {"heads": set(), "ffn": set(), "hidden": set()}
    events = trainer.step_cfg.schedule.event_steps()
    for e in parsed.events:
        unit = {"heads": "heads", "ffn": "ffn", "hidden": "hidden"}[e.type]
        seen[unit].add((e.index,) if unit == "hidden" else (e.layer, e.index))
        assert e.step in events and e.tokens == e.step * t.global_batch * t.seq_len
        assert e.saliency >= 0.0
    assert seen == dead and len(parsed.events) == sum(len(v) for v in dead.values())
    # replaying the events step by step reproduces the live count after every event
    for step in events:
        kept = {u: np.ones(np.shape(host.masks[u]), bool) for u in host.masks}
        for e in parsed.events:
            if e.step <= step:
                kept[e.type][(e.index,) if e.type == "hidden" else (e.layer, e.index)] = False
        assert float(groups.count_params(kept, cfg)) == float(history[step - 1]["live_params"])


def test_pruned_weights_and_adam_moments_stay_exactly_zero(runs):
    trainer, state, _ = runs[(1, 2, 4)]
    pmask = groups.param_masks(jax.device_get(state.masks), trainer.step_cfg.model)
    trees = [state.params, optax.tree_utils.tree_get(state.opt_state, "mu"),
             optax.tree_utils.tree_get(state.opt_state, "nu")]
    dead_total = 0
    for tree in trees:
        for x, m in zip(jax.tree.leaves(tree), jax.tree.leaves(pmask)):
            dead = ~np.broadcast_to(np.asarray(m), x.shape)
            dead_total += dead.sum()
            assert np.all(np.asarray(x)[dead] == 0.0)
    assert dead_total > 0


def _assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(jax.device_get(x)), np.asarray(jax.device_get(y)))


def test_save_restore_is_bit_identical_also_onto_another_mesh(runs, tmp_path):
    trainer, state, _ = runs[(2, 2, 2)]
    spec = ArchSpec.from_masks(jax.device_get(state.masks), trainer.step_cfg.model, 12, 1536)
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
    ckpt.save(12, state, spec, {"step": 12, "seed": 0})
    ckpt.wait()
    step, spec2, position = ckpt.restore_meta()
    assert (step, spec2, position) == (12, spec, {"step": 12, "seed": 0})
    for shape in [(2, 2, 2), (1, 2, 4)]:
        target = runs[shape][0]
        abstract = jax.eval_shape(lambda: target.init(jax.random.key(0)))
        restored = ckpt.restore_state(
            ckpt_lib.abstract_with_shardings(abstract, target.state_shardings))
        _assert_trees_equal(restored, state)
        wq = restored.params["layers"]["attn"]["wq"]
        assert wq.sharding == target.state_shardings.params["layers"]["attn"]["wq"]
    ckpt.close()


def test_run_resumes_exactly_after_a_crash(tmp_path):
    """A run killed after its step-6 checkpoint and restarted ends bit-identical."""
    config = make_resume_config()
    full_state, full_spec = train.run(config, str(tmp_path / "full"))
    crashed = tmp_path / "crashed"
    train.run(config, str(crashed))
    shutil.rmtree(crashed / "checkpoints" / "8")  # as if the process died before step 8's save
    resumed_state, resumed_spec = train.run(config, str(crashed))
    assert resumed_spec == full_spec
    _assert_trees_equal(resumed_state, full_state)
    loaded = ckpt_lib.load_inference(str(crashed))
    assert loaded.step == 8 and loaded.spec.live_params == full_spec.live_params
    _assert_trees_equal(loaded.params, full_state.params)


def test_corrupt_checkpoint_gets_a_clear_error_and_nothing_is_deleted(runs, tmp_path):
    trainer, state, _ = runs[(8, 1, 1)]
    spec = ArchSpec.from_masks(jax.device_get(state.masks), trainer.step_cfg.model)
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
    ckpt.save(5, state, spec, {"step": 5, "seed": 0})
    ckpt.close()
    files = sorted(p for p in (tmp_path / "checkpoints" / "5" / "state").rglob("*") if p.is_file())
    assert files
    for path in files:  # flip every byte of every array/metadata file
        data = path.read_bytes()
        path.write_bytes(bytes(b ^ 0xFF for b in data))
    before = {p: p.read_bytes() for p in files}
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
    abstract = jax.eval_shape(lambda: trainer.init(jax.random.key(0)))
    with pytest.raises(ckpt_lib.CheckpointError, match="checkpoint step 5 .* is corrupt"):
        ckpt.restore_state(ckpt_lib.abstract_with_shardings(abstract, trainer.state_shardings))
    ckpt.close()
    assert {p: p.read_bytes() for p in files} == before


def test_second_order_criterion_and_every_group_type_prune_inside_one_compilation():
    config = make_tiny_config(steps=10)
    config.prune.update(criterion="taylor_fisher",
                        group_types=("heads", "kv_groups", "ffn", "mlp_blocks", "hidden"))
    config_lib.validate(config, jax.device_count())
    trainer = train.build_trainer(config, sharding.make_mesh((1, 2, 4)))
    state, history = run_steps(trainer, config, 10)
    assert trainer.step._cache_size() == 1
    # Σg is params-shaped and sharded like the params; the masks moved at every event
    wq_sum = state.saliency["grad_sum"]["layers"]["attn"]["wq"]
    assert wq_sum.sharding == state.params["layers"]["attn"]["wq"].sharding
    live = [float(m["live_params"]) for m in history if m["pruning_event"]]
    assert len(live) == 4 and all(a > b for a, b in zip(live, live[1:]))
    schedule, cfg = trainer.step_cfg.schedule, trainer.step_cfg.model
    bound = max_group_cost(llama.full_masks(cfg), cfg, trainer.step_cfg.select)
    assert schedule.target_params - bound < live[-1] <= schedule.target_params
    host = jax.device_get(state)
    spec = ArchSpec.from_masks(host.masks, cfg, 10, 10, host.history)
    assert {e.type for e in spec.events} <= set(config.prune.group_types)
    assert len(spec.events) == sum(int((~np.asarray(m)).sum()) for m in host.masks.values())


def _branch_outputs(jaxpr) -> list:
    """Shapes of every output of every lax.cond in a (closed) jaxpr, nested ones included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "cond":
            out += [tuple(v.aval.shape) for v in eqn.outvars]
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out += _branch_outputs(inner)
    return out


@pytest.mark.parametrize("criterion", ["taylor", "taylor_fisher"])
def test_no_params_sized_array_passes_through_a_branch(criterion):
    """A lax.cond's outputs are fresh buffers: on a pod, a branch over the state would hold a
    second copy of params, Adam moments and Σg per chip. The event and the saliency window
    branch over mask-sized arrays only (train_step.apply_event, saliency.accumulate_in_window)."""
    config = make_tiny_config()
    config.prune.criterion = criterion
    trainer = train.build_trainer(config, sharding.make_mesh((8, 1, 1)))
    state = jax.eval_shape(trainer.init, jax.random.key(0))
    batch = jax.ShapeDtypeStruct((config.train.global_batch, config.train.seq_len + 1), np.int32)
    branched = _branch_outputs(jax.make_jaxpr(trainer.step)(state, batch).jaxpr)
    params_shaped = {tuple(x.shape) for x in jax.tree.leaves(state.params) if x.size >= 256}
    assert branched, "the step has no branches at all: the test no longer looks at the event"
    assert not params_shaped & set(branched), sorted(params_shaped & set(branched))
