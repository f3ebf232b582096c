"""Train-step throughput (tokens/s) at a config, by default the README demo.

  python bench/train_step.py [--config=configs/tiny.py] [--steps=30]
Prints tokens/s and writes bench/results/train_step.json.
"""
from __future__ import annotations

import argparse
import importlib.util
import time

import jax

from effllm_jax import sharding, train
from effllm_jax.data import SyntheticDataset
from report import report  # bench/report.py (python bench/X.py puts bench/ on the path)


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def measure(config_path: str, steps: int) -> dict:
    """Times `steps` train steps (after one compiling step) at the config; returns the numbers."""
    config = load_config(config_path)
    t = config.train
    trainer = train.build_trainer(config)
    data = SyntheticDataset(config.model.vocab_size, t.seq_len, t.global_batch, t.seed)
    state = trainer.init(jax.random.key(0))
    batch = sharding.global_batch_array(data.local_batch(0), trainer.mesh, trainer.rules)
    compile_start = time.perf_counter()
    state, metrics = trainer.step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - compile_start
    start = time.perf_counter()
    for i in range(1, steps + 1):
        batch = sharding.global_batch_array(data.local_batch(i), trainer.mesh, trainer.rules)
        state, metrics = trainer.step(state, batch)
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - start
    return {
        "config": config_path, "devices": jax.device_count(), "platform": jax.default_backend(),
        "global_batch": t.global_batch, "seq_len": t.seq_len, "steps": steps,
        "first_step_s": compile_s, "step_s": seconds / steps,
        "tokens_per_s": steps * t.global_batch * t.seq_len / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="bench/results/train_step.json")
    args = parser.parse_args()
    result = measure(args.config, args.steps)
    report(result, args.out)


if __name__ == "__main__":
    main()
