r"""Will the train step fit? Compile it ahead of time for a TPU topology, on this CPU machine.

  python -m effllm_jax.aot --config=configs/smollm_1p7b.py:134m --topology=v5e:4x4 \
      [--config.train.global_batch=64 ...]

Builds the real pruning-aware train step (`train.build_trainer`) on a mesh over the
topology's devices (libtpu describes them: `pip install -e '.[tpu]'`), lowers and compiles it,
and prints per-chip memory (arguments, temporaries, outputs against the chip's HBM), FLOPs
per chip, the collectives in the compiled program and the compile time. Exits non-zero,
naming the shortfall, when the step does not fit; the last line reads
`per-chip memory X GiB of Y GiB HBM`.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import sys
import time

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server: we only describe chips
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the local backend; the TPU is only a target
# No TPU is opened, so no need for libtpu's one-process lock (/tmp/libtpu_lockfile): two
# compiles (or a compile beside a test run) may describe topologies at the same time.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402

from effllm_jax import checkpoint as ckpt_lib  # noqa: E402
from effllm_jax import compiler_options  # noqa: E402
from effllm_jax import config as config_lib  # noqa: E402
from effllm_jax import sharding, train  # noqa: E402
from effllm_jax import train_step as ts  # noqa: E402

GIB = 1024 ** 3
# HBM per device (as jax counts devices) by device_kind; --hbm_gib overrides.
HBM_GIB = {"TPU v2": 8, "TPU v3": 16, "TPU v4": 32, "TPU v4 lite": 8, "TPU v5 lite": 16,
           "TPU v5": 95, "TPU v5p": 95, "TPU v6 lite": 32, "TPU7x": 192}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


class AotError(Exception):
    """Bad input or a step that cannot fit: one line for the user."""


@dataclasses.dataclass
class Report:
    """What one ahead-of-time compile says about a step, per chip."""

    topology: str
    device_kind: str
    chips: int
    mesh: dict
    global_batch: int
    seq_len: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    hbm_bytes: int
    flops: float
    collectives: dict
    compile_s: float
    hlo: str = dataclasses.field(repr=False, default="")
    options: dict = dataclasses.field(default_factory=dict)  # train.tpu_compiler_options

    @property
    def total_bytes(self) -> int:
        """Peak live bytes per chip: inputs + temporaries + outputs not aliased to inputs."""
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.hbm_bytes

    def summary(self) -> dict:
        """The numbers as a JSON-friendly dict (GiB, seconds)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "hlo"}
        out.update(total_gib=self.total_bytes / GIB, hbm_gib=self.hbm_bytes / GIB,
                   temp_gib=self.temp_bytes / GIB, fits=self.fits)
        return out


def topology_devices(name: str) -> list:
    """The devices of a TPU topology such as 'v5e:4x4' (described by libtpu; none attached)."""
    from jax.experimental import topologies
    try:
        return list(topologies.get_topology_desc(name, "tpu").devices)
    except Exception as e:  # libtpu missing, or a name it does not know
        if importlib.util.find_spec("libtpu") is None:
            raise AotError("libtpu is not installed: pip install -e '.[tpu]'") from None
        message = (str(e).splitlines() or [type(e).__name__])[0]
        if "lockfile" in message:  # ALLOW_MULTIPLE_LIBTPU_LOAD=0 and another process holds it
            raise AotError(f"libtpu is in use by another process ({message}); set "
                           f"ALLOW_MULTIPLE_LIBTPU_LOAD=1 to describe {name!r} beside it") from None
        raise AotError(f"unknown TPU topology {name!r}: {message}") from None


def hbm_bytes(device_kind: str, override_gib: float = 0.0) -> int:
    """HBM of one device of this kind."""
    if override_gib:
        return int(override_gib * GIB)
    if device_kind not in HBM_GIB:
        raise AotError(f"HBM of {device_kind!r} is not known; pass --hbm_gib")
    return int(HBM_GIB[device_kind] * GIB)


def count_collectives(hlo_text: str) -> dict[str, int]:
    """How many of each collective the compiled HLO holds (async start/done pairs count once;
    the TPU compiler's fused reduce-scatters, `all-reduce-scatter` fusions, count as such)."""
    counts = {kind: len(re.findall(rf"= [^=]*? {kind}(?:-start)?\(", hlo_text))
              for kind in COLLECTIVES}
    counts["reduce-scatter"] += len(re.findall(r"calls=%all-reduce-scatter", hlo_text))
    return counts


def compile_step(config, topology: str, hbm_gib: float = 0.0) -> Report:
    """Lowers and compiles the config's train step for `topology`; the per-chip report."""
    devices = topology_devices(topology)
    try:
        config_lib.validate(config, len(devices))
        mesh = sharding.make_mesh(config.mesh.shape, devices)
    except ValueError as e:
        raise AotError(f"config does not match topology {topology} ({len(devices)} chips): "
                       f"{e}") from None
    hbm = hbm_bytes(devices[0].device_kind, hbm_gib)
    trainer = train.build_trainer(config, mesh)
    t = config.train
    abstract = jax.eval_shape(lambda: ts.init_state(trainer.step_cfg, trainer.tx,
                                                    jax.random.key(0)))
    state = ckpt_lib.abstract_with_shardings(abstract, trainer.state_shardings)
    batch = jax.ShapeDtypeStruct((t.global_batch, t.seq_len + 1), jax.numpy.int32,
                                 sharding=sharding.batch_sharding(mesh, trainer.rules))
    start = time.perf_counter()
    try:
        compiled = trainer.step.lower(state, batch).compile()
    except Exception as e:  # XLA refuses programs that cannot fit in HBM
        text = str(e)
        if "No such compile option" in text:  # a name libtpu does not know
            first = next((line for line in text.splitlines() if line.strip()), text)
            raise AotError(f"train.tpu_compiler_options: {first.strip()}") from None
        if "RESOURCE_EXHAUSTED" in text or "exceeds" in text.lower() and "memory" in text.lower():
            first = next((line for line in text.splitlines() if line.strip()), text)
            raise AotError(f"does not fit on {topology} ({devices[0].device_kind}, "
                           f"{hbm / GIB:.1f} GiB HBM per chip): {first.strip()}") from None
        raise
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    hlo = compiled.as_text()
    return Report(topology=topology, device_kind=devices[0].device_kind, chips=len(devices),
                  mesh=dict(mesh.shape), global_batch=int(t.global_batch),
                  seq_len=int(t.seq_len), argument_bytes=int(memory.argument_size_in_bytes),
                  output_bytes=int(memory.output_size_in_bytes),
                  alias_bytes=int(memory.alias_size_in_bytes),
                  temp_bytes=int(memory.temp_size_in_bytes), hbm_bytes=hbm,
                  flops=float((cost or {}).get("flops", 0.0)),
                  collectives=count_collectives(hlo), compile_s=compile_s, hlo=hlo,
                  options=compiler_options.for_mesh(t.get("tpu_compiler_options", ""), mesh) or {})


def print_report(r: Report) -> None:
    """The human-readable report; its last line is the per-chip memory against HBM."""
    print(f"topology {r.topology}: {r.chips} x {r.device_kind}, mesh {r.mesh}")
    print(f"batch {r.global_batch} x {r.seq_len} tokens "
          f"({r.global_batch / r.chips:g} rows per chip); compiled in {r.compile_s:.1f} s")
    print(f"per chip: arguments {r.argument_bytes / GIB:.2f} GiB, temporaries "
          f"{r.temp_bytes / GIB:.2f} GiB, outputs {r.output_bytes / GIB:.2f} GiB "
          f"({r.alias_bytes / GIB:.2f} GiB aliased to donated arguments)")
    print(f"FLOPs per chip per step: {r.flops:.3e} (XLA cost analysis: a scanned loop body "
          f"counts once)")
    print("collectives: " + ", ".join(f"{k} {v}" for k, v in r.collectives.items()))
    if r.options:
        print("XLA options (train.tpu_compiler_options): "
              + ", ".join(f"{k}={v}" for k, v in r.options.items()))
    if not r.fits:
        print(f"does not fit: {r.total_bytes / GIB:.2f} GiB per chip is "
              f"{(r.total_bytes - r.hbm_bytes) / GIB:.2f} GiB over the HBM of a {r.device_kind}")
    print(f"per-chip memory {r.total_bytes / GIB:.2f} GiB of {r.hbm_bytes / GIB:.2f} GiB HBM")


def main(argv) -> None:
    del argv
    from absl import flags
    f = flags.FLAGS
    from effllm_jax.cli import user_errors
    with user_errors("effllm_jax.aot", f.debug, extra=(AotError,)):
        report = compile_step(f.config, f.topology, f.hbm_gib)
    print_report(report)
    if not report.fits:
        sys.exit(1)


def define_flags() -> None:
    """The aot CLI's flags (loads --config and checks its --config.* overrides)."""
    from absl import flags
    from ml_collections import config_flags
    config_lib.check_overrides(sys.argv)
    config_flags.DEFINE_config_file("config", train.DEFAULT_CONFIG, "experiment config file",
                                    lock_config=True)
    flags.DEFINE_string("topology", "v5e:2x2", "TPU topology, e.g. v5e:4x4, v5e:8x8, v5p:2x2x2")
    flags.DEFINE_float("hbm_gib", 0.0, "HBM per chip in GiB (0: known from the chip kind)")
    flags.DEFINE_bool("debug", False, "show the traceback of an error instead of one line")


def cli(argv: list[str] | None = None) -> None:
    """Entry point: absl flags with ml_collections config overrides; errors are one line."""
    from effllm_jax import cli as cli_lib
    cli_lib.run_absl("effllm_jax.aot", define_flags, main, argv)


if __name__ == "__main__":
    cli()
