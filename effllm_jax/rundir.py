"""What a model path holds, told apart by its contents, without writing anything.

Four kinds are read by export, evaluate, generate and prune_posthoc:
  run   a training run directory: config.json (a run config) + checkpoints/<step>/
  flax  a compact Flax export: export.json + spec.json + model.safetensors
  hf    a Hugging Face directory: config.json (a model config) + model.safetensors(.index.json)
  gguf  a .gguf file (by its magic bytes)
A directory that is recognisably one kind but lacks a file it needs is named with the missing
file, instead of being taken for another kind (an HF directory without weights is not a run).
gs:// paths are training runs; they are checked when read.
"""
from __future__ import annotations

import json
import os

from effllm_jax import paths

GGUF_MAGIC = b"GGUF"
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


class ModelPathError(ValueError):
    """A path that is not a model we can read, naming what is missing."""


def is_gguf(path: str) -> bool:
    """True for a file that starts with GGUF's magic bytes."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def checkpoint_steps(workdir: str) -> list[int]:
    """The saved steps under workdir/checkpoints (finished step folders only), ascending."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory)
                  if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def _json(path: str) -> dict | None:
    """The JSON object in `path`, or None if it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def kind(path: str) -> str:
    """'run', 'flax', 'hf' or 'gguf'; raises ModelPathError naming what is missing (and
    FileNotFoundError when nothing is at `path`)."""
    if paths.is_remote(path):
        return "run"
    if not os.path.exists(path):
        raise FileNotFoundError(f"no model at {path}: it does not exist")
    if os.path.isfile(path):
        if is_gguf(path):
            return "gguf"
        raise ModelPathError(f"{path} is a file but not GGUF (no GGUF magic bytes); a run, a "
                             f"Flax export or a Hugging Face model is a directory")
    has = lambda name: os.path.exists(os.path.join(path, name))  # noqa: E731
    if has("export.json") or has("spec.json"):
        return _require(path, "flax", ("export.json", "spec.json", "model.safetensors"),
                        "a compact Flax export")
    config = _json(os.path.join(path, "config.json")) if has("config.json") else None
    is_run_config = config is not None and "train" in config and "model" in config
    if has("effllm_export.json") or (config is not None and not is_run_config):
        if not any(has(n) for n in HF_WEIGHTS):
            raise ModelPathError(f"{path} looks like a Hugging Face directory (config.json) but "
                                 f"lacks its weights: no model.safetensors or "
                                 f"model.safetensors.index.json")
        return "hf"
    if is_run_config or has("checkpoints"):
        if not has("config.json"):
            raise ModelPathError(f"{path} looks like a run directory (checkpoints/) but lacks "
                                 f"config.json")
        if not checkpoint_steps(path):
            raise ModelPathError(f"run directory {path} has no checkpoint yet (checkpoints/ is "
                                 f"missing or empty)")
        return "run"
    raise ModelPathError(f"{path} is not a model: it has none of config.json (a run or a "
                         f"Hugging Face directory), export.json (a Flax export), checkpoints/")


def _require(path: str, name: str, files: tuple[str, ...], what: str) -> str:
    missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
    if missing:
        raise ModelPathError(f"{path} looks like {what} but lacks {', '.join(missing)}")
    return name


def check_run(workdir: str) -> None:
    """Raises ModelPathError unless `workdir` is a local run with a checkpoint (URLs pass)."""
    found = kind(workdir)
    if found != "run":
        raise ModelPathError(f"{workdir} is a {found} model, not a training run directory")
