"""Per-chip memory and compile time of the paper's 1.7B source on TPU pods, compiled ahead of time.

  python bench/aot_table.py [--targets=134m,469m,1.1b] [--topologies=v5e:4x4,v5e:8x8,v5p:2x2x2]
      [--rows_per_chip=4]
Compiles the real train step of configs/smollm_1p7b.py:<target> for each topology on this
machine (libtpu, no TPU attached; see effllm_jax/aot.py), at the same rows per chip, prints a
markdown table and writes bench/results/aot_table.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "configs")]  # this checkout's package and configs

from effllm_jax import aot  # noqa: E402  (sets TPU_SKIP_MDS_QUERY, a CPU local backend)
import smollm_1p7b  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--targets", default="134m,469m,1.1b")
    parser.add_argument("--topologies", default="v5e:4x4,v5e:8x8,v5p:2x2x2")
    parser.add_argument("--rows_per_chip", type=int, default=4)
    parser.add_argument("--out", default="bench/results/aot_table.json")
    args = parser.parse_args()
    rows = []
    print("| target | topology | chips | global batch | args GiB | temps GiB | per-chip GiB "
          "| HBM GiB | fits | TFLOP/chip | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for target in args.targets.split(","):
        for topology in args.topologies.split(","):
            chips = len(aot.topology_devices(topology))
            config = smollm_1p7b.get_config(target)
            config.train.global_batch = args.rows_per_chip * chips
            try:
                report = aot.compile_step(config, topology)
                row = dict(target=target, **report.summary())
            except aot.AotError as e:
                row = dict(target=target, topology=topology, chips=chips, error=str(e))
            rows.append(row)
            if "error" in row:
                print(f"| {target} | {topology} | {chips} | {config.train.global_batch} "
                      f"| {row['error']} |", flush=True)
                continue
            print(f"| {target} | {topology} | {chips} | {row['global_batch']} "
                  f"| {row['argument_bytes'] / aot.GIB:.2f} | {row['temp_gib']:.2f} "
                  f"| {row['total_gib']:.2f} | {row['hbm_gib']:.0f} | {row['fits']} "
                  f"| {row['flops'] / 1e12:.1f} | {row['compile_s']:.0f} |", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"rows_per_chip": args.rows_per_chip, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
