"""Data pipeline throughput vs what the train step consumes.

Builds the default data config (Austen, SentencePiece 4096, demo shape seq_len 128 x batch 16),
then times `local_batch` (sequential steps, random steps as after a restart, one of two
process slices) and the prefetching iterator, in tokens per second (seq_len tokens per row).
The pipeline must outrun the trainer by --min-ratio (20x); what the train step eats is measured
in the same run at the demo config (bench/train_step.py), or given with --consumed-tok-s.
Writes bench/results/data_throughput.json and prints it.

  python bench/data_throughput.py [--consumed-tok-s N] [--steps 2000]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from effllm_jax import data  # noqa: E402  pylint: disable=wrong-import-position


def _rate(fn, steps: int, rows: int, seq_len: int) -> dict:
    """Calls fn(i) for i in range(steps); returns tokens/s and ms per batch."""
    fn(0)  # warm-up: grain graph, page cache
    start = time.perf_counter()
    for i in range(steps):
        fn(i)
    elapsed = time.perf_counter() - start
    return {"tokens_per_s": round(steps * rows * seq_len / elapsed), "ms_per_batch": round(1e3 * elapsed / steps, 4),
            "batches": steps}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--consumed-tok-s", type=float, default=0.0,
                        help="tokens/s the train step consumes (0: measure the demo config's step)")
    parser.add_argument("--step-config", default=str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py"))
    parser.add_argument("--min-ratio", type=float, default=20.0)
    parser.add_argument("--sources", default="austen", help="comma-separated config.data.sources")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "data_throughput.json"))
    args = parser.parse_args()

    cfg = data.default_data_config()
    cfg.sources = tuple(s for s in args.sources.split(",") if s)
    start = time.perf_counter()
    ds = data.build_dataset(cfg, seq_len=args.seq_len, global_batch=args.global_batch, seed=0)
    build_s = time.perf_counter() - start
    L, B, n = args.seq_len, args.global_batch, args.steps
    rng = np.random.default_rng(0)
    random_steps = rng.integers(0, 10 ** 7, size=n)

    results = {
        "sequential_local_batch": _rate(lambda i: ds.local_batch(i), n, B, L),
        "random_step_local_batch": _rate(lambda i: ds.local_batch(int(random_steps[i])), n, B, L),
        "process_slice_1_of_2": _rate(lambda i: ds.local_batch(i, 0, 2), n, B // 2, L),
    }
    it = ds.batches(start_step=0)
    results["prefetch_iterator"] = _rate(lambda i: next(it), n, B, L)
    if ds.num_validation_windows >= B:
        results["validation_batches"] = _rate(lambda i: next(ds.validation_batches(1)), min(n, 500), B, L)

    step = None
    if not args.consumed_tok_s:
        from train_step import measure  # bench/train_step.py, beside this file
        step = measure(args.step_config, steps=20)
        args.consumed_tok_s = step["tokens_per_s"]
    headline = results["sequential_local_batch"]["tokens_per_s"]
    ratio = headline / args.consumed_tok_s
    report = {
        "config": {"sources": list(cfg.sources), "seq_len": L, "global_batch": B,
                   "vocab_size": ds.vocab_size, "windows_per_epoch": ds.windows_per_epoch},
        "build_s": round(build_s, 3),
        "stores_built_this_run": {k: v["store_built"] for k, v in ds.describe()["sources"].items()},
        "pipeline": results,
        "consumed_tokens_per_s": args.consumed_tok_s,
        "train_step_measured": step,
        "ratio_pipeline_over_consumed": round(ratio, 1),
        "min_ratio": args.min_ratio,
        "ok": ratio >= args.min_ratio,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    print(f"pipeline {headline:,} tok/s = {ratio:.0f}x the {args.consumed_tok_s:,.0f} tok/s consumed "
          f"({'OK' if report['ok'] else 'TOO SLOW'}, need {args.min_ratio:.0f}x); wrote {out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
