"""Start a run from a pretrained model instead of random init (`train.init_from`).

  python -m effllm_jax.train --config=configs/smollm2_135m.py --workdir=runs/smollm2-p \
      --config.train.init_from=SmolLM2-135M-Instruct.Q4_1.gguf \
      --config.data.tokenizer.path=SmolLM2-135M-Instruct.Q4_1.gguf

`train.init_from` names a .gguf file, a Hugging Face directory, a compact export or a run
directory (its latest checkpoint). The model must have the run's shape (vocabulary, width,
layers, heads, KV heads, head width, FFN width, tied or not): that is checked from its metadata
when the config is validated, before any weight is read or anything compiles. A fresh run then
starts from its weights (and, for a pruned model, its kept units as the masks) with fresh Adam
moments; pruning-aware training prunes it from there. A resumed run reads only its checkpoint.

Its tokenizer, when it carries one, must be the run's (the same ids spelling the same strings),
so the data are tokenised as the model was trained: for a .gguf set `data.tokenizer.path` to it.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np

from effllm_jax import distill
from effllm_jax.arch import ArchSpec
from effllm_jax.model.llama import ModelConfig

SHAPE_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "ffn_dim", "tie_embeddings")


def enabled(config: ml_collections.ConfigDict) -> bool:
    """Whether the run starts from a pretrained model."""
    return bool(config.train.get("init_from", ""))


def _shape(cfg: ModelConfig) -> dict:
    return {k: getattr(cfg, k) for k in SHAPE_FIELDS}


def init_spec(config: ml_collections.ConfigDict, cfg: ModelConfig) -> ArchSpec:
    """The architecture of `train.init_from` (metadata only); refuses another model shape."""
    path = str(config.train.init_from)
    if not os.path.exists(path):
        raise ValueError(f"train.init_from={path}: no such file or directory")
    try:
        spec = distill._read_spec(os.path.abspath(path))  # the same readers as a path teacher
    except ValueError:
        raise
    except Exception as e:  # a directory that is none of the formats
        raise ValueError(f"train.init_from={path} is not a .gguf file, a Hugging Face or "
                         f"export directory or a run directory: {e}") from e
    theirs = _shape(distill.padded_config(spec, cfg))
    ours = _shape(cfg)
    if theirs != ours:
        diff = ", ".join(f"{k} {theirs[k]} vs {ours[k]}" for k in SHAPE_FIELDS
                         if theirs[k] != ours[k])
        raise ValueError(f"train.init_from={path} has another model shape than model.* "
                         f"({diff}); set the model section to its shape (e.g. "
                         f"configs/smollm2_135m.py for SmolLM2-135M)")
    return spec


def validate_config(config: ml_collections.ConfigDict, cfg: ModelConfig) -> None:
    """Raises ValueError naming a bad `train.init_from` (missing, or another shape)."""
    if not isinstance(config.train.get("init_from", ""), str):
        raise ValueError(f"train.init_from={config.train.init_from!r} must be a path or ''")
    if enabled(config):
        init_spec(config, cfg)


def load(config: ml_collections.ConfigDict, cfg: ModelConfig,
         tokenizer: Any = None) -> tuple[dict, dict] | None:
    """(params, masks) of `train.init_from` in the run's dense layout (host numpy), or None.

    With the run's `tokenizer` and one stored with the model, the two must agree token by token.
    """
    if not enabled(config):
        return None
    path = str(config.train.init_from)
    spec = init_spec(config, cfg)
    lm = distill.load_model_sharing_vocabulary(
        path, tokenizer, "train.init_from",
        "set data.tokenizer.path to the model's tokenizer (e.g. the .gguf itself)")
    return distill.padded_params(spec, lm.params, cfg)


def install(state: Any, loaded: tuple[dict, dict] | None, shardings: Any) -> Any:
    """The fresh state with the loaded params and masks in place (unchanged for None)."""
    if loaded is None:
        return state
    params, masks = loaded
    for name, new, old in (("params", params, state.params), ("masks", masks, state.masks)):
        expected = jax.tree.map(lambda a: a.shape, old)
        found = jax.tree.map(lambda a: np.shape(a), new)
        if expected != found:
            raise ValueError(f"train.init_from: the loaded {name} do not match the run's layout")
    params = jax.tree.map(lambda new, old: np.asarray(new, old.dtype), params, state.params)
    masks = jax.tree.map(lambda new, old: np.asarray(new, old.dtype), masks, state.masks)
    return state.replace(params=jax.device_put(params, shardings.params),
                         masks=jax.device_put(masks, shardings.masks))
