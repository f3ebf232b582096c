"""What skipping non-finite steps costs per step: the train step as it is (a select between the
updated and the previous state, and the bad-step counters) against the same step with the
select taken out, compiled in one process and timed in interleaved rounds.

  python bench/bad_step_cost.py [--config=configs/tiny.py] [--steps=20] [--rounds=5]
Prints both step times and their ratio; writes bench/results/bad_step_cost.json.
"""
from __future__ import annotations

import argparse
import time

import jax

from effllm_jax import integrity, sharding, train
from effllm_jax.data import SyntheticDataset
from report import report  # bench/report.py (python bench/X.py puts bench/ on the path)
from train_step import load_config


def build(config, with_skip: bool):
    """A trainer whose step keeps (or, without the skip, always takes) the update."""
    keep = integrity.keep_if_finite
    if not with_skip:
        integrity.keep_if_finite = lambda finite, updated, previous: updated
    try:
        trainer = train.build_trainer(config)
        state = trainer.init(jax.random.key(0))
        state, metrics = trainer.step(state, batch_of(trainer, config, 0))  # compiles here
        jax.block_until_ready(metrics)
    finally:
        integrity.keep_if_finite = keep
    return trainer, state


def batch_of(trainer, config, i: int):
    t = config.train
    data = SyntheticDataset(config.model.vocab_size, t.seq_len, t.global_batch, t.seed)
    return sharding.global_batch_array(data.local_batch(i), trainer.mesh, trainer.rules)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="bench/results/bad_step_cost.json")
    args = parser.parse_args()
    config = load_config(args.config)
    runs = {name: list(build(config, name == "with_skip")) for name in ("with_skip", "without")}
    batches = [batch_of(runs["with_skip"][0], config, i) for i in range(1, args.steps + 1)]
    seconds = {name: [] for name in runs}
    for _ in range(args.rounds):  # interleaved, so machine load hits both alike
        for name, run in runs.items():
            trainer, state = run
            start = time.perf_counter()
            for batch in batches:
                state, metrics = trainer.step(state, batch)
            jax.block_until_ready(metrics)
            seconds[name].append((time.perf_counter() - start) / args.steps)
            run[1] = state
    best = {name: min(s) for name, s in seconds.items()}
    report({"config": args.config, "devices": jax.device_count(),
            "platform": jax.default_backend(), "steps_per_round": args.steps,
            "rounds": args.rounds, "step_s_with_skip": best["with_skip"],
            "step_s_without": best["without"],
            "ratio_with_over_without": best["with_skip"] / best["without"],
            "all_rounds_s": seconds}, args.out)


if __name__ == "__main__":
    main()
