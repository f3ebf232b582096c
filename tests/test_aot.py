"""Ahead-of-time compiles of the real train step for TPU topologies (libtpu, no TPU attached).

Per-chip memory must follow the per-chip batch, not the global batch: the step is batch-sharded
(each chip holds and computes only its rows; parameters are gathered per layer).
"""
import dataclasses
import re

import pytest
from conftest import make_tiny_config

pytest.importorskip("libtpu")

from effllm_jax import aot  # noqa: E402

CHUNK = 256  # loss logits per piece
SEQ = 1024  # long enough that activations, not the pruning step, set the peak temporaries


def tiny(global_batch):
    config = make_tiny_config(global_batch=global_batch, seq_len=SEQ)
    config.mesh.shape = (1, -1, 1)  # FSDP over every chip, as on a pod
    config.model.attention = "einsum"  # [rows, H, T, T] scores: memory that scales with rows
    config.train.loss_chunk = CHUNK
    return config


@pytest.fixture(scope="module")
def reports():
    """(topology, global batch) -> report: 4 and 8 rows per chip on 4 chips, 4 rows on 8."""
    cases = [("v5e:2x2", 16), ("v5e:2x2", 32), ("v5e:2x4", 32)]
    return {case: aot.compile_step(tiny(case[1]), case[0]) for case in cases}


def test_memory_follows_the_per_chip_batch_not_the_global_batch(reports):
    four_rows_4 = reports[("v5e:2x2", 16)].temp_bytes
    eight_rows_4 = reports[("v5e:2x2", 32)].temp_bytes
    four_rows_8 = reports[("v5e:2x4", 32)].temp_bytes
    assert eight_rows_4 > 1.5 * four_rows_4  # more rows per chip: more memory
    assert abs(four_rows_8 - four_rows_4) < 0.1 * four_rows_4  # more chips, same rows: same memory
    report = reports[("v5e:2x2", 16)]
    assert report.fits and report.device_kind == "TPU v5 lite"
    assert report.hbm_bytes == 16 * aot.GIB and report.flops > 0


def test_step_is_batch_sharded_in_the_compiled_program(reports):
    hlo = reports[("v5e:2x2", 16)].hlo
    vocab = 128
    # each chip receives its 4 of the 16 rows and computes logits for those rows only,
    # a piece of the sequence at a time
    assert re.search(rf"s32\[4,{SEQ + 1}\]", hlo)
    assert re.search(rf"f32\[4,{CHUNK},{vocab}\]", hlo)
    assert not re.search(rf"f32\[\d+,{SEQ},{vocab}\]", hlo)
    assert not re.search(rf"\[16,{SEQ}(,\d+)*\]", hlo)  # no activation holds the global batch
    assert not re.search(r"s32\[16,\d+\][^\n]*all-gather\(", hlo)  # tokens are not gathered
    collectives = reports[("v5e:2x2", 16)].collectives
    assert collectives["all-gather"] > 0  # parameters are gathered for the layer that needs them
    assert collectives["all-reduce"] > 0  # and their gradients summed over the batch shards


def test_bad_topology_and_mismatched_mesh_each_get_one_clear_error():
    with pytest.raises(aot.AotError, match="unknown TPU topology 'v9z:2x2'"):
        aot.compile_step(tiny(16), "v9z:2x2")
    config = tiny(16)
    config.mesh.shape = (8, 1, 1)
    with pytest.raises(aot.AotError, match=r"does not match topology v5e:2x2 \(4 chips\).*"
                                           r"needs 8 devices"):
        aot.compile_step(config, "v5e:2x2")


def test_report_ends_with_memory_against_hbm(reports, capsys):
    report = reports[("v5e:2x2", 16)]
    aot.print_report(report)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"per-chip memory \d+\.\d\d GiB of 16\.00 GiB HBM", last)
    small = dataclasses.replace(report, hbm_bytes=1024)  # a chip too small: names the shortfall
    aot.print_report(small)
    assert "does not fit" in capsys.readouterr().out and not small.fits


def test_libtpu_held_by_another_process_is_named_not_an_unknown_topology(monkeypatch):
    from jax.experimental import topologies

    def locked(name, platform):
        raise RuntimeError("ABORTED: Internal error when accessing libtpu multi-process lockfile.")

    monkeypatch.setattr(topologies, "get_topology_desc", locked)
    with pytest.raises(aot.AotError, match="libtpu is in use by another process.*"
                                           "ALLOW_MULTIPLE_LIBTPU_LOAD=1"):
        aot.topology_devices("v5e:2x2")


def test_tpu_compiler_options_reach_the_compiled_step_only_on_tpu():
    """train.tpu_compiler_options go into the TPU compile of the trainer's own step (libtpu
    names an option it does not know), are not passed on a CPU mesh, and a malformed entry is
    refused by config validation."""
    from effllm_jax import compiler_options, config as config_lib, sharding
    config = tiny(16)
    config.train.tpu_compiler_options = ("xla_tpu_enable_windowed_einsum_for_all_gather=false,"
                                         "xla_tpu_no_such_option=1")
    with pytest.raises(aot.AotError, match="tpu_compiler_options.*xla_tpu_no_such_option"):
        aot.compile_step(config, "v5e:2x2")
    assert compiler_options.for_mesh(config.train.tpu_compiler_options,
                                     sharding.make_mesh((-1, 1, 1))) is None  # CPU devices
    config.train.tpu_compiler_options = "xla_tpu_enable_windowed_einsum_for_all_gather"
    with pytest.raises(ValueError, match="'xla_tpu_enable_windowed_einsum_for_all_gather' is not"):
        config_lib.validate(config, 4)
