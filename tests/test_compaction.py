"""In-training compaction: the compacted step continues the masked one, runs resume from
checkpoints written before and after a compaction, and exports read compacted runs."""
import json
import shutil
from dataclasses import astuple

import jax
import numpy as np
import pytest
from conftest import make_tiny_config

from effllm_jax import compaction, config as config_lib, sharding, train
from effllm_jax.data import build_dataset
from effllm_jax.export import load_language_model


def compact_config(**prune):
    """The tiny run on a (2, 2, 2) mesh (heads and FFN sharded over 'tensor'); events at steps
    4, 6, 8, 10; the budget reaches 75% at step 6, where it compacts, and again after step 10."""
    config = make_tiny_config(steps=12, checkpoint_every=4)
    config.mesh.shape = (2, 2, 2)
    config.prune.update(**{"compact_at": (0.75,), "compact_after_last_event": True,
                           "min_ffn": 16, **prune})  # the floor makes heads and hidden go too
    return config


CONFIG = compact_config()


def _copy(tree):
    return jax.tree.map(lambda x: x.copy(), tree)


@pytest.fixture(scope="module")
def continued():
    """From one state right after the step-6 event: two more steps masked, and compacted."""
    config_lib.validate(CONFIG, jax.device_count())
    t = CONFIG.train
    data = build_dataset(CONFIG.data, seq_len=t.seq_len, global_batch=t.global_batch, seed=t.seed)
    masked = train.cached_trainer(CONFIG)
    batch = lambda i, tr: sharding.global_batch_array(data.local_batch(i), tr.mesh, tr.rules)
    state = masked.init(jax.random.key(t.seed))
    for i in range(6):
        state, _ = masked.step(state, batch(i, masked))
    before = _copy(state)
    small_state, small_cfg, record = compaction.compact_state(
        before, masked.step_cfg, masked.tx, masked.mesh, masked.rules, live_fraction=0.725)
    small = train.cached_trainer(CONFIG, small_cfg)
    out = {"masked": [], "compacted": []}
    for i in (6, 7):  # steps 7 and 8; step 8 is an event
        state, m = masked.step(state, batch(i, masked))
        small_state, s = small.step(small_state, batch(i, small))
        out["masked"].append(jax.device_get(m))
        out["compacted"].append(jax.device_get(s))
    return state, small_state, small_cfg, record, out


def test_compacted_step_continues_the_masked_loss_adam_and_events(continued):
    state, small_state, small_cfg, record, out = continued
    source = CONFIG.model
    cfg = small_cfg.model
    assert (cfg.d_model, cfg.ffn_dim) < (source.d_model, source.ffn_dim)  # really smaller
    for m, s in zip(out["masked"], out["compacted"]):
        np.testing.assert_allclose(s["loss"], m["loss"], rtol=0, atol=1e-5)
        assert s["live_params"] == m["live_params"]
    # Step 8's update used the sliced Adam moments, and its event chose the same units.
    params, masks = compaction.expand(jax.device_get(small_state.params),
                                      jax.device_get(small_state.masks), record,
                                      config_lib.model_config(CONFIG))
    for k, v in jax.device_get(state.masks).items():
        np.testing.assert_array_equal(masks[k], v, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5),
                 params, jax.device_get(state.params))


def test_padded_widths_divide_the_mesh_and_keep_every_live_unit(continued):
    _, small_state, small_cfg, record, _ = continued
    cfg, tensor = small_cfg.model, 2  # heads, KV heads and FFN are sharded over 'tensor'
    assert cfg.num_kv_heads % tensor == 0 and cfg.num_heads % tensor == 0
    assert cfg.ffn_dim % tensor == 0
    assert small_state.params["layers"]["mlp"]["w_up"].sharding.spec[-1] == "tensor"
    # Every executed unit holds a distinct source unit, in source order; padding maps to -1.
    for row in record.heads + record.ffn + (record.hidden,):
        kept = [i for i in row if i >= 0]
        assert kept == sorted(set(kept))
    live = jax.device_get(small_state.masks)
    padding = [(l, i) for l, row in enumerate(record.ffn) for i, j in enumerate(row) if j < 0]
    assert padding and not any(live["ffn"][l, i] for l, i in padding)  # padding stays dead


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A compacted run, the same run masked to the end, and the compacted run resumed from a
    checkpoint written after its first compaction (step 8) and from one before it (step 4)."""
    root = tmp_path_factory.mktemp("compaction")
    full_state, full_spec = train.run(CONFIG, str(root / "compacted"))
    masked_config = compact_config(compact_at=(), compact_after_last_event=False)
    _, masked_spec = train.run(masked_config, str(root / "masked"))
    resumed = {}
    for keep in (8, 4):
        shutil.copytree(root / "compacted", root / f"from{keep}")
        for step in (4, 8, 12):
            if step > keep:
                shutil.rmtree(root / f"from{keep}" / "checkpoints" / str(step))
        resumed[keep] = train.run(CONFIG, str(root / f"from{keep}"))
    return root, (full_state, full_spec), masked_spec, resumed


def test_run_records_executed_shapes_and_speaks_source_units(runs):
    root, (_, spec), masked_spec, _ = runs
    assert spec.executed is not None and spec.executed["step"] == 10  # the last event's
    # The same architecture and events in source units (saliency to float rounding).
    assert (spec.hidden_dim, spec.layers, spec.live_params) == (
        masked_spec.hidden_dim, masked_spec.layers, masked_spec.live_params)
    assert [e[:5] for e in map(astuple, spec.events)] == [
        e[:5] for e in map(astuple, masked_spec.events)]
    np.testing.assert_allclose([e.saliency for e in spec.events],
                               [e.saliency for e in masked_spec.events], rtol=1e-4)
    lines = [json.loads(line) for line in (root / "compacted" / "metrics.jsonl").read_text()
             .splitlines()]
    executed = {line["step"]: line["executed_M"] for line in lines if "executed_M" in line}
    dense = executed[4]
    assert executed[8] < dense and executed[12] < executed[8]  # after steps 6 and 10
    assert all(line["live_M"] <= line["executed_M"] + 1e-9 for line in lines if "live_M" in line)


@pytest.mark.parametrize("keep", [8, 4])
def test_resume_after_and_before_a_compaction_is_bit_identical(runs, keep):
    _, (full_state, full_spec), _, resumed = runs
    state, spec = resumed[keep]
    assert spec == full_spec
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(full_state))


def test_export_of_a_compacted_run_equals_the_masked_runs(runs):
    root = runs[0]
    tokens = np.arange(32, dtype=np.int32).reshape(2, 16) % CONFIG.model.vocab_size
    compacted = load_language_model(str(root / "compacted"))
    masked = load_language_model(str(root / "masked"))
    assert compacted.spec.layers == masked.spec.layers
    np.testing.assert_allclose(compacted.logits(tokens), masked.logits(tokens), rtol=0, atol=1e-4)


def test_compact_at_is_checked_before_anything_compiles():
    for bad, words in (((1.5,), "not a fraction"), ((0.2,), "below the target"),
                       ((0.5, True), "tuple of numbers")):
        config = compact_config()
        config.prune.compact_at = bad
        with pytest.raises(ValueError, match=words):
            config_lib.validate(config, jax.device_count())
