"""Evaluation: zero-shot multiple-choice tasks (harness conventions), perplexity, bits per byte.

    from effllm_jax.evaluate import evaluate_tasks, format_table, perplexity
    results = evaluate_tasks(lm, "arc_easy,hellaswag", limit=500)

CLI: python -m effllm_jax.evaluate --checkpoint=PATH --tasks=... --limit=N --out=results.json
"""
from effllm_jax.evaluate.perplexity import PerplexityResult, eval_loss, perplexity, token_nll
from effllm_jax.evaluate.scoring import encode_pair, loglikelihoods, score_items
from effllm_jax.evaluate.suite import evaluate_tasks, format_table, parse_tasks
from effllm_jax.evaluate.tasks import (PAPER_TASKS, MultipleChoiceItem, fetch_benchmarks,
                                       load_jsonl_items, load_task)

__all__ = [
    "PAPER_TASKS", "MultipleChoiceItem", "PerplexityResult", "encode_pair", "eval_loss",
    "evaluate_tasks", "fetch_benchmarks", "format_table", "load_jsonl_items", "load_task",
    "loglikelihoods", "parse_tasks", "perplexity", "score_items", "token_nll",
]
