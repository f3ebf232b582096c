"""FLOPs per token, the measured CPU peak, and the MFU columns of metrics.jsonl."""
import dataclasses
import json

import jax
import numpy as np
import pytest
from conftest import make_tiny_config

from effllm_jax import config as config_lib
from effllm_jax import mfu, train
from effllm_jax.arch import ArchSpec
from effllm_jax.model import llama
from effllm_jax.pruning import groups


@pytest.mark.parametrize("tie", [True, False])
def test_live_flops_from_step_metrics_equal_the_spec_count(tie):
    cfg = dataclasses.replace(config_lib.model_config(make_tiny_config()), tie_embeddings=tie)
    rng = np.random.default_rng(0)
    masks = {"hidden": rng.random(cfg.d_model) < 0.7,
             "heads": rng.random((cfg.num_layers, cfg.num_heads)) < 0.6,
             "ffn": rng.random((cfg.num_layers, cfg.ffn_dim)) < 0.5}
    counts = groups.unit_counts(masks, cfg)
    from_counts = mfu.flops_per_token_from_counts(
        cfg, float(groups.count_params(masks, cfg)), float(counts["heads"].sum()),
        float(counts["hidden"]), seq_len=64)
    spec = ArchSpec.from_masks(masks, cfg)
    np.testing.assert_allclose(from_counts, mfu.flops_per_token(spec, 64), rtol=1e-9)
    assert from_counts < mfu.flops_per_token(spec, 64, dense=True)


def test_cpu_peak_is_measured_once_per_process_and_a_configured_peak_wins():
    assert mfu.peak_flops_per_device(123.0) == 123.0
    first = mfu.peak_flops_per_device()
    assert first == mfu.peak_flops_per_device() == mfu.measured_peak_flops("float32")
    assert 1e8 < first < 1e14  # FLOP/s of a CPU, not of a stray unit


def test_metrics_jsonl_carries_mfu_of_the_live_and_the_executed_model(tmp_path):
    config = make_tiny_config(steps=12, log_every=2, checkpoint_every=100, eval_every=0,
                              peak_flops_per_device=1e9)
    train.run(config, str(tmp_path))
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [2, 4, 6, 8, 10, 12]
    cfg = config_lib.model_config(config)
    dense_flops = mfu.flops_per_token(ArchSpec.from_masks(llama.full_masks(cfg), cfg),
                                      config.train.seq_len, dense=True)
    for l in lines:
        for key in ("tokens", "loss", "tok/s", "mfu", "mfu_hw", "live_M", "executed_M",
                    "pruned", "pruned_heads", "pruned_ffn", "pruned_hidden"):
            assert key in l, key
        peak = 1e9 * jax.device_count()
        np.testing.assert_allclose(l["mfu_hw"], l["tok/s"] * dense_flops / peak, rtol=1e-6)
        assert l["executed_M"] == pytest.approx(groups.dense_params(cfg) / 1e6)
    assert lines[0]["mfu"] == pytest.approx(lines[0]["mfu_hw"], rel=1e-6)  # dense warm-up
    assert lines[-1]["pruned"] > 0.3 and lines[-1]["mfu"] < 0.8 * lines[-1]["mfu_hw"]
