"""Run a set of zero-shot tasks on one model and summarise them like the paper's Table 2."""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np

from effllm_jax.evaluate import tasks as task_lib
from effllm_jax.evaluate.scoring import (DEFAULT_BATCH_SIZE, DEFAULT_BUCKETS, DEFAULT_MAX_LENGTH,
                                         score_items)


def model_max_length(lm: Any) -> int:
    """The model's context length if it states one, else the harness's 2048 fallback."""
    for value in (getattr(lm, "max_length", None),
                  (getattr(getattr(lm, "spec", None), "model", None) or {}).get("max_seq_len")):
        if value:
            return int(value)
    return DEFAULT_MAX_LENGTH


def parse_tasks(tasks: str | Sequence[str] | None) -> list[str]:
    """Canonical task names from a comma list or sequence (default: the paper's seven)."""
    if tasks is None:
        return list(task_lib.PAPER_TASKS)
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t.strip()]
    names = [task_lib.canonical_task(t.strip()) for t in tasks]
    if not names:
        raise ValueError("no tasks given")
    return list(dict.fromkeys(names))  # de-duplicated, order kept


def _throttled_progress(log: Callable[[str], None], name: str,
                        every_s: float = 30.0) -> Callable[[int, int], None]:
    """A progress callback that logs at most every `every_s` seconds (and at the end)."""
    last = [0.0]

    def progress(done: int, total: int) -> None:
        if time.time() - last[0] > every_s or done == total:
            last[0] = time.time()
            log(f"  {name}: {done}/{total} unique requests scored")

    return progress


def evaluate_tasks(lm: Any, tasks: str | Sequence[str] | None = None, limit: int | None = None, *,
                   data_dir: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                   max_length: int | None = None, buckets: Sequence[int] = DEFAULT_BUCKETS,
                   add_bos: bool = False, metrics: dict[str, str] | None = None,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Scores `lm` on each task (first `limit` items in file order) -> JSON-ready results.

    results["tasks"][name] holds acc, acc_norm, their stderrs, n, and "score" (the headline
    metric named by "metric": acc_norm where the harness reports it, else acc, unless
    `metrics` maps the task to another); results["average"] is the mean score over the
    paper's seven tasks among those run.
    """
    names = parse_tasks(tasks)
    overrides = {task_lib.canonical_task(k): v for k, v in (metrics or {}).items()}
    for task, metric in overrides.items():
        if metric not in ("acc", "acc_norm"):
            raise ValueError(f"metric for {task} must be 'acc' or 'acc_norm', got {metric!r}")
    max_length = max_length or model_max_length(lm)
    per_task: dict[str, Any] = {}
    started = time.time()
    for name in names:
        t0 = time.time()
        items = task_lib.load_task(name, data_dir=data_dir, limit=limit)
        progress = None
        if log is not None:
            log(f"{name}: {len(items)} items, {sum(len(i.choices) for i in items)} requests")
            progress = _throttled_progress(log, name)
        result = score_items(lm, items, add_bos=add_bos, batch_size=batch_size,
                             max_length=max_length, buckets=buckets, progress=progress)
        metric = overrides.get(name) or task_lib.headline_metric(name)
        result.update(metric=metric, score=result[metric], seconds=round(time.time() - t0, 1),
                      reported_metrics=list(task_lib.HARNESS_METRICS.get(name, ("acc",))))
        per_task[name] = result
        if log is not None:
            log(f"{name}: acc {result['acc']:.4f}  acc_norm {result['acc_norm']:.4f}  "
                f"({result['seconds']} s)")
    paper = [t for t in task_lib.PAPER_TASKS if t in per_task]
    return {
        "tasks": per_task,
        "average": float(np.mean([per_task[t]["score"] for t in paper])) if paper else None,
        "average_over": paper,
        "config": {"limit": limit, "max_length": max_length, "batch_size": batch_size,
                   "metrics": {t: per_task[t]["metric"] for t in per_task},
                   "add_bos": add_bos, "buckets": list(buckets), "num_fewshot": 0},
        "seconds": round(time.time() - started, 1),
    }


def format_table(results: dict[str, Any], model_name: str = "model") -> str:
    """A Table-2-shaped text table (percentages): paper columns first, then any others, Avg."""
    per_task = results["tasks"]
    cols = [t for t in task_lib.PAPER_TASKS if t in per_task]
    cols += [t for t in per_task if t not in cols]
    heads = [task_lib.display_name(t) for t in cols] + ["Avg."]
    cells = [f"{100 * per_task[t]['score']:.1f}" for t in cols]
    avg = results.get("average")
    cells.append("-" if avg is None else f"{100 * avg:.1f}")
    widths = [max(len(h), len(c), 5) for h, c in zip(heads, cells)]
    name_w = max(len(model_name), 5)
    line1 = "Model".ljust(name_w) + "  " + "  ".join(h.rjust(w) for h, w in zip(heads, widths))
    line2 = model_name.ljust(name_w) + "  " + "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    metrics = ", ".join(f"{task_lib.display_name(t)}={per_task[t]['metric']}" for t in cols)
    n = ", ".join(f"{task_lib.display_name(t)}={per_task[t]['n']}" for t in cols)
    avg_note = "Avg. over " + (", ".join(task_lib.display_name(t)
                                         for t in results.get("average_over", [])) or "nothing")
    return "\n".join([line1, "-" * len(line1), line2, "", f"metrics: {metrics}",
                      f"items: {n}", avg_note])
