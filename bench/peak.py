"""The device's practical matmul peak: a large square matmul, best of N, in f32 and bf16.

  python bench/peak.py [--size=2048] [--repeats=10]
Prints FLOP/s and writes bench/results/peak.json. The trainer measures the same thing
(effllm_jax.mfu.measured_peak_flops, smaller and shorter) once per process on CPU, for MFU.
"""
from __future__ import annotations

import argparse

import jax

from effllm_jax import mfu
from report import report  # bench/report.py (python bench/X.py puts bench/ on the path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="bench/results/peak.json")
    args = parser.parse_args()
    result = {"device": jax.devices()[0].device_kind, "platform": jax.default_backend(),
              "size": args.size, "repeats": args.repeats,
              "trainer_f32": mfu.measured_peak_flops("float32")}
    for dtype in ("float32", "bfloat16"):
        result[dtype] = mfu.measure_matmul_flops(dtype, args.size, args.repeats)
    report(result, args.out)


if __name__ == "__main__":
    main()
