"""The train step on a real accelerator: matmul peak, attention cores, the paper's source step.

  python bench/accelerator.py [--config=configs/smollm_1p7b.py:134m] [--batch=16] [--steps=5]
      [--arms=plain,event,plain+model.remat=dots] [--small] [--out=bench/results/accelerator.json]

For one GPU or TPU host (`--small` shrinks every size so the script itself can be checked on
CPU). In one process:
1. peak: the measured bf16 and f32 matmul FLOP/s (mfu.measure_matmul_flops), beside the
   device table's figure (mfu.PEAK_FLOPS);
2. cores: every attention core this backend has (einsum, blockwise, dot_product; splash on
   TPU) on bf16 inputs: output and gradients against the einsum core run in float32, and the
   forward + backward time;
3. masked: a small bf16 model with some heads and FFN channels pruned: its loss under each
   core against einsum's (the head mask must act the same whichever core runs);
4. step: the config's real pruning-aware train step (default: the paper's SmolLM-1.7B-shaped
   source, bf16, full remat, seq 2048) on this host's devices: compile time, compiled and
   live-peak memory per device, step time, tokens/s and MFU, for a plain step and an event
   step (every step a pruning event: saliency ranking, new masks, history).
Prints a line per measurement and writes JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import importlib.util
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's package, also when run from elsewhere

from effllm_jax import config as config_lib  # noqa: E402
from effllm_jax import mfu, sharding, train, train_step  # noqa: E402
from effllm_jax.arch import ArchSpec  # noqa: E402
from effllm_jax.model import attention, llama  # noqa: E402
from report import report  # noqa: E402  (bench/report.py)


def load_config(spec: str):
    """`path.py:variant` -> that file's get_config(variant)."""
    path, _, variant = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("bench_config", os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()


def timed(fn, repeats: int) -> float:
    """Best wall time of `repeats` blocking calls of fn() (after one warm-up call)."""
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def peak(small: bool) -> dict:
    size = 512 if small else 8192
    device = jax.devices()[0]
    table = next((v for k, v in mfu.PEAK_FLOPS.items() if device.device_kind.startswith(k)), None)
    return {"device": device.device_kind, "platform": device.platform, "size": size,
            "table_flops": table,
            "bfloat16": mfu.measure_matmul_flops("bfloat16", size, 5),
            "float32": mfu.measure_matmul_flops("float32", size, 5)}


def core_kinds() -> list[str]:
    platform = jax.default_backend()
    return (["einsum", "blockwise", "dot_product"] + (["splash"] if platform == "tpu" else []))


def cores(small: bool) -> list[dict]:
    """Each core's error against float32 einsum and its fwd+bwd time, at two lengths."""
    rows = []
    for seq, b in (((128, 2),) if small else ((2048, 4), (8192, 1))):
        h, hd = (4, 16) if small else (16, 64)
        keys = jax.random.split(jax.random.key(seq), 4)
        q, k, v, ct = (jax.random.normal(key, (b, seq, h, hd), jnp.float32) for key in keys)

        def loss(kind, q, k, v):
            if kind == "xla_dot_product":  # jax's default implementation, for comparison
                out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
            else:
                out = attention.causal_attention(q, k, v, kind, block=128 if small else 512)
            return jnp.sum(out.astype(jnp.float32) * ct), out

        ref_grad = jax.jit(jax.grad(lambda q, k, v: loss("einsum", q, k, v), (0, 1, 2),
                                    has_aux=True))
        (ref_grads, ref_out) = ref_grad(q, k, v)
        bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
        for kind in core_kinds() + (["xla_dot_product"] if jax.default_backend() == "gpu" else []):
            row = {"seq": seq, "batch": b, "heads": h, "head_dim": hd, "kind": kind}
            try:
                grad = jax.jit(jax.grad(lambda q, k, v, kind=kind: loss(kind, q, k, v), (0, 1, 2),
                                        has_aux=True))
                grads, out = grad(*bf)
                row["out_max_abs_err"] = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref_out)))
                row["grad_max_rel_err"] = max(
                    float(jnp.max(jnp.abs(g.astype(jnp.float32) - r)) / jnp.max(jnp.abs(r)))
                    for g, r in zip(grads, ref_grads))
                row["fwd_bwd_ms"] = 1e3 * timed(lambda: grad(*bf), 3 if small else 10)
            except Exception as e:  # noqa: BLE001  (a core this backend lacks: say so, go on)
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            print("core", row, flush=True)
            rows.append(row)
    return rows


def masked_losses(small: bool) -> dict:
    """Loss of a bf16 model with pruned heads and FFN channels under each core vs einsum."""
    config = config_lib.base_config()
    config.model.update(vocab_size=512, d_model=128, num_layers=2, num_heads=8, num_kv_heads=4,
                        head_dim=16, ffn_dim=256, dtype="bfloat16", attention="einsum",
                        attention_block=128)
    seq = 256
    config.train.update(global_batch=4, seq_len=seq)
    trainer = train.build_trainer(config, sharding.make_mesh((-1, 1, 1), jax.devices()[:1]))
    state = trainer.init(jax.random.key(0))
    masks = dict(state.masks)
    masks["heads"] = masks["heads"].at[:, ::3].set(False)  # every third head of every layer
    masks["ffn"] = masks["ffn"].at[:, ::5].set(False)
    batch = jax.random.randint(jax.random.key(1), (4, seq + 1), 0, 512)
    out = {}
    for kind in core_kinds():
        cfg = dataclasses.replace(config_lib.model_config(config), attention=kind)
        try:
            with jax.set_mesh(trainer.mesh):
                out[kind] = float(jax.jit(lambda p, m, b, cfg=cfg: train_step.eval_loss(
                    p, m, b, cfg=cfg))(state.params, masks, batch))
        except Exception as e:  # noqa: BLE001
            out[kind] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    print("masked", out, flush=True)
    return out


def step_arm(config, name: str, steps: int) -> dict:
    """Compile and time the config's train step on this host's devices."""
    t = config.train
    start = time.perf_counter()
    trainer = train.build_trainer(config)
    state = trainer.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = sharding.global_batch_array(
        rng.integers(0, config.model.vocab_size, (t.global_batch, t.seq_len + 1), np.int32),
        trainer.mesh, trainer.rules)
    compiled = trainer.step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    times = []
    for _ in range(steps + 1):  # the first call warms up
        begin = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - begin)
    step_s = float(np.median(times[1:]))
    stats = jax.devices()[0].memory_stats() or {}
    tokens = t.global_batch * t.seq_len
    row = {"arm": name, "devices": jax.device_count(), "global_batch": t.global_batch,
           "seq_len": t.seq_len, "compile_s": compile_s, "step_s": step_s,
           "step_s_all": times, "tokens_per_s": tokens / step_s,
           "loss": float(metrics["loss"]), "pruning_event": bool(metrics["pruning_event"]),
           "live_params_after": float(metrics["live_params"]),
           "compiled_temp_gib": memory.temp_size_in_bytes / 2 ** 30 if memory else None,
           "compiled_args_gib": memory.argument_size_in_bytes / 2 ** 30 if memory else None,
           "live_peak_gib": stats.get("peak_bytes_in_use", 0) / 2 ** 30 or None}
    row["flops_per_token_dense"] = _dense_flops_per_token(config)
    print("step", {k: v for k, v in row.items() if k != "step_s_all"}, flush=True)
    return row


def _dense_flops_per_token(config) -> float:
    """mfu.flops_per_token of the dense source (what a masked step executes)."""
    cfg = config_lib.model_config(config)
    return mfu.flops_per_token(ArchSpec.from_masks(llama.full_masks(cfg), cfg),
                               config.train.seq_len, dense=True)


def apply_override(config, assignment: str) -> None:
    """'model.remat=dots' -> config.model.remat = 'dots' (typed like the current value)."""
    dotted, _, text = assignment.partition("=")
    *path, field = dotted.split(".")
    node = config
    for name in path:
        node = node[name]
    current = node[field]
    node[field] = text if isinstance(current, str) else type(current)(eval(text))  # noqa: S307


def steps(config_spec: str, arms: list[str], batch: int, n: int, small: bool) -> list[dict]:
    """Each arm: 'plain' or 'event', optionally '+field=value' overrides ('plain+model.remat=dots')."""
    rows = []
    for arm in arms:
        kind, *overrides = arm.split("+")
        config = load_config(config_spec)
        config.train.global_batch = batch
        if small:
            config.model.update(d_model=128, num_layers=2, num_heads=4, num_kv_heads=4,
                                ffn_dim=256, vocab_size=1024, dtype="float32")
            config.train.update(seq_len=256)
        config.mesh.shape = (1, -1, 1)
        if kind == "event":  # an event every step: the ranking and new masks each time
            config.prune.update(warmup_steps=0, prune_steps=10 ** 7, every=1)
        for assignment in overrides:
            apply_override(config, assignment)
        try:
            rows.append(step_arm(config, arm, n))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            rows.append({"arm": arm, "error": f"{type(e).__name__}: {str(e)[:300]}"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/smollm_1p7b.py:134m")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--parts", default="peak,cores,masked,step")
    parser.add_argument("--arms", default="plain,event",
                        help="step arms: plain|event, each with optional +field=value overrides")
    parser.add_argument("--out", default="bench/results/accelerator.json")
    args = parser.parse_args()
    parts = args.parts.split(",")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    result = {"jax": jax.__version__, "backend": jax.default_backend(),
              "devices": [d.device_kind for d in jax.devices()], "config": args.config}
    print(result, flush=True)
    for part, fn in (("peak", lambda: peak(args.small)), ("cores", lambda: cores(args.small)),
                     ("masked", lambda: masked_losses(args.small)),
                     ("step", lambda: steps(args.config, args.arms.split(","), args.batch, args.steps,
                                            args.small))):
        if part in parts:
            try:
                result[part] = fn()
            except Exception as e:  # noqa: BLE001  (one part failing must not lose the others)
                traceback.print_exc()
                result[part] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            with open(args.out, "w") as f:  # after every part: a crash keeps what was measured
                json.dump(result, f, indent=2)
    if "peak" in result and "step" in result and isinstance(result["step"], list):
        measured = result["peak"].get("bfloat16") if isinstance(result["peak"], dict) else None
        for row in result["step"]:
            if "tokens_per_s" in row and measured:
                row["mfu_vs_measured_bf16"] = (row["tokens_per_s"] * row["flops_per_token_dense"]
                                               / jax.device_count() / measured)
                if result["peak"].get("table_flops"):
                    row["mfu_vs_table"] = (row["tokens_per_s"] * row["flops_per_token_dense"]
                                           / jax.device_count() / result["peak"]["table_flops"])
                print("mfu", row["arm"], {k: row[k] for k in row if k.startswith("mfu")})
        report(result, args.out)


if __name__ == "__main__":
    main()
