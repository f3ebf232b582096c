"""The demo run with in-training compaction: tokens/s after the last event against the dense
warm-up's, read from the run's own metrics.jsonl (issue 11's "Done when").

  nice -n 10 python bench/compaction_demo.py [--workdir=runs/compaction_demo] \
      [--compact_at=0.75,0.5] [--steps_scale=0.5] [--masked] [--data=synthetic]

Runs configs/tiny.py (the README's demo) with `prune.compact_at` and
`prune.compact_after_last_event=True`; with --masked, the same run without compaction too, so
the post-event step of both can be compared. `--steps_scale` shortens the schedule
(warm-up, pruning window, event spacing and total steps alike). A window's tokens/s is the
metrics line's `tok/s` (log_every steps each); the first window of the run and the window
after each compaction hold a compilation and are left out; the medians are compared.
Prints the numbers and writes JSON (bench/results/compaction_demo.json).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def demo_config(compact_at: tuple, steps_scale: float, data: str):
    """configs/tiny.py with compaction set and the schedule scaled."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("tiny", os.path.join(ROOT, "configs", "tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    p, t = config.prune, config.train
    scale = lambda n: max(1, int(round(n * steps_scale)))
    p.update(warmup_steps=scale(p.warmup_steps), prune_steps=scale(p.prune_steps),
             every=scale(p.every), compact_at=tuple(compact_at),
             compact_after_last_event=bool(compact_at))
    t.update(steps=scale(t.steps), checkpoint_every=scale(t.steps), eval_every=0)
    if data == "synthetic":
        config.data.update(kind="synthetic", vocab_size=config.model.vocab_size)
    return config


def window_speeds(workdir: str, config) -> dict:
    """Median tokens/s of the dense warm-up and after the last event, from metrics.jsonl."""
    lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl")) if l.strip()]
    lines = [l for l in lines if "tok/s" in l]
    p, every = config.prune, config.train.log_every
    last_event = p.warmup_steps + p.prune_steps
    dense = [l["tok/s"] for l in lines if every < l["step"] <= p.warmup_steps]
    after = [l["tok/s"] for l in lines if l["step"] > last_event + every]
    executed = {l["step"]: l.get("executed_M") for l in lines}
    return {"dense_tok_s": statistics.median(dense), "after_tok_s": statistics.median(after),
            "dense_windows": len(dense), "after_windows": len(after),
            "executed_M_first": executed[min(executed)], "executed_M_last": executed[max(executed)],
            "live_M_last": lines[-1]["live_M"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=os.path.join(ROOT, "runs", "compaction_demo"))
    ap.add_argument("--compact_at", default="0.75,0.5")
    ap.add_argument("--steps_scale", type=float, default=1.0)
    ap.add_argument("--masked", action="store_true", help="also run without compaction")
    ap.add_argument("--data", default="config", choices=("config", "synthetic"))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "compaction_demo.json"))
    args = ap.parse_args()
    from effllm_jax import train

    compact_at = tuple(float(f) for f in args.compact_at.split(",") if f)
    results = {}
    for name, at in [("compacted", compact_at)] + ([("masked", ())] if args.masked else []):
        config = demo_config(at, args.steps_scale, args.data)
        workdir = f"{args.workdir}_{name}"
        shutil.rmtree(workdir, ignore_errors=True)  # a fresh run, not a resume
        start = time.perf_counter()
        _, spec = train.run(config, workdir)
        results[name] = dict(window_speeds(workdir, config), wall_s=time.perf_counter() - start,
                             live_params=spec.live_params, dense_params=spec.dense_params,
                             executed=None if spec.executed is None else
                             {k: len(v[0]) if k in ("heads", "kv_heads", "ffn") else len(v)
                              for k, v in spec.executed.items() if k != "step"
                              and k != "live_fraction"})
    r = results["compacted"]
    r["speedup_after_last_event"] = r["after_tok_s"] / r["dense_tok_s"]
    print(f"compacted run: dense warm-up {r['dense_tok_s']:.0f} tok/s, after the last event "
          f"{r['after_tok_s']:.0f} tok/s: {r['speedup_after_last_event']:.2f}x "
          f"(executed {r['executed_M_first']:.3f}M -> {r['executed_M_last']:.3f}M params, "
          f"live {r['live_M_last']:.3f}M; shapes {r['executed']})")
    if "masked" in results:
        m = results["masked"]
        m["speedup_after_last_event"] = m["after_tok_s"] / m["dense_tok_s"]
        print(f"masked run: dense {m['dense_tok_s']:.0f} tok/s, after the last event "
              f"{m['after_tok_s']:.0f} tok/s: {m['speedup_after_last_event']:.2f}x; compacted / "
              f"masked after the last event {r['after_tok_s'] / m['after_tok_s']:.2f}x")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=2)
    print(f"wrote {args.out}; target >= 1.5x: "
          f"{'met' if r['speedup_after_last_event'] >= 1.5 else 'missed'}")


if __name__ == "__main__":
    main()
