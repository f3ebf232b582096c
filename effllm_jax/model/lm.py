"""A ready-to-score language model: compact parameters + tokenizer + a jitted forward.

Export, import (HF, GGUF), generation and evaluation all meet at this one type. `max_length`
is the context length the source states (GGUF `llama.context_length`, HF
`max_position_embeddings`), carried from import to export and used by evaluation.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from effllm_jax.arch import ArchSpec
from effllm_jax.model import llama
from effllm_jax.model.compact import apply_compact


@functools.lru_cache(maxsize=32)
def _jitted_forward(spec_json: str):
    """One jitted forward per architecture, shared by every model of that shape."""
    return jax.jit(functools.partial(apply_compact, ArchSpec.from_json(spec_json)))


@dataclasses.dataclass
class LanguageModel:
    """Compact parameters with their architecture and (optionally) their tokenizer."""

    spec: ArchSpec
    params: dict
    tokenizer: Any = None  # .encode(str) -> list[int], .decode(list[int]) -> str, .eos_id, .bos_id
    max_length: int | None = None  # context length the source states (GGUF/HF), if any

    def __post_init__(self):
        self.params = jax.tree.map(jnp.asarray, self.params)
        self._forward = _jitted_forward(self.spec.shape_key())

    @property
    def vocab_size(self) -> int:
        return self.spec.model_config.vocab_size

    def logits(self, tokens: Any) -> jax.Array:
        """float32 logits [B, T, V] for int tokens [B, T] (one compilation per shape)."""
        return self._forward(self.params, jnp.asarray(tokens, jnp.int32))

    def log_probs(self, tokens: Any) -> np.ndarray:
        """log p(tokens[:, t+1] | tokens[:, :t+1]) as numpy [B, T-1]."""
        tokens = np.asarray(tokens, np.int32)
        logp = jax.nn.log_softmax(self.logits(tokens[:, :-1]), axis=-1)
        return np.asarray(jnp.take_along_axis(logp, jnp.asarray(tokens[:, 1:, None]), -1)[..., 0])


@functools.lru_cache(maxsize=8)
def _jitted_masked_forward(cfg: llama.ModelConfig):
    """Masks are arguments, so a model that keeps being pruned never recompiles."""
    return jax.jit(lambda params, masks, tokens: llama.apply(cfg, params, tokens, masks))


@dataclasses.dataclass
class MaskedLanguageModel:
    """The masked source model as a scorer (evaluation during training, no slicing)."""

    cfg: llama.ModelConfig
    params: dict
    masks: dict
    tokenizer: Any = None
    max_length: int | None = None  # context length (training: the window length)

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    def logits(self, tokens: Any) -> jax.Array:
        """float32 logits [B, T, V] for int tokens [B, T]."""
        return _jitted_masked_forward(self.cfg)(self.params, self.masks,
                                                jnp.asarray(tokens, jnp.int32))
