"""Resuming a run: what may not change, and the run's configs kept, one version per change.

A run directory remembers what it was trained with: the model shape (in each checkpoint's
spec), the seed (in its data position) and the config (config.json). Before a resume reads
or writes anything, `check` compares the new config with them:
  - another model shape is refused (the saved state cannot be restored into it);
  - another data mix, tokenizer or seed is refused unless `allow_change` (the CLI's
    --allow_config_change), since the resumed run would see other batches than the
    uninterrupted one; an allowed change is logged.
Other fields (steps, learning rate, logging...) may change on resume. `save_config` keeps the
first config.json as it was and writes each different later config beside it as
config.1.json, config.2.json, ...; the newest version is what the run was last started with.
"""
from __future__ import annotations

import json
import re
from typing import Any, Callable

import ml_collections

from effllm_jax import checkpoint as ckpt_lib
from effllm_jax import paths

MODEL_SHAPE = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
               "ffn_dim", "tie_embeddings")  # numerics (dtype, remat) may change
# What decides the batches a run sees: the data mix, the tokenizer and the seed.
DATA_FIELDS = ("data.kind", "data.sources", "data.weights", "data.heldout",
               "data.heldout_fraction", "data.text_field", "data.encoding_errors", "data.add_bos",
               "data.vocab_size", "data.tokenizer", "train.seed")
_VERSION = re.compile(r"^config\.(\d+)\.json$")


class ResumeError(ValueError):
    """A resume that would change what must not change."""


def check(workdir: str, config: ml_collections.ConfigDict, allow_change: bool = False,
          log: Callable[[str], None] = print) -> int | None:
    """The step the run in `workdir` resumes from (None: a new run); refuses incompatible changes.

    Reads only (creates nothing), so it runs before the data pipeline writes the run directory.
    """
    ckpt = ckpt_lib.Checkpointer(workdir, async_save=False, read_only=True)
    try:
        step = ckpt.latest_step()
        if step is None:
            return None
        _, spec, position = ckpt.restore_meta(step)
    finally:
        ckpt.close()
    saved_shape = {k: spec.model[k] for k in MODEL_SHAPE}
    shape = {k: config.model[k] for k in MODEL_SHAPE}
    if saved_shape != shape:
        diff = ", ".join(f"model.{k}={saved_shape[k]} (now {shape[k]})"
                         for k in MODEL_SHAPE if saved_shape[k] != shape[k])
        raise ResumeError(f"{workdir} holds a run of a different model: {diff}; use a new "
                          f"--workdir or the same model shape")
    changes = data_changes(latest_config(workdir), config, position.get("seed"))
    if changes and not allow_change:
        raise ResumeError(f"{workdir} was trained with {'; '.join(changes)}: resuming would "
                          f"change the data the run sees; use a new --workdir, or pass "
                          f"--allow_config_change to resume anyway")
    if changes:
        log(f"resuming with a changed config (--allow_config_change): {'; '.join(changes)}")
    log(f"resuming {workdir} from step {step}")
    return step


def data_changes(saved: dict | None, config: ml_collections.ConfigDict,
                 saved_seed: Any = None) -> list[str]:
    """'field=old (now new)' for each data, tokenizer or seed field that differs from `saved`."""
    now = _plain(config)
    changes = []
    for dotted in DATA_FIELDS:
        old, new = _get(saved or {}, dotted), _get(now, dotted)
        if dotted == "train.seed" and saved_seed is not None:
            old = saved_seed  # the checkpoint's own record of the data order
        if old is not _MISSING and old != new:
            changes.append(f"{dotted}={_show(old)} (now {_show(new)})")
    return changes


def config_versions(workdir: str) -> list[Any]:
    """config.json, then config.1.json, config.2.json, ... that exist, oldest first."""
    first = paths.join(workdir, ckpt_lib.CONFIG_FILE)
    if not first.exists():
        return []
    root = paths.run_path(workdir)
    numbered = sorted((int(m.group(1)), p) for p in root.iterdir()
                      if (m := _VERSION.match(p.name)))
    return [first] + [p for _, p in numbered]


def latest_config(workdir: str) -> dict | None:
    """The newest saved config of a run as plain JSON (None if it has none)."""
    versions = config_versions(workdir)
    return json.loads(paths.read_text(versions[-1])) if versions else None


def save_config(workdir: str, config: ml_collections.ConfigDict) -> Any:
    """Saves `config` as the run's first config.json, or as the next config.N.json when it
    differs from the newest saved one; returns the path written (None: unchanged)."""
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    versions = config_versions(workdir)
    if versions and paths.read_text(versions[-1]) == text:
        return None
    if versions:
        last = _VERSION.match(versions[-1].name)
        path = paths.join(workdir, f"config.{int(last.group(1)) + 1 if last else 1}.json")
    else:
        path = paths.join(workdir, ckpt_lib.CONFIG_FILE)
    paths.write_text(path, text)  # atomic: never half-written
    return path


_MISSING = object()


def _plain(config: ml_collections.ConfigDict) -> dict:
    """The config as JSON would store it (tuples as lists), for comparing with a saved one."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def _get(tree: dict, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return _MISSING
        tree = tree[key]
    return tree


def _show(value: Any) -> str:
    return json.dumps(value, sort_keys=True) if value is not _MISSING else "(unset)"
