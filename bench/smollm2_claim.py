r"""A real pretrained source: SmolLM2-135M-Instruct (GGUF) pruned to ~70M, two ways, same tokens.

  python bench/smollm2_claim.py [--out=runs/smollm2_claim] [--arms=source,P,O] \
      [--steps=12] [--batch=4] [--seq_len=256] [--limit=300] [--compensation=none|obs]

Arms (bench/smollm2_claim_config.py holds the shared setting):
  source  the imported model, unpruned (reference; no training)
  P       pruning-aware continued training: `train.init_from` = the GGUF, a short dense warm-up
          (the first saliency window), pruning events over ~2/3 of the steps down to 70M
          params, then continued training at the fixed architecture (`continued.steps`)
  O       one-shot post-training pruning of the imported model to the same count (LLM-Pruner
          Taylor |w·Σg| over calibration batches = the first training batches; optional OBS
          compensation), then training at that fixed architecture for the same steps as P
Both arms see the same batches (batch k = f(seed, k)) and the same number of training tokens.
Each model is then scored on held-out text (Persuasion, and held-out Python docs: never
trained on) and on the paper's seven tasks (first `--limit` items each).

Resumable: a finished run or evaluation (its JSON under OUT/eval/) is skipped; an interrupted
training run resumes from its checkpoint. Writes OUT/summary.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the config beside it

import smollm2_claim_config  # noqa: E402

HELDOUT_CHARS = 5_000  # of each held-out text: perplexity costs forwards, and CPU time is short


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def arm_config(arm: str, steps: int, batch: int, seq_len: int, target: int | None = None):
    """The config of arm P (pruning-aware) or O (fixed architecture after one-shot pruning)."""
    config = smollm2_claim_config.get_config()
    continued = max(2, steps // 6)
    warmup = max(1, steps // 6)
    prune_steps = steps - warmup - continued
    if prune_steps < 1:
        raise SystemExit(f"--steps={steps} is too few for warm-up, pruning and continued training")
    config.train.update(global_batch=batch, seq_len=seq_len,
                        checkpoint_every=max(1, steps // 2))  # each save copies ~1.6 GB
    config.optim.warmup_steps = max(1, min(config.optim.warmup_steps, steps // 4))
    if arm == "P":
        config.train.steps = warmup + prune_steps
        config.continued.update(steps=continued, warmup_steps=max(1, continued // 4))
        config.prune.update(warmup_steps=warmup, prune_steps=prune_steps,
                            every=max(1, prune_steps // 8))  # ~8 events
    else:  # O: the run directory holds the pruned model; train it at that architecture
        config.train.update(steps=steps, init_from="")
        config.continued.steps = 0
        config.prune.update(target_params=int(target), warmup_steps=0, prune_steps=1, every=1)
    return config


def _done(workdir: str, total: int) -> bool:
    from effllm_jax import checkpoint as ckpt_lib
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return False
    ck = ckpt_lib.Checkpointer(workdir, async_save=False)
    try:
        return ck.latest_step() == total
    finally:
        ck.close()


def run_p(out: str, args) -> str:
    """Arm P: pruning-aware continued training from the GGUF."""
    from effllm_jax import train
    workdir = os.path.join(out, "P")
    config = arm_config("P", args.steps, args.batch, args.seq_len)
    if not _done(workdir, args.steps):
        _log(f"arm P: training {args.steps} steps in {workdir}")
        train.run(config, workdir)
    return workdir


def run_o(out: str, args) -> str:
    """Arm O: one-shot Taylor pruning of the GGUF, then training at the fixed architecture."""
    from effllm_jax import config as config_lib
    from effllm_jax import data as data_lib
    from effllm_jax import prune_posthoc, train
    from effllm_jax.pruning import groups
    workdir = os.path.join(out, "O")
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        base = arm_config("P", args.steps, args.batch, args.seq_len)  # data, model, target
        _log(f"arm O: one-shot taylor pruning ({args.compensation}) into {workdir}")
        _, params, masks, _ = prune_posthoc.load_source(smollm2_claim_config.GGUF)
        t = base.train
        dataset = data_lib.build_dataset(base.data, seq_len=t.seq_len, global_batch=t.global_batch,
                                         seed=t.seed, workdir=workdir)
        batches = (dataset.local_batch(i) for i in range(args.calibration_batches))
        params, masks = prune_posthoc.prune(
            base, params, masks, batches, method="taylor", scope="global",
            target=int(base.prune.target_params), compensation=args.compensation)
        reached = int(groups.count_params(masks, config_lib.model_config(base)))
        config = arm_config("O", args.steps, args.batch, args.seq_len, max(reached, int(
            base.prune.target_params)))
        prune_posthoc.write_run(workdir, config, params, masks, None)
    with open(os.path.join(workdir, "config.json")) as f:
        target = json.load(f)["prune"]["target_params"]
    config = arm_config("O", args.steps, args.batch, args.seq_len, target)
    if not _done(workdir, args.steps):
        _log(f"arm O: training {args.steps} steps at the fixed architecture")
        train.run(config, workdir)
    return workdir


def heldout_texts(out: str) -> dict[str, str]:
    """The held-out novel and documentation, as the run's data config splits them (cached)."""
    path = os.path.join(out, "heldout.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    from effllm_jax.data import sources as sources_lib
    from effllm_jax.data.fetch import cache_root
    d = smollm2_claim_config.get_config().data
    root = cache_root(d.cache_dir or None)
    docs = {s: sources_lib.read_source(s, root=root, text_field=d.text_field,
                                       errors=d.encoding_errors) for s in d.sources}
    _, held = sources_lib.split_heldout(docs, tuple(d.heldout), float(d.heldout_fraction))
    texts = {"novel": "\n".join(doc.text for doc in held["austen"])[:HELDOUT_CHARS],
             "docs": "\n".join(doc.text for doc in held["python_docs"])[:HELDOUT_CHARS]}
    os.makedirs(out, exist_ok=True)
    with open(path + f".{os.getpid()}", "w") as f:  # arms may run as parallel processes
        json.dump(texts, f)
    os.replace(path + f".{os.getpid()}", path)
    return texts


def _cached(path: str, compute) -> dict:
    """The JSON at `path`, computed (and written) once."""
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    result = compute()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return result


def evaluate(name: str, checkpoint: str, out: str, args) -> dict:
    """Held-out perplexity, then the seven tasks, of one model (each cached under OUT/eval/)."""
    import jax
    from effllm_jax.evaluate import evaluate_tasks, perplexity
    from effllm_jax.export import load_language_model
    lm = None

    def model():
        nonlocal lm
        if lm is None:
            _log(f"loading {name} ({checkpoint})")
            lm = load_language_model(checkpoint)
        return lm

    def held_out() -> dict:
        result = {"params": int(sum(a.size for a in jax.tree.leaves(model().params))),
                  "tokens": int(model().spec.tokens_seen)}
        for kind, text in heldout_texts(out).items():
            ppl = perplexity(model(), text, max_length=args.seq_len, batch_size=8)
            result[kind] = ppl.to_json()
            _log(f"{name}: held-out {kind} perplexity {ppl.perplexity:.2f}")
        return result

    def tasks() -> dict:
        scores = evaluate_tasks(model(), None, args.limit, max_length=512, log=_log)
        return {"tasks": {k: v["score"] for k, v in scores["tasks"].items()},
                "average": scores["average"]}

    result = {"name": name, "checkpoint": checkpoint}
    ppl = _cached(os.path.join(out, "eval", f"{name}-heldout.json"), held_out)
    result.update(params=ppl.pop("params"), tokens=ppl.pop("tokens"), perplexity=ppl)
    if args.limit:
        result.update(_cached(os.path.join(out, "eval", f"{name}-tasks-limit{args.limit}.json"),
                              tasks))
    return result


def table(results: list[dict]) -> str:
    """A Markdown table: params, tokens, held-out perplexity, each task, average."""
    from effllm_jax.evaluate.tasks import PAPER_TASKS
    head = ["model", "params", "tokens", "ppl novel", "ppl docs", *PAPER_TASKS, "avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        tasks = r.get("tasks", {})
        cells = [r["name"], f"{r['params'] / 1e6:.1f}M", f"{r['tokens']:,}",
                 f"{r['perplexity']['novel']['perplexity']:.2f}",
                 f"{r['perplexity']['docs']['perplexity']:.2f}",
                 *[f"{100 * tasks[t]:.1f}" if t in tasks else "-" for t in PAPER_TASKS],
                 f"{100 * r['average']:.1f}" if r.get("average") is not None else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Runs the arms asked for, evaluates each, prints and writes the table."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/smollm2_claim")
    p.add_argument("--arms", default="source,P,O")
    p.add_argument("--steps", type=int, default=6, help="training steps of each arm")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--limit", type=int, default=300, help="items per task (0: no tasks)")
    p.add_argument("--compensation", default="none", help="arm O: none | obs")
    p.add_argument("--calibration_batches", type=int, default=1)
    args = p.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = set(arms) - {"source", "P", "O"}
    if unknown:
        p.error(f"--arms has unknown {sorted(unknown)}; known: source, P, O")
    if not os.path.exists(smollm2_claim_config.GGUF):
        from effllm_jax.export import fetch_smollm2
        fetch_smollm2()
    heldout_texts(args.out)
    results = []
    for arm in arms:
        if arm == "source":
            checkpoint = smollm2_claim_config.GGUF
        else:
            checkpoint = (run_p if arm == "P" else run_o)(args.out, args)
        results.append(evaluate(arm, checkpoint, args.out, args))
    text = table(results)
    print(text)
    with open(os.path.join(args.out, f"summary-{'-'.join(arms)}.json"), "w") as f:
        json.dump({"args": vars(args), "results": results, "table": text}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
