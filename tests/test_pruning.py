"""Pure pruning logic: group sizes, saliency reduction, the schedule and the event."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effllm_jax.model import llama
from effllm_jax.pruning import groups
from effllm_jax.pruning.schedule import PruneSchedule
from effllm_jax.pruning.select import SelectConfig, max_group_cost
from effllm_jax.pruning.select import select as select_eager

select = jax.jit(select_eager, static_argnums=(2, 4))  # one compile per (model, SelectConfig)

CFG = llama.ModelConfig(vocab_size=64, d_model=16, num_layers=3, num_heads=4, num_kv_heads=2,
                        head_dim=4, ffn_dim=12)


def test_dense_count_matches_parameter_tree():
    for tie in (True, False):
        cfg = llama.ModelConfig(**{**CFG.__dict__, "tie_embeddings": tie})
        n = sum(x.size for x in jax.tree.leaves(llama.abstract_params(cfg)))
        assert groups.dense_params(cfg) == n == int(groups.count_params(
            jax.tree.map(np.asarray, llama.full_masks(cfg)), cfg))


def test_schedule_is_linear_with_events_every_n_and_a_final_event():
    s = PruneSchedule(dense_params=1000, target_params=400, warmup_steps=10, prune_steps=25,
                      every=10)
    assert s.event_steps() == [20, 30, 35]
    assert float(s.budget(10)) == 1000 and float(s.budget(35)) == 400
    assert float(s.budget(60)) == 400 and float(s.budget(20)) == pytest.approx(760)
    assert not s.collecting(10) and s.collecting(11) and s.collecting(35) and not s.collecting(36)


def _saliency(seed):
    rng = np.random.default_rng(seed)
    return {"heads": jnp.asarray(rng.random((3, 4)), jnp.float32),
            "kv_heads": jnp.asarray(rng.random((3, 2)), jnp.float32),
            "ffn": jnp.asarray(rng.random((3, 12)), jnp.float32),
            "hidden": jnp.asarray(rng.random(16), jnp.float32) * 100, "steps": jnp.ones(())}


def test_event_meets_budget_within_one_group_and_never_revives():
    masks = llama.full_masks(CFG)
    dense = groups.dense_params(CFG)
    for i, frac in enumerate((0.9, 0.8, 0.6, 0.5)):
        budget = dense * frac
        new = select(masks, _saliency(i), CFG, budget, SelectConfig())
        live = float(groups.count_params(new, CFG))
        biggest = max_group_cost(masks, CFG, SelectConfig())
        assert budget - biggest < live <= budget
        for k in masks:  # pruned units never come back
            assert not np.any(np.asarray(new[k]) & ~np.asarray(masks[k]))
        masks = new


def test_event_removes_the_least_salient_per_parameter():
    sal = _saliency(0)
    sal["ffn"] = sal["ffn"].at[1, 5].set(-1.0)  # clearly the least salient unit
    masks = llama.full_masks(CFG)
    budget = groups.dense_params(CFG) - 1  # one small group is enough
    new = select(masks, sal, CFG, budget, SelectConfig(group_types=("heads", "ffn", "hidden")))
    removed = {k: np.argwhere(~np.asarray(new[k])) for k in new}
    assert removed["ffn"].tolist() == [[1, 5]]
    assert removed["heads"].size == 0 and removed["hidden"].size == 0


def test_uniform_layers_keep_equal_widths_and_group_types_are_respected():
    masks = llama.full_masks(CFG)
    budget = groups.dense_params(CFG) * 0.7
    sel = SelectConfig(uniform_layers=True, group_types=("heads", "ffn"))
    new = select(masks, _saliency(3), CFG, budget, sel)
    heads, ffn = np.asarray(new["heads"]).sum(1), np.asarray(new["ffn"]).sum(1)
    assert len(set(heads)) == 1 and len(set(ffn)) == 1
    assert np.asarray(new["hidden"]).all()
    live = float(groups.count_params(new, CFG))
    assert budget - max_group_cost(masks, CFG, sel) < live <= budget


def test_gqa_kv_head_goes_only_with_its_last_query_head():
    masks = {k: np.array(v) for k, v in llama.full_masks(CFG).items()}
    masks["heads"][0, 0] = False
    assert groups.kv_alive(masks["heads"], CFG)[0].tolist() == [True, True]
    masks["heads"][0, 1] = False
    assert groups.kv_alive(masks["heads"], CFG)[0].tolist() == [False, True]
    full = groups.dense_params(CFG)
    # two heads (q rows + o columns: 2 d*hd each) and one KV head (k + v rows: 2 d*hd)
    assert int(groups.count_params(masks, CFG)) == full - 6 * CFG.d_model * CFG.head_dim


@pytest.mark.parametrize("uniform", [False, True])
def test_round_to_keeps_ffn_and_hidden_widths_multiples(uniform):
    cfg = llama.ModelConfig(vocab_size=64, d_model=32, num_layers=3, num_heads=4,
                            num_kv_heads=2, head_dim=4, ffn_dim=48)
    rng = np.random.default_rng(7)
    sal = {"heads": jnp.asarray(rng.random((3, 4)), jnp.float32),
           "kv_heads": jnp.asarray(rng.random((3, 2)), jnp.float32),
           "ffn": jnp.asarray(rng.random((3, 48)), jnp.float32),
           "hidden": jnp.asarray(rng.random(32), jnp.float32), "steps": jnp.ones(())}
    masks = llama.full_masks(cfg)
    sel = SelectConfig(round_to=8, uniform_layers=uniform)
    for frac in (0.8, 0.6):
        budget = groups.dense_params(cfg) * frac
        new = select(masks, sal, cfg, budget, sel)
        assert all(int(n) % 8 == 0 for n in np.asarray(new["ffn"]).sum(1))
        assert int(np.asarray(new["hidden"]).sum()) % 8 == 0
        assert not np.any(np.asarray(new["ffn"]) & ~np.asarray(masks["ffn"]))
        live = float(groups.count_params(new, cfg))
        assert budget - max_group_cost(masks, cfg, sel) < live <= budget
        masks = new
