"""Perplexity and bits per byte of held-out text, with rolling (strided) windows.

Every token is predicted exactly once. The text is prefixed with the prefix token (BOS, else
EOS) so its first token is scored too, as the harness's loglikelihood_rolling does. A window
holds at most `max_length` tokens; consecutive windows advance by `stride` targets and only the
targets not yet scored count, so stride == max_length gives disjoint windows (the harness) and
a smaller stride gives every token more context (Hugging Face's strided perplexity).

`token_nll` is the pure, jittable core that training also uses for its eval loss.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from effllm_jax.losses import token_nll
from effllm_jax.evaluate.scoring import (DEFAULT_BATCH_SIZE, DEFAULT_MAX_LENGTH, prefix_token_id,
                                         score_windows)


def eval_loss(logits_fn: Callable[[jax.Array], jax.Array], batches: Sequence[np.ndarray]) -> float:
    """Mean next-token NLL over int token batches [B, T+1] (inputs [:, :-1], targets [:, 1:])."""
    total, count = 0.0, 0.0
    for batch in batches:
        batch = jnp.asarray(batch, jnp.int32)
        s, n = token_nll(logits_fn(batch[:, :-1]), batch[:, 1:])
        total, count = total + float(s), count + float(n)
    if count == 0:
        raise ValueError("eval_loss got no tokens")
    return total / count


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """Summed NLL (nats) of a text and what it means per token, byte and word."""

    nll: float
    num_tokens: int
    num_bytes: int
    num_words: int

    @property
    def loss(self) -> float:
        """Mean NLL per token (nats)."""
        return self.nll / max(self.num_tokens, 1)

    @property
    def perplexity(self) -> float:
        """Token-level perplexity exp(loss)."""
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        """NLL in bits per UTF-8 byte: tokenizer-independent, as the harness's bits_per_byte."""
        return self.nll / max(self.num_bytes, 1) / math.log(2)

    @property
    def byte_perplexity(self) -> float:
        """exp(NLL / bytes)."""
        return math.exp(self.nll / max(self.num_bytes, 1))

    @property
    def word_perplexity(self) -> float:
        """exp(NLL / words), words split on whitespace as the harness counts them."""
        return math.exp(self.nll / max(self.num_words, 1))

    def to_json(self) -> dict[str, float]:
        """All figures as a JSON-ready dict."""
        return {"nll": self.nll, "tokens": self.num_tokens, "bytes": self.num_bytes,
                "words": self.num_words, "loss": self.loss, "perplexity": self.perplexity,
                "bits_per_byte": self.bits_per_byte, "byte_perplexity": self.byte_perplexity,
                "word_perplexity": self.word_perplexity}


def rolling_windows(num_tokens: int, max_length: int, stride: int | None = None
                    ) -> list[tuple[int, int, int]]:
    """(start, end, first_scored) over the prefixed sequence x[0..num_tokens].

    A window feeds x[start:end] and predicts x[start+1:end+1]; targets x[t] with
    first_scored <= t <= end count, so each of x[1..num_tokens] is scored exactly once.
    """
    stride = max_length if stride is None else stride
    if not 0 < stride <= max_length:
        raise ValueError(f"stride must be in (0, max_length={max_length}], got {stride}")
    windows, scored = [], 0
    while scored < num_tokens:
        end = min(scored + stride, num_tokens)
        start = max(0, end - max_length)
        windows.append((start, end, scored + 1))
        scored = end
    return windows


def token_loglikelihood_rolling(lm: Any, token_ids: Sequence[int], *, prefix_id: int,
                                max_length: int = DEFAULT_MAX_LENGTH, stride: int | None = None,
                                batch_size: int = DEFAULT_BATCH_SIZE) -> float:
    """Sum of log p(token_i | prefix, tokens_<i) over all tokens, with rolling windows."""
    seq = [prefix_id] + list(token_ids)
    windows = [(seq[start:end], seq[start + 1:end + 1], end - first + 1)
               for start, end, first in rolling_windows(len(token_ids), max_length, stride)]
    return float(sum(ll for ll, _ in score_windows(lm, windows, max_length=max_length,
                                                     batch_size=batch_size)))


def perplexity(lm: Any, text: str, *, max_length: int = DEFAULT_MAX_LENGTH,
               stride: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE) -> PerplexityResult:
    """Perplexity / bits per byte of `text` under `lm` (its tokenizer encodes the text)."""
    tokenizer = lm.tokenizer
    if tokenizer is None:
        raise ValueError("the model has no tokenizer; perplexity of text needs one")
    ids = list(tokenizer.encode(text))
    if not ids:
        raise ValueError("the text encodes to no tokens")
    ll = token_loglikelihood_rolling(lm, ids, prefix_id=prefix_token_id(tokenizer),
                                     max_length=max_length, stride=stride, batch_size=batch_size)
    return PerplexityResult(nll=-ll, num_tokens=len(ids), num_bytes=len(text.encode("utf-8")),
                            num_words=len(re.split(r"\s+", text)))
