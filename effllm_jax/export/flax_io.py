"""The compact Flax export: spec.json + model.safetensors (+ tokenizer/), never pickle.

Layout of an export directory:
  export.json        {"format": "effllm-compact", "version": 1, "dtype": ..., "notes": [...]}
  spec.json          ArchSpec.to_json() of the compact model (per-layer widths)
  model.safetensors  compact params flattened with dots ('layers.3.attn.wq', ...)
  tokenizer/         the run's tokenizer, when there is one
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax
import ml_dtypes
import numpy as np

from effllm_jax.arch import ArchSpec
from effllm_jax.export import safetensors_io, tokenizer_io, widths
from effllm_jax.model.compact import abstract_compact_params

FORMAT = "effllm-compact"
VERSION = 1
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}


def storage_dtype(name: str) -> np.dtype:
    """numpy dtype for an export dtype name."""
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported for export; choose from {list(DTYPES)}")
    return DTYPES[name]


def expected_shapes(spec: ArchSpec) -> dict[str, tuple[int, ...]]:
    """Flat tensor name -> shape that `spec` implies."""
    shapes = jax.tree.map(lambda x: tuple(x.shape), abstract_compact_params(spec))
    return widths.flatten(shapes) if isinstance(shapes, dict) else {}


def is_compact_export(path: str) -> bool:
    """True for a directory written by `save_compact`."""
    return os.path.isfile(os.path.join(path, "export.json")) and os.path.isfile(
        os.path.join(path, "spec.json"))


def save_compact(out_dir: str, spec: ArchSpec, params: dict | widths.LazyTensors, *,
                 tokenizer: Any = None, tokenizer_path: str | None = None,
                 dtype: str = "float32", notes: Sequence[str] = (),
                 max_length: int | None = None) -> None:
    """Writes a compact model (nested params or lazy tensors) one tensor at a time."""
    np_dtype = storage_dtype(dtype)
    os.makedirs(out_dir, exist_ok=True)
    flat = widths.flatten(params)
    shapes = expected_shapes(spec)
    missing, extra = sorted(set(shapes) - set(flat)), sorted(set(flat) - set(shapes))
    if missing or extra:
        raise ValueError(f"parameters do not match the spec: missing {missing}, unexpected {extra}")

    def builder(name: str):
        value = flat[name]
        return lambda: (value() if callable(value) else np.asarray(value)).astype(np_dtype)

    plans = [safetensors_io.TensorPlan(n, shapes[n], np_dtype, builder(n)) for n in shapes]
    safetensors_io.write_safetensors(os.path.join(out_dir, "model.safetensors"), plans,
                                     {"format": "np", "producer": FORMAT})
    with open(os.path.join(out_dir, "spec.json"), "w") as f:
        json.dump(spec.to_json(), f, indent=2)
    tok_dir = os.path.join(out_dir, "tokenizer")
    wrote_tokenizer = copy_tokenizer(tokenizer, tokenizer_path, tok_dir)
    meta = {"format": FORMAT, "version": VERSION, "dtype": dtype, "notes": list(notes),
            "tokenizer": "tokenizer" if wrote_tokenizer else None,
            "max_length": None if max_length is None else int(max_length)}
    with open(os.path.join(out_dir, "export.json"), "w") as f:  # written last: marks completion
        json.dump(meta, f, indent=2)


def load_compact(path: str) -> tuple[ArchSpec, dict]:
    """Reads (spec, float32 compact params) back, checking every tensor against the spec."""
    if not is_compact_export(path):
        raise FileNotFoundError(f"{path} is not a compact export (no export.json + spec.json)")
    with open(os.path.join(path, "export.json")) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or int(meta.get("version", -1)) > VERSION:
        raise ValueError(f"{path}: export format {meta.get('format')!r} version "
                         f"{meta.get('version')} is not readable by this code")
    with open(os.path.join(path, "spec.json")) as f:
        spec = ArchSpec.from_json(json.load(f))
    shapes = expected_shapes(spec)
    flat = {}
    with safetensors_io.TensorSource(os.path.join(path, "model.safetensors")) as source:
        extra = sorted(set(source.names()) - set(shapes))
        if extra:
            raise ValueError(f"{path}: tensors {extra} are not part of the model in spec.json")
        for name, shape in shapes.items():
            if name not in source:
                raise ValueError(f"{path}: tensor {name} (shape {shape}, from spec.json) is "
                                 f"missing from model.safetensors")
            try:
                flat[name] = source.get(name, shape).astype(np.float32)
            except ValueError as e:
                raise ValueError(f"{path}: weights do not match spec.json: {e}") from e
    return spec, widths.unflatten(flat)


def export_max_length(path: str) -> int | None:
    """The context length an export states in export.json (None for older exports)."""
    with open(os.path.join(path, "export.json")) as f:
        value = json.load(f).get("max_length")
    return None if value is None else int(value)


def load_export_tokenizer(path: str) -> Any:
    """The tokenizer saved with an export, or None."""
    tok_dir = os.path.join(path, "tokenizer")
    return tokenizer_io.load_tokenizer(tok_dir) if os.path.exists(tok_dir) else None


def copy_tokenizer(tokenizer: Any, tokenizer_path: str | None, tok_dir: str) -> bool:
    """Copies the run's tokenizer path verbatim, else saves the tokenizer object."""
    import shutil

    if tokenizer_path is not None and os.path.exists(tokenizer_path):
        if os.path.isdir(tok_dir):
            shutil.rmtree(tok_dir)
        if os.path.isdir(tokenizer_path):
            shutil.copytree(tokenizer_path, tok_dir)
        else:  # e.g. <workdir>/tokenizer.model -> tokenizer/tokenizer.model
            os.makedirs(tok_dir)
            shutil.copyfile(tokenizer_path, os.path.join(tok_dir, os.path.basename(tokenizer_path)))
        return True
    if tokenizer is not None:
        return tokenizer_io.save_tokenizer(tokenizer, tok_dir)
    return False
