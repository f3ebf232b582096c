"""Log-likelihood scoring with lm-evaluation-harness conventions, batched and jitted.

Tokenisation follows the harness's HFLM: trailing spaces of the context move onto the
continuation, context+continuation is encoded whole and split at the length of the encoded
context; an empty context is replaced by the prefix token (BOS, else EOS). The model sees
(context + continuation)[-(max_length + 1):][:-1] (left truncation) and the continuation's
token log-probs are summed. acc = argmax of the sums; acc_norm divides each sum by the length
in characters of the harness's choice string first.

Requests are sorted by length, padded on the right (causal attention makes padding
invisible) to one of a few bucket lengths with a fixed batch size, so a model compiles at most
once per bucket.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from effllm_jax.evaluate.tasks import MultipleChoiceItem

# Padding lengths: one compilation each; steps of ~1.5x keep padding waste near 20%.
DEFAULT_BUCKETS = (32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
DEFAULT_MAX_LENGTH = 2048  # the harness's fallback when a model states no context length
DEFAULT_BATCH_SIZE = 16


def _valid_id(token_id: Any) -> bool:
    return token_id is not None and int(token_id) >= 0


def prefix_token_id(tokenizer: Any) -> int:
    """Token that stands in for an empty context: BOS when the tokenizer has one, else EOS."""
    for name in ("bos_id", "eos_id"):
        token_id = getattr(tokenizer, name, None)
        if _valid_id(token_id):
            return int(token_id)
    raise ValueError("the tokenizer has neither a BOS nor an EOS id to stand for an empty context")


def encode_pair(tokenizer: Any, context: str, continuation: str,
                add_bos: bool = False) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) exactly as the harness's HFLM._encode_pair splits them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if context == "":  # nothing to condition on: the prefix token stands in
        return [prefix_token_id(tokenizer)], list(tokenizer.encode(continuation))
    whole = list(tokenizer.encode(context + continuation))
    context_ids = list(tokenizer.encode(context))
    continuation_ids = whole[len(context_ids):]
    context_ids = whole[:len(context_ids)]
    if add_bos:
        context_ids = [prefix_token_id(tokenizer)] + context_ids
    return context_ids, continuation_ids


def _score_from_logits(logits: jax.Array, targets: jax.Array, weights: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
    """Per-row sum of weighted target log-probs, and whether every weighted target is argmax."""
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    logp = target_logit - jax.nn.logsumexp(logits, axis=-1)  # no [B, T, V] log-softmax kept
    greedy = (jnp.argmax(logits, axis=-1) == targets) | (weights == 0)
    return jnp.sum(logp * weights, axis=-1), jnp.all(greedy, axis=-1)


_score_jit = jax.jit(_score_from_logits)


@functools.lru_cache(maxsize=8)
def _fused_scorer(arch_json: str) -> Callable:
    """Jitted (params, tokens, targets, weights) -> (sums, greedy) for one architecture."""
    from effllm_jax.arch import ArchSpec
    from effllm_jax.model.compact import apply_compact

    spec = ArchSpec.from_json(arch_json)

    @jax.jit
    def fused(params, tokens, targets, weights):
        return _score_from_logits(apply_compact(spec, params, tokens), targets, weights)

    return fused


def make_batch_scorer(lm: Any) -> Callable[[np.ndarray, np.ndarray, np.ndarray],
                                           tuple[np.ndarray, np.ndarray]]:
    """(tokens, targets, weights) [B, T] -> (sum log-prob [B], greedy [B]) for this model.

    A real LanguageModel gets one fused jit per architecture (forward + gather; parameters are
    an argument, so a new model object of the same shape, e.g. each training eval, reuses the
    compilations); anything else with `.logits(tokens)` (test stubs) has its logits scored by a
    small jitted function.
    """
    from effllm_jax.model.lm import LanguageModel

    if isinstance(lm, LanguageModel):
        fused = _fused_scorer(lm.spec.shape_key())

        def scorer(tokens, targets, weights):
            return tuple(np.asarray(x) for x in fused(lm.params, tokens, targets, weights))
    else:
        def scorer(tokens, targets, weights):
            logits = jnp.asarray(lm.logits(np.asarray(tokens, np.int32)))
            return tuple(np.asarray(x) for x in _score_jit(logits, jnp.asarray(targets),
                                                          jnp.asarray(weights)))
    return scorer


def pick_bucket(length: int, buckets: Sequence[int], max_length: int) -> int:
    """Smallest bucket >= length (max_length when none is)."""
    for b in sorted(buckets):
        if length <= b <= max_length:
            return b
    return max_length


def score_token_requests(lm: Any, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                         max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = DEFAULT_BATCH_SIZE,
                         buckets: Sequence[int] = DEFAULT_BUCKETS,
                         progress: Callable[[int, int], None] | None = None
                         ) -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) of each continuation given its context, in request order."""
    scorer = make_batch_scorer(lm)
    prepared = []  # (input ids, targets, number of scored positions)
    keys_src = []
    for context_ids, continuation_ids in requests:
        whole = list(context_ids) + list(continuation_ids)
        n_cont = len(continuation_ids)
        if n_cont > max_length:
            raise ValueError(f"continuation of {n_cont} tokens exceeds max_length={max_length}")
        if len(context_ids) == 0:
            raise ValueError("empty context ids: encode_pair supplies a prefix token for these")
        window = whole[-(max_length + 1):]
        prepared.append((window[:-1], window[1:], n_cont))
        keys_src.append((tuple(window), n_cont))
    # Identical token requests (repeated questions, equal choices) run once.
    unique: dict[tuple, int] = {}
    keys = [unique.setdefault(key, len(unique)) for key in keys_src]
    firsts = {}
    for i, k in enumerate(keys):
        firsts.setdefault(k, i)
    order = sorted(firsts.values(), key=lambda i: -len(prepared[i][0]))  # longest first
    results: dict[int, tuple[float, bool]] = {}
    done = 0
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = pick_bucket(max(len(prepared[i][0]) for i in chunk), buckets, max_length)
        tokens = np.zeros((batch_size, width), np.int32)  # fixed batch: one shape per bucket
        targets = np.zeros((batch_size, width), np.int32)
        weights = np.zeros((batch_size, width), np.float32)
        for row, i in enumerate(chunk):
            inp, tgt, n_cont = prepared[i]
            tokens[row, :len(inp)] = inp
            targets[row, :len(tgt)] = tgt
            weights[row, len(inp) - n_cont:len(inp)] = 1.0
        sums, greedy = scorer(tokens, targets, weights)
        for row, i in enumerate(chunk):
            results[keys[i]] = (float(sums[row]), bool(greedy[row]))
        done += len(chunk)
        if progress is not None:
            progress(done, len(order))
    return [results[k] for k in keys]


def loglikelihoods(lm: Any, requests: Iterable[tuple[str, str]], *, add_bos: bool = False,
                   **kwargs: Any) -> list[tuple[float, bool]]:
    """Harness `loglikelihood`: (sum log p(continuation | context), is_greedy) per request."""
    tokenizer = lm.tokenizer
    if tokenizer is None:
        raise ValueError("the model has no tokenizer; text scoring needs one")
    encoded = [encode_pair(tokenizer, c, x, add_bos) for c, x in requests]
    return score_token_requests(lm, encoded, **kwargs)


def item_predictions(item: MultipleChoiceItem, lls: Sequence[float]) -> dict[str, int]:
    """acc / acc_norm predictions for one item from its per-choice log-likelihoods."""
    lls = np.asarray(lls, np.float64)
    lengths = np.array([max(len(c), 1) for c in item.choices], np.float64)  # chars, as the harness
    return {"acc": int(np.argmax(lls)), "acc_norm": int(np.argmax(lls / lengths))}


def score_items(lm: Any, items: Sequence[MultipleChoiceItem], *, add_bos: bool = False,
                return_details: bool = False, **kwargs: Any) -> dict[str, Any]:
    """acc and acc_norm (fractions) of a list of items, scored in one batched pass."""
    if not items:
        raise ValueError("no items to score")
    flat = [req for item in items for req in item.requests()]
    lls = loglikelihoods(lm, flat, add_bos=add_bos, **kwargs)
    correct = {"acc": 0, "acc_norm": 0}
    details = []
    pos = 0
    for item in items:
        item_lls = [ll for ll, _ in lls[pos:pos + len(item.choices)]]
        pos += len(item.choices)
        preds = item_predictions(item, item_lls)
        for metric, pred in preds.items():
            correct[metric] += int(pred == item.gold)
        if return_details:
            details.append({"loglikelihoods": item_lls, "gold": item.gold, **preds})
    n = len(items)
    out: dict[str, Any] = {"acc": correct["acc"] / n, "acc_norm": correct["acc_norm"] / n, "n": n,
                           "acc_stderr": _stderr(correct["acc"], n),
                           "acc_norm_stderr": _stderr(correct["acc_norm"], n)}
    if return_details:
        out["details"] = details
    return out


def _stderr(k: int, n: int) -> float:
    """Standard error of a mean of n 0/1 outcomes (sample std, as the harness)."""
    if n < 2:
        return float("nan")
    p = k / n
    return float(np.sqrt(p * (1 - p) * n / (n - 1) / n))
