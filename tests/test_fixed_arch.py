"""Direct pretraining of a found architecture (python -m effllm_jax.fixed_arch): fresh weights
under a pruned run's masks, which training keeps fixed (no pruning event changes them)."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from conftest import make_tiny_config
from effllm_jax import checkpoint as ckpt_lib
from effllm_jax import config as config_lib
from effllm_jax import fixed_arch, prune_posthoc, train
from effllm_jax.model import llama
from effllm_jax.pruning import groups

SEED = 3


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    """A run directory holding hand-pruned masks, and its own init weights under them."""
    config = make_tiny_config(seed=SEED, steps=3)
    cfg = config_lib.model_config(config)
    masks = jax.tree.map(np.array, llama.full_masks(cfg))
    masks["heads"][0, 1] = masks["heads"][1, 3] = False
    masks["ffn"][0, :20] = masks["ffn"][1, 30:] = False
    masks["hidden"][5:9] = False
    params = jax.tree.map(np.asarray, llama.init_params(cfg, jax.random.key(SEED)))
    workdir = str(tmp_path_factory.mktemp("fixed") / "pruned")
    with config.unlocked():
        config.prune.target_params = int(groups.count_params(masks, cfg))
    prune_posthoc.write_run(workdir, config, params, masks, None)
    return workdir, cfg, masks, params


def test_fresh_weights_train_at_the_pruned_runs_fixed_masks(pruned_run, tmp_path):
    source, cfg, masks, source_params = pruned_run
    out = str(tmp_path / "direct")
    spec = fixed_arch.write_run(source, out, steps=4)
    start = ckpt_lib.load_inference(out)
    assert start.step == 0 and spec.live_params == int(groups.count_params(masks, cfg))
    pmask = groups.param_masks(masks, cfg)
    for p, m, own in zip(jax.tree.leaves(start.params), jax.tree.leaves(pmask),
                         jax.tree.leaves(source_params)):
        m = np.broadcast_to(m, p.shape)
        assert not np.any(p[~m])  # pruned weights are zero
        if np.ptp(own) > 0:  # a fresh draw, not the pruned run's own initial weights (norms are 1)
            assert not np.allclose(p[m], own[m])
    state, final = train.run(ckpt_lib.load_run_config(out), out)
    assert int(state.step) == 4 and final.live_params == spec.live_params
    for name in masks:  # the no-op event at step 1 removed nothing
        np.testing.assert_array_equal(jax.device_get(state.masks[name]), masks[name])
    assert not np.allclose(jax.device_get(state.params["embed"]), start.params["embed"])


@pytest.mark.parametrize("args, words", [
    (["--masks_from=/nonexistent/run"], "not a training run directory"),
    (["--steps=0"], "--steps"),
])
def test_cli_refuses_bad_input_in_one_line(args, words, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        fixed_arch.main([f"--out={tmp_path / 'x'}", "--masks_from=/nonexistent/run", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err and len(err.strip().splitlines()) == 1, err
