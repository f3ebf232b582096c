"""The pruning event's selection: the budget always holds, floors and uniform shapes are kept,
every group type stays exact (masked == sliced), and bad prune settings are refused."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_tiny_config

from effllm_jax import config as config_lib
from effllm_jax.arch import ArchSpec
from effllm_jax.model import llama
from effllm_jax.model.compact import apply_compact, slice_params
from effllm_jax.pruning import groups
from effllm_jax.pruning.select import SelectConfig, max_group_cost, select_with_record
from effllm_jax.pruning.validate import min_live_params

CFG = llama.ModelConfig(vocab_size=64, d_model=32, num_layers=3, num_heads=8, num_kv_heads=4,
                        head_dim=4, ffn_dim=96)
ALL_TYPES = ("heads", "kv_groups", "attn_blocks", "ffn", "mlp_blocks", "hidden")


def random_saliency(rng, cfg=CFG):
    """Random group saliencies, each type on its own random scale (so each may go first)."""
    scale = lambda: 10.0 ** rng.uniform(-2, 2)
    shapes = {"heads": (cfg.num_layers, cfg.num_heads), "kv_heads": (cfg.num_layers, cfg.num_kv_heads),
              "ffn": (cfg.num_layers, cfg.ffn_dim), "hidden": (cfg.d_model,)}
    return {k: jnp.asarray(rng.random(s) * scale(), jnp.float32) for k, s in shapes.items()}


def _configs():
    """Every round_to x uniform_layers x floors, with group types varied across them."""
    floors = [dict(), dict(min_heads_per_layer=3, min_ffn=10, min_hidden=12)]
    types = [("heads", "ffn", "hidden"), ("heads", "kv_groups", "ffn", "hidden"), ALL_TYPES]
    for i, (round_to, uniform, floor) in enumerate(itertools.product((1, 8, 64), (False, True), floors)):
        kinds = types[i % 3]
        if uniform:
            kinds = tuple(t for t in kinds if t not in ("attn_blocks", "mlp_blocks"))
        yield SelectConfig(round_to=round_to, uniform_layers=uniform, group_types=kinds, **floor)


@pytest.mark.parametrize("sel", list(_configs()), ids=lambda s: (
    f"r{s.round_to}-{'uniform' if s.uniform_layers else 'free'}-floor{s.min_heads_per_layer}-"
    f"{len(s.group_types)}types"))
def test_budget_holds_at_every_event_within_one_group_with_floors_and_shapes(sel):
    dense = groups.dense_params(CFG)
    target = max(0.3 * dense, 1.02 * min_live_params(CFG, sel))
    event = jax.jit(lambda m, s, b: select_with_record(m, s, CFG, b, sel))
    blocks = {"heads": "attn_blocks" in sel.group_types, "ffn": "mlp_blocks" in sel.group_types}
    for seed in range(4):
        rng = np.random.default_rng(seed)
        masks = jax.tree.map(np.asarray, llama.full_masks(CFG))
        for budget in np.linspace(dense, target, 5)[1:]:
            new, record = jax.device_get(event(masks, random_saliency(rng), budget))
            live = float(groups.count_params(new, CFG))
            assert budget - max_group_cost(masks, CFG, sel) < live <= budget, (seed, budget)
            for u in new:  # never revives; the record names exactly the units removed now
                assert not np.any(new[u] & ~masks[u])
                np.testing.assert_array_equal(record[u][0] >= 0, masks[u] & ~new[u])
            heads, ffn = new["heads"].sum(1), new["ffn"].sum(1)
            hidden = int(new["hidden"].sum())
            assert np.all((heads >= sel.min_heads_per_layer) | (blocks["heads"] & (heads == 0)))
            assert np.all((ffn >= min(sel.min_ffn, CFG.ffn_dim)) | (blocks["ffn"] & (ffn == 0)))
            assert hidden >= sel.min_hidden
            assert all(n % sel.round_to == 0 or n == CFG.ffn_dim for n in ffn)
            assert hidden % sel.round_to == 0 or hidden == CFG.d_model
            if sel.uniform_layers:  # same widths and the same even GQA grouping everywhere
                spec = ArchSpec.from_masks(new, CFG)
                assert spec.uniform, spec.layers
            masks = new
        assert target - max_group_cost(masks, CFG, sel) < live <= target


def test_block_and_kv_group_pruning_stay_exact_masked_equals_sliced():
    cfg = llama.ModelConfig(vocab_size=96, d_model=48, num_layers=3, num_heads=6, num_kv_heads=2,
                            head_dim=8, ffn_dim=40, tie_embeddings=False)
    params = llama.init_params(cfg, jax.random.key(0))
    sal = random_saliency(np.random.default_rng(1), cfg)
    sal["heads"] = sal["heads"].at[1].set(0.0)  # layer 1's attention and layer 2's MLP
    sal["kv_heads"] = sal["kv_heads"].at[1].set(0.0)  # are worthless: whole blocks go
    sal["ffn"] = sal["ffn"].at[2].set(0.0)
    sal["kv_heads"] = sal["kv_heads"].at[0, 1].set(1e-4)  # layer 0's second KV group is weak
    sal["heads"] = sal["heads"].at[0, 3:].set(1e-4)
    sel = SelectConfig(group_types=("kv_groups", "attn_blocks", "mlp_blocks"))
    budget = groups.dense_params(cfg) * 0.7  # both blocks and one KV group
    masks, record = jax.jit(lambda s: select_with_record(llama.full_masks(cfg), s, cfg, budget,
                                                         sel))(sal)
    masks = jax.tree.map(np.asarray, masks)
    spec, compact = slice_params(params, masks, cfg)
    assert spec.layers[1].num_heads == 0 and spec.layers[2].ffn_dim == 0
    assert spec.layers[0].q_per_kv == (3,)  # a whole KV group went, with its query heads
    how = {u: np.asarray(record[u][0]) for u in record}  # indices into select.GROUP_TYPES
    assert set(how["heads"][1]) <= {1, 2} and how["heads"][0].tolist() == [-1] * 3 + [1] * 3
    assert how["ffn"][2].tolist() == [4] * 40 and (how["ffn"][:2] == -1).all()
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)))
    masked = llama.apply(cfg, params, tokens, masks)
    sliced = apply_compact(spec, compact, tokens)
    assert float(jnp.max(jnp.abs(masked - sliced))) <= 1e-5
    assert spec.live_params == sum(x.size for x in jax.tree.leaves(compact))


@pytest.mark.parametrize("change, message", [
    (dict(model=dict(num_kv_heads=4), prune=dict(group_types=("kv_groups", "ffn"))),
     "has 'kv_groups' but the model has no GQA"),
    (dict(prune=dict(target_params=150)), "cannot be reached"),  # 128 vocab + 1 channel: 203
    (dict(prune=dict(target_fraction=0.3, group_types=("heads", "ffn"))), "cannot be reached"),
    (dict(prune=dict(prune_steps=20)), "train.steps=12 ends before the last pruning event"),
    (dict(prune=dict(uniform_layers=True, group_types=("heads", "mlp_blocks"))),
     "cannot keep equal layers"),
    (dict(prune=dict(min_ffn=0)), "prune.min_ffn=0 must be >= 1"),
])
def test_bad_prune_settings_get_one_clear_line(change, message):
    config = make_tiny_config()
    for section, fields in change.items():
        config[section].update(fields)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as err:
        config_lib.validate(config, jax.device_count())
    assert "\n" not in str(err.value)


def test_a_reachable_target_at_the_floor_is_accepted_and_reached():
    config = make_tiny_config()
    cfg, sel = config_lib.model_config(config), config_lib.select_config(config)
    config.prune.target_params = min_live_params(cfg, sel)
    config_lib.validate(config, jax.device_count())
    rng = np.random.default_rng(0)
    masks = jax.jit(lambda s: select_with_record(llama.full_masks(cfg), s, cfg,
                                                 config.prune.target_params, sel)[0])(
        random_saliency(rng, cfg))
    assert float(groups.count_params(masks, cfg)) <= config.prune.target_params
