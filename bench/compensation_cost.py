"""Cost of OBS statistics: train-step time inside the pruning window with and without them.

  python bench/compensation_cost.py [--config=configs/tiny.py] [--steps=20] [--obs_block=128]
Times steps inside the pruning window (where the statistics are summed) for
prune.compensation='none', 'obs' with the full H, and 'obs' with a block-diagonal H, and the
time of one pruning event with compensation. Prints the numbers and writes
bench/results/compensation_cost.json.
"""
from __future__ import annotations

import argparse
import time

import jax

from effllm_jax import config as config_lib, mfu, sharding, train, train_step as ts
from effllm_jax.arch import ArchSpec
from effllm_jax.data import SyntheticDataset
from effllm_jax.model import llama
from effllm_jax.pruning import compensate, groups
from report import report  # bench/report.py (python bench/X.py puts bench/ on the path)

try:
    from train_step import load_config  # run as a script from bench/
except ImportError:  # pragma: no cover
    from bench.train_step import load_config


def _time_steps(config, steps: int, rounds: int) -> dict:
    t = config.train
    trainer = train.build_trainer(config)
    data = SyntheticDataset(config.model.vocab_size, t.seq_len, t.global_batch, t.seed)
    batches = [sharding.global_batch_array(data.local_batch(i), trainer.mesh, trainer.rules)
               for i in range(steps + 2)]
    state = trainer.init(jax.random.key(0))
    state, metrics = trainer.step(state, batches[0])  # compiles
    jax.block_until_ready(metrics)
    best = float("inf")
    for _ in range(rounds):  # the best of a few rounds: the machine may be shared
        start = time.perf_counter()
        for i in range(1, steps + 1):
            state, metrics = trainer.step(state, batches[i])
        jax.block_until_ready(metrics)
        best = min(best, (time.perf_counter() - start) / steps)
    assert not bool(metrics["pruning_event"]) and int(state.step) < config.prune.every
    return {"step_s": best, "state": state, "trainer": trainer, "batch": batches[-1]}


def stats_flops_fraction(config, obs_block: int) -> float:
    """Statistics FLOPs per token (x xᵀ, block-diagonal) over the step's training FLOPs."""
    cfg = config_lib.model_config(config)
    per_token = sum(2 * h.size for h in jax.tree.leaves(
        jax.eval_shape(lambda: compensate.zero_stats(cfg, obs_block))))  # 2·n·b, every layer
    spec = ArchSpec.from_masks(jax.device_get(llama.full_masks(cfg)), cfg)
    return per_token / mfu.flops_per_token(spec, config.train.seq_len, dense=True)


def measure(config_path: str, steps: int, rounds: int, obs_block: int) -> dict:
    """Step time inside the pruning window per compensation setting, and one event's time."""
    results = {}
    for name, compensation, block in [("none", "none", 0), ("obs_full", "obs", 0),
                                      (f"obs_block{obs_block}", "obs", obs_block)]:
        config = load_config(config_path)
        total = steps * rounds + 2
        config.prune.update(compensation=compensation, obs_block=block, warmup_steps=0,
                            prune_steps=total + 1, every=total + 1)  # no event while timing
        config.train.steps = total + 1
        out = _time_steps(config, steps, rounds)
        results[name] = {"step_s": out["step_s"]}
        if compensation == "obs":
            results[name]["stats_flops_fraction"] = stats_flops_fraction(config, block)
        if compensation == "obs":  # one event: selection + compensation + zeroing
            trainer, state = out["trainer"], out["state"]
            event_fn = jax.jit(lambda s: ts.prune_event(s, trainer.step_cfg, trainer.tx))
            jax.block_until_ready(event_fn(state).params)
            start = time.perf_counter()
            jax.block_until_ready(event_fn(state).params)
            results[name]["event_s"] = time.perf_counter() - start
    base = results["none"]["step_s"]
    for r in results.values():
        r["overhead"] = r["step_s"] / base - 1.0
    config = load_config(config_path)
    return {"config": config_path, "devices": jax.device_count(),
            "platform": jax.default_backend(), "global_batch": config.train.global_batch,
            "seq_len": config.train.seq_len,
            "dense_params": groups.dense_params(config_lib.model_config(config)),
            "steps": steps, "rounds": rounds, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--obs_block", type=int, default=128)
    parser.add_argument("--out", default="bench/results/compensation_cost.json")
    args = parser.parse_args()
    result = measure(args.config, args.steps, args.rounds, args.obs_block)
    report(result, args.out)


if __name__ == "__main__":
    main()
