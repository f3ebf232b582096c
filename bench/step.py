"""Train-step speed: our step in every mode against transformers + torch AdamW, one process.

  nice -n 10 python bench/step.py [--shapes=demo,8m] [--arms=...] [--rounds=3] [--steps=3]

For each shape (the issue's two: demo = configs/tiny.py at 16x128 tokens; 8m = V8192, d256,
8 layers, 8/2 heads, FFN 768 at 8x256), tokens/s of:
  plain        the step outside the pruning window
  window       inside the window (saliency accumulation)
  window_obs   inside the window with prune.compensation=obs (its input second moments)
  window_obs128  the same with prune.obs_block=128 (block-diagonal statistics)
  event        a pruning-event step (every step an event)
  dense75/50   the dense model at a compacted shape holding 75% / 50% of the parameters, all
               heads kept (hidden and FFN widths cut)
  dense75_heads/dense50_heads  the same budgets with the query and KV heads cut in the same
               proportion as the hidden width (what pruning all three group kinds produces)
  accum2       train.grad_accum_steps=2 (same batch, two microbatches)
  remat_full, remat_dots, bf16    model.remat / model.dtype variants of the plain step
  loss_unfused the plain step with the unfused loss (logits, then token_nll, autodiff), the
               path losses.unembed_nll replaced: its speed-up is plain / loss_unfused
  proj_autodiff  the plain step with the linear projections differentiated by plain autodiff,
               the path model/projection.py replaced: its speed-up is plain / proj_autodiff
  attn_autodiff  the plain step with the CPU attention core as one full-score einsum
               differentiated by autodiff (attention.reference_core), the path the blocked
               core (attention._causal_core) replaced
  proj_attn_autodiff  both of the above: the step as it was before them
  torch        transformers LlamaForCausalLM + torch.optim.AdamW (+ grad clipping), same shape
  loop         the real loop (train.run, synthetic data) vs the bare plain step (--loop)
Rounds are interleaved (every arm once per round, in turn), so all arms see the same machine
load; each arm's figure is its median over rounds. Beside wall-clock tokens/s it records the
process CPU time per step (all threads): on a machine shared with other jobs, the CPU work an
arm costs is steadier than its wall time (which also counts the time other jobs held the cores).
MFU is against the f32 matmul peak measured in the same rounds. Writes bench/results/step.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import jax
import numpy as np

from effllm_jax import config as config_lib
from effllm_jax import losses, mfu, sharding, train, train_step
from effllm_jax.arch import ArchSpec
from effllm_jax.model import attention, llama, projection
from effllm_jax.pruning import groups
from report import report  # bench/report.py (python bench/X.py puts bench/ on the path)

SHAPES = {
    "demo": (dict(vocab_size=4096, d_model=128, num_layers=4, num_heads=8, num_kv_heads=4,
                  head_dim=16, ffn_dim=384), 16, 128),
    "8m": (dict(vocab_size=8192, d_model=256, num_layers=8, num_heads=8, num_kv_heads=2,
                head_dim=32, ffn_dim=768), 8, 256),
}
ARMS = ("plain", "window", "window_obs", "window_obs128", "event", "dense75", "dense50",
        "dense75_heads", "dense50_heads", "accum2",
        "remat_full", "remat_dots", "bf16", "loss_unfused", "proj_autodiff", "attn_autodiff",
        "proj_attn_autodiff", "torch")
NEVER = 10 ** 7  # a step count no bench reaches


def shape_config(shape: str, **model):
    """The bench config of a shape: synthetic data, unrolled layers, pruning never reached."""
    dims, batch, seq = SHAPES[shape]
    c = config_lib.base_config()
    c.model.update(**dims, scan_layers=False)
    c.model.update(**model)
    c.data.update(kind="synthetic", vocab_size=c.model.vocab_size)
    c.prune.update(warmup_steps=NEVER, prune_steps=1, every=1)
    c.train.update(steps=NEVER + 1, global_batch=batch, seq_len=seq, eval_every=0)
    return c


def dense_arm(arm: str) -> tuple[float, bool]:
    """'dense50_heads' -> (0.5, True): the budget and whether heads are cut too."""
    budget, _, heads = arm[len("dense"):].partition("_")
    return int(budget) / 100, heads == "heads"


def compacted_dims(shape: str, fraction: float, cut_heads: bool = False) -> dict:
    """Widths (hidden and FFN multiples of 8) of a dense model holding about `fraction` of the
    shape's parameters: what compaction to that budget would run. Either the heads are kept
    (hidden and FFN widths searched), or, with `cut_heads`, every width (hidden, FFN, query
    and KV heads, the GQA ratio kept) is scaled by one factor."""
    dims = SHAPES[shape][0]
    target = fraction * groups.dense_params(config_lib.model_config(shape_config(shape)))
    best = None
    for scale in np.linspace(0.3, 1.0, 141):
        d = max(8, int(round(dims["d_model"] * scale / 8)) * 8)
        if cut_heads:
            kv = max(1, int(round(dims["num_kv_heads"] * scale)))
            candidates = [dict(d_model=d, ffn_dim=max(8, int(round(dims["ffn_dim"] * scale / 8)) * 8),
                               num_heads=kv * (dims["num_heads"] // dims["num_kv_heads"]),
                               num_kv_heads=kv)]
        else:
            candidates = [dict(d_model=d, ffn_dim=f) for f in range(8, dims["ffn_dim"] + 1, 8)]
        for widths in candidates:
            n = groups.dense_params(config_lib.model_config(shape_config(shape, **widths)))
            if best is None or abs(n - target) < best[0]:
                best = (abs(n - target), widths)
    return best[1]


def arm_config(shape: str, arm: str):
    """The config an arm runs."""
    c = shape_config(shape)
    if arm.startswith("window"):  # saliency (and statistics) every step, no event
        c.prune.update(warmup_steps=0, prune_steps=NEVER, every=NEVER)
        if arm.startswith("window_obs"):
            c.prune.update(compensation="obs", obs_block=int(arm[len("window_obs"):] or 0))
    elif arm == "event":  # an event every step (the budget hardly moves, the work is all done)
        c.prune.update(warmup_steps=0, prune_steps=NEVER, every=1)
    elif arm.startswith("dense"):
        c = shape_config(shape, **compacted_dims(shape, *dense_arm(arm)))
    elif arm == "accum2":
        c.train.grad_accum_steps = 2
    elif arm.startswith("remat_"):
        c.model.remat = arm[len("remat_"):]
    elif arm == "bf16":
        c.model.dtype = "bfloat16"
    return c


def jax_arm(config):
    """A function running one train step (blocking), after compiling it."""
    trainer = train.build_trainer(config)
    t = config.train
    rng = np.random.default_rng(0)
    batch = sharding.global_batch_array(
        rng.integers(0, config.model.vocab_size, (t.global_batch, t.seq_len + 1), np.int32),
        trainer.mesh, trainer.rules)
    box = {"state": trainer.init(jax.random.key(0))}

    def step():
        box["state"], metrics = trainer.step(box["state"], batch)
        jax.block_until_ready(metrics)

    step()
    return step


def unfused_loss_arm(config):
    """`jax_arm` with the train step's loss traced through the unfused path (logits of each
    chunk, then token_nll, differentiated by JAX): what losses.unembed_nll replaced."""
    def unfused(cfg, params, hidden, targets, loss_chunk):
        total, count = losses.chunked_token_nll(
            hidden, targets, lambda h: llama.logits_from_hidden(cfg, params, h), loss_chunk)
        return total / count

    fused, train_step.hidden_nll = train_step.hidden_nll, unfused
    try:
        return jax_arm(config)  # traced and compiled here, with the unfused loss
    finally:
        train_step.hidden_nll = fused


def autodiff_projection_arm(config):
    """`jax_arm` with the model's projections traced as plain tensordots (autodiff's weight
    gradients, XLA's choice of transposes): what model/projection.py replaced."""
    custom, llama.project = llama.project, projection.plain_projection
    try:
        return jax_arm(config)
    finally:
        llama.project = custom


def autodiff_attention_arm(config, run=jax_arm):
    """`run(config)` with the CPU attention core traced as the full-score autodiff reference."""
    blocked = attention._causal_core
    attention._causal_core = lambda q, k, v, block: attention.reference_core(q, k, v)
    try:
        return run(config)
    finally:
        attention._causal_core = blocked


def torch_arm(config):
    """One step of transformers' LlamaForCausalLM with torch AdamW at the config's shape."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    m, t, o = config.model, config.train, config.optim
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.ffn_dim,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads, head_dim=m.head_dim, tie_word_embeddings=True,
        max_position_embeddings=t.seq_len, rms_norm_eps=m.norm_eps, attn_implementation="sdpa"))
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
                            weight_decay=o.weight_decay)
    batch = torch.randint(0, m.vocab_size, (t.global_batch, t.seq_len + 1))
    inputs, targets = batch[:, :-1], batch[:, 1:]

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, m.vocab_size),
                                                 targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()

    step()
    return step


def loop_arm(shape: str, steps: int):
    """The real loop (train.run) over `steps` plain steps; its tokens/s from metrics.jsonl
    (log windows after the first, which holds the compile on the first call)."""
    config = shape_config(shape)
    config.prune.update(warmup_steps=steps, prune_steps=1, every=1)
    config.train.update(steps=steps + 1, log_every=max(steps // 4, 1), checkpoint_every=NEVER)

    def run() -> float:
        with tempfile.TemporaryDirectory() as workdir:
            train.run(config, workdir)
            with open(f"{workdir}/metrics.jsonl") as f:
                lines = [json.loads(line) for line in f]
        rates = [l["tok/s"] for l in lines[1:] if l["step"] <= steps]
        return statistics.median(rates)

    run()
    return run


def measure(shape: str, arms: list[str], rounds: int, steps: int, loop: bool) -> dict:
    """Interleaved rounds over the arms at one shape; tokens/s per arm and the ratios."""
    config = shape_config(shape)
    tokens = config.train.global_batch * config.train.seq_len
    runners = {}
    for arm in arms:
        print(f"[{shape}] compiling {arm}", flush=True)
        runners[arm] = (torch_arm(config) if arm == "torch" else
                        unfused_loss_arm(config) if arm == "loss_unfused" else
                        autodiff_projection_arm(config) if arm == "proj_autodiff" else
                        autodiff_attention_arm(config) if arm == "attn_autodiff" else
                        autodiff_attention_arm(config, autodiff_projection_arm)
                        if arm == "proj_attn_autodiff" else
                        jax_arm(arm_config(shape, arm)))
    loop_run = loop_arm(shape, 4 * steps * 2) if loop else None
    rates = {arm: [] for arm in arms}
    cpu_ms = {arm: [] for arm in arms}  # process CPU time per step, ms
    peaks = []
    loop_rates, bare_rates = [], []
    for r in range(rounds):
        peaks.append(mfu.measure_matmul_flops("float32", 1024, 3))
        for arm in arms:
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(steps):
                runners[arm]()
            rates[arm].append(steps * tokens / (time.perf_counter() - start))
            cpu_ms[arm].append((time.process_time() - cpu_start) / steps * 1e3)
        if loop_run is not None and "plain" in runners:  # bare plain steps, then the loop
            start = time.perf_counter()
            for _ in range(4 * steps):
                runners["plain"]()
            bare_rates.append(4 * steps * tokens / (time.perf_counter() - start))
            loop_rates.append(loop_run())
        print(f"[{shape}] round {r + 1}: " + ", ".join(
            f"{a} {rates[a][-1]:.0f}" for a in arms), flush=True)
    tok_s = {arm: statistics.median(v) for arm, v in rates.items()}
    peak = statistics.median(peaks)
    result = {"shape": shape, "model": dict(config.model), "tokens_per_step": tokens,
              "tok_s": tok_s, "tok_s_rounds": rates, "peak_f32_flops": peak,
              "cpu_ms_per_step": {arm: statistics.median(v) for arm, v in cpu_ms.items()},
              "cpu_ms_rounds": cpu_ms,
              "compacted_dims": {a: compacted_dims(shape, *dense_arm(a))
                                 for a in arms if a.startswith("dense")}}
    if "plain" in tok_s:
        cfg = config_lib.model_config(config)
        flops = mfu.flops_per_token(ArchSpec.from_masks(llama.full_masks(cfg), cfg),
                                    config.train.seq_len, dense=True)
        result["mfu_plain_vs_f32_peak"] = tok_s["plain"] * flops / peak
        result["time_vs_plain"] = {arm: tok_s["plain"] / v for arm, v in tok_s.items()}
        cpu = result["cpu_ms_per_step"]
        result["cpu_time_vs_plain"] = {arm: v / cpu["plain"] for arm, v in cpu.items()}
        if "torch" in tok_s:
            result["plain_over_torch"] = tok_s["plain"] / tok_s["torch"]
    if loop_rates:
        result["loop"] = {"loop_tok_s": statistics.median(loop_rates),
                          "bare_tok_s": statistics.median(bare_rates),
                          "loop_over_bare": statistics.median(loop_rates)
                          / statistics.median(bare_rates)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", default="demo,8m")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="steps per arm per round")
    parser.add_argument("--loop", action="store_true", help="also the train loop vs bare step")
    parser.add_argument("--out", default="bench/results/step.json")
    args = parser.parse_args()
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        parser.error(f"unknown arms {unknown}; known: {ARMS}")
    results = {"devices": jax.device_count(), "platform": jax.default_backend(),
               "rounds": args.rounds, "steps_per_round": args.steps, "shapes": {}}
    for shape in args.shapes.split(","):  # written after each shape: a long run keeps its part
        results["shapes"][shape] = measure(shape, arms, args.rounds, args.steps, args.loop)
        report(results, args.out)


if __name__ == "__main__":
    main()
