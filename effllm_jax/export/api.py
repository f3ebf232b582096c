"""Export a training run (or any loadable model), and load any model as a LanguageModel.

`load_language_model(path)` is the one entry point evaluation and generation use: it takes a
training workdir, a compact Flax export, a Hugging Face directory or a .gguf file.
"""
from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import shutil
import tempfile
from typing import Any, Literal

import jax
import numpy as np

from effllm_jax import paths, rundir
from effllm_jax.arch import ArchSpec
from effllm_jax.export import flax_io, gguf_import, hf, tokenizer_io, widths
from effllm_jax.model.compact import slice_params
from effllm_jax.model.lm import LanguageModel

log = logging.getLogger(__name__)

Format = Literal["flax", "hf"]


def is_gguf(path: str) -> bool:
    """True for a GGUF file (by magic bytes)."""
    return rundir.is_gguf(path)


def load_run(workdir: str, step: int | None = None) -> tuple[ArchSpec, dict, str | None]:
    """(spec, compact params, tokenizer path or None) of a training checkpoint."""
    from effllm_jax import checkpoint  # imported late: training-only dependencies

    saved = [] if paths.is_remote(workdir) else rundir.checkpoint_steps(workdir)
    if step is not None and saved and step not in saved:
        raise ValueError(f"{workdir} has no checkpoint step {step}; saved steps: {saved}")
    ck = checkpoint.load_inference(workdir, step=step)
    spec, params = slice_params(ck.params, ck.masks, ck.cfg)
    saved = getattr(ck, "spec", None)
    if saved is not None:
        if saved.hidden_dim != spec.hidden_dim or tuple(saved.layers) != tuple(spec.layers):
            diff = [i for i, (a, b) in enumerate(zip(saved.layers, spec.layers)) if a != b]
            raise ValueError(f"{workdir}: the saved architecture spec does not match the "
                             f"checkpoint's masks (hidden {saved.hidden_dim} vs {spec.hidden_dim}; "
                             f"layers differing: {diff[:8]}); the checkpoint is inconsistent")
        spec = dataclasses.replace(spec, step=saved.step, tokens_seen=saved.tokens_seen)
    else:
        spec = dataclasses.replace(spec, step=int(getattr(ck, "step", 0) or 0))
    return spec, params, run_tokenizer_path(workdir)


def run_tokenizer_path(workdir: str) -> str | None:
    """Where a run keeps its tokenizer (data.Dataset.save writes tokenizer.model), or None.

    A gs:// run's tokenizer is first copied into a local temporary directory.
    """
    if paths.is_remote(workdir):
        remote = paths.join(workdir, "tokenizer.model")
        if not remote.exists():
            return None
        staging = tempfile.mkdtemp(prefix="effllm-tokenizer-")
        atexit.register(shutil.rmtree, staging, ignore_errors=True)
        local = os.path.join(staging, "tokenizer.model")
        with open(local, "wb") as f:
            f.write(paths.read_bytes(remote))
        return local
    for name in ("tokenizer", "tokenizer.model"):
        path = os.path.join(workdir, name)
        if os.path.exists(path):
            return path
    return None


def _language_model(spec: ArchSpec, params: dict, tokenizer: Any, path: str,
                    max_length: int | None = None) -> LanguageModel:
    """LanguageModel, warning when the tokenizer can emit ids the model has no row for."""
    vocab = spec.model_config.vocab_size
    if tokenizer is not None and getattr(tokenizer, "vocab_size", 0) > vocab:
        log.warning("%s: the tokenizer has %d tokens but the model's vocabulary is %d",
                    path, tokenizer.vocab_size, vocab)
    return LanguageModel(spec, params, tokenizer, max_length=max_length)


def load_exported(path: str) -> LanguageModel:
    """A compact Flax export or a Hugging Face directory (+ its tokenizer) as a LanguageModel."""
    if flax_io.is_compact_export(path):
        spec, params = flax_io.load_compact(path)
        return _language_model(spec, params, flax_io.load_export_tokenizer(path), path,
                               flax_io.export_max_length(path))
    if hf.is_hf_dir(path):
        spec, params = hf.load_hf_compact(path)
        return _language_model(spec, params, hf.load_hf_tokenizer(path), path,
                               hf.hf_context_length(path))
    raise FileNotFoundError(f"{path} is neither a compact export (export.json + spec.json) nor "
                            "a Hugging Face directory (config.json + model.safetensors)")


def load_language_model(path: str, step: int | None = None) -> LanguageModel:
    """Any model we can read: a training workdir (local or gs://), an export, or a .gguf file."""
    found = rundir.kind(path)  # by contents; names a missing file (gs:// URLs are runs)
    if found == "gguf":
        return gguf_import.load_gguf(path)
    if found in ("flax", "hf"):
        return load_exported(path)
    return _load_run_model(path, step)


def _load_run_model(path: str, step: int | None) -> LanguageModel:
    spec, params, tok_path = load_run(path, step)
    tokenizer = tokenizer_io.load_tokenizer(tok_path) if tok_path else None
    return _language_model(spec, params, tokenizer, path)


def export_model(out_dir: str, spec: ArchSpec, params: dict, fmt: Format = "flax", *,
                 tokenizer: Any = None, tokenizer_path: str | None = None,
                 round_to: int | None = None, strict: bool = False, gqa: str = "auto",
                 dtype: str = "float32", max_position_embeddings: int | None = None
                 ) -> list[str]:
    """Writes compact (spec, params) as a Flax or Hugging Face export; returns notes.

    max_position_embeddings is the context length written (HF config.json, export.json);
    None writes the harness's 2048 fallback to HF and nothing to a Flax export.
    """
    params = jax.tree.map(np.asarray, params)
    if fmt == "hf":
        return hf.export_hf(out_dir, spec, params, tokenizer=tokenizer,
                            tokenizer_path=tokenizer_path, strict=strict, gqa=gqa,
                            round_to=round_to, dtype=dtype,
                            max_position_embeddings=max_position_embeddings or 2048)
    if fmt != "flax":
        raise ValueError(f"format {fmt!r}; expected 'flax' or 'hf'")
    notes: list[str] = []
    if round_to:
        old = spec
        spec, tensors = widths.round_widths(spec, params, round_to)
        notes.append(f"widths rounded up to multiples of {round_to} by exact zero padding "
                     f"(hidden {old.hidden_dim}->{spec.hidden_dim}, FFN per layer)")
    else:
        tensors = params
    flax_io.save_compact(out_dir, spec, tensors, tokenizer=tokenizer,
                         tokenizer_path=tokenizer_path, dtype=dtype, notes=notes,
                         max_length=max_position_embeddings)
    return notes


def export_run(source: str, out_dir: str, fmt: Format = "flax", *, step: int | None = None,
               overwrite: bool = False, **options: Any) -> list[str]:
    """Exports a training workdir (or any model `load_language_model` reads) to `out_dir`.

    A non-empty `out_dir` is refused unless `overwrite`; the export is written into a
    temporary sibling directory and renamed into place, so `out_dir` is never half-written
    and no file of an earlier export survives in it.
    """
    found = rundir.kind(source)  # before anything is written: names a missing file
    target = _check_out_dir(source, out_dir, overwrite)
    staging = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=f".{os.path.basename(target)}.")
    try:
        notes = _export_into(staging, source, found, fmt, step, options)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes 0700; an export is shareable
        _replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return notes


def _check_out_dir(source: str, out_dir: str, overwrite: bool) -> str:
    """The absolute output directory; refuses a non-empty one (unless overwrite) or the source."""
    if paths.is_remote(out_dir):
        raise ValueError(f"--out={out_dir}: exports are written to a local directory")
    target = os.path.abspath(out_dir)
    if not paths.is_remote(source):
        src = os.path.abspath(source)
        if target == src or src.startswith(target + os.sep):
            raise ValueError(f"--out={out_dir} would replace the source {source}; choose "
                             f"another directory")
    if os.path.exists(target) and not os.path.isdir(target):
        raise FileExistsError(f"--out={out_dir} is a file, not a directory")
    if os.path.isdir(target) and os.listdir(target) and not overwrite:
        raise FileExistsError(f"--out={out_dir} is not empty; pass --overwrite to replace it")
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        os.makedirs(parent)
    return target


def _replace_dir(new: str, target: str) -> None:
    """Renames `new` to `target`; an existing `target` is moved aside first, then deleted."""
    old = None
    if os.path.exists(target):
        old = tempfile.mkdtemp(dir=os.path.dirname(target),
                               prefix=f".{os.path.basename(target)}.old.")
        os.rmdir(old)
        os.rename(target, old)
    os.rename(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _export_into(out_dir: str, source: str, found: str, fmt: Format, step: int | None,
                 options: dict) -> list[str]:
    if found == "run":
        spec, params, tok_path = load_run(source, step)
        tokenizer = None
        if tok_path is not None:
            try:  # only for BOS/EOS ids in config.json; the files are copied regardless
                tokenizer = tokenizer_io.load_tokenizer(tok_path)
            except Exception as e:  # noqa: BLE001
                log.warning("could not load the run's tokenizer at %s: %s", tok_path, e)
        return export_model(out_dir, spec, params, fmt, tokenizer=tokenizer,
                            tokenizer_path=tok_path, **options)
    lm = load_language_model(source, step)
    if options.get("max_position_embeddings") is None:  # carry the source's context length
        options["max_position_embeddings"] = lm.max_length
    return export_model(out_dir, lm.spec, lm.params, fmt, tokenizer=lm.tokenizer, **options)
