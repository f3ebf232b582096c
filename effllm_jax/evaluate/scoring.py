"""Log-likelihood scoring with lm-evaluation-harness conventions, batched and jitted.

Tokenisation follows the harness's HFLM: trailing spaces of the context move onto the
continuation, context+continuation is encoded whole and split at the length of the encoded
context; an empty context is replaced by the prefix token (BOS, else EOS). The model sees
(context + continuation)[-(max_length + 1):][:-1] (left truncation) and the continuation's
token log-probs are summed. acc = argmax of the sums; acc_norm divides each sum by the length
in characters of the harness's choice string first.

Our models (LanguageModel, MaskedLanguageModel) are scored packed (`_score_packed`): the
requests of one context form a group, the context once and then each continuation's inputs,
each continuation attending to the context and itself (model/decode.py, packed scoring), so a
shared context runs once (2-4x fewer tokens on most multiple-choice tasks); groups whose
contexts share a prefix (WinoGrande's two options) merge, the prefix once. Groups are packed
first-fit into rows of ROW_WIDTH tokens (a longer group: a row of ROW_WIDTH x a power of two),
so padding is only each row's unused tail; batch_size x ROW_WIDTH tokens a batch (a power of
two of rows for the last one). Few shapes compile, and that matters for memory as well as
time: each compiled body keeps tens of MB of host memory (its trace and executable) for the
rest of the process. The body returns hidden states; the head unembeds only the scored
positions, HEAD_CHUNK at a time: no [B, T, V] logits.
Other scorers (test stubs with `.logits`) get one right-padded row per request, sorted by
length and padded to one of a few bucket lengths.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from effllm_jax.evaluate.tasks import MultipleChoiceItem

# Padding lengths: one compilation each; steps of ~1.5x keep padding waste near 20%.
DEFAULT_BUCKETS = (32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
DEFAULT_MAX_LENGTH = 2048  # the harness's fallback when a model states no context length
DEFAULT_BATCH_SIZE = 16
HEAD_CHUNK = 256  # scored positions unembedded at a time: at most [256, V] logits exist
ROW_WIDTH = 256  # tokens per packed row (a longer context group: ROW_WIDTH x a power of two)
MIN_SHARED_PREFIX = 4  # tokens two different contexts must share to be packed as one group


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


def make_batch_scorer(lm: Any) -> Callable[[np.ndarray, np.ndarray, np.ndarray],
                                           tuple[np.ndarray, np.ndarray]]:
    """(tokens, targets, weights) [B, T] -> (sum log-prob [B], greedy [B]) from `lm.logits`.

    The unpacked way, full [B, T, V] logits: for scorers that are not one of our models
    (test stubs), and as the reference the packed scorer is tested against.
    """
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
    """(log-likelihood, is_greedy) of each continuation given its context, in request order.

    Models the KV-cache decoder knows (LanguageModel, MaskedLanguageModel) are scored packed:
    each shared context runs once with all its continuations, and logits exist only at the
    scored positions. Anything else with `.logits(tokens)` is scored one row per request.
    """
    windows = []  # (input ids, target ids, number of scored positions), unique requests only
    unique: dict[tuple, int] = {}
    keys = []
    for context_ids, continuation_ids in requests:
        whole = list(context_ids) + list(continuation_ids)
        n_cont = len(continuation_ids)
        if n_cont > max_length:
            raise ValueError(f"continuation of {n_cont} tokens exceeds max_length={max_length}")
        if len(context_ids) == 0:
            raise ValueError("empty context ids: encode_pair supplies a prefix token for these")
        window = whole[-(max_length + 1):]
        key = (tuple(window), n_cont)  # identical token requests (repeated choices) run once
        if key not in unique:
            unique[key] = len(windows)
            windows.append((window[:-1], window[1:], n_cont))
        keys.append(unique[key])
    results = score_windows(lm, windows, max_length=max_length, batch_size=batch_size,
                            buckets=buckets, progress=progress)
    return [results[k] for k in keys]


def score_windows(lm: Any, windows: Sequence[tuple[Sequence[int], Sequence[int], int]], *,
                  max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = DEFAULT_BATCH_SIZE,
                  buckets: Sequence[int] = DEFAULT_BUCKETS,
                  progress: Callable[[int, int], None] | None = None) -> list[tuple[float, bool]]:
    """(sum log p, all greedy) of the last n targets of each (inputs, targets, n) window."""
    from effllm_jax.model.decode import can_decode

    score = _score_packed if can_decode(lm) else _score_rows
    return score(lm, windows, max_length=max_length, batch_size=batch_size, buckets=buckets,
                 progress=progress)


def _score_rows(lm: Any, windows: Sequence[tuple[list, list, int]], *, max_length: int,
                batch_size: int, buckets: Sequence[int],
                progress: Callable[[int, int], None] | None) -> list[tuple[float, bool]]:
    """One padded row per request through `lm.logits` (models without parameters to pack)."""
    scorer = make_batch_scorer(lm)
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))  # longest first
    results: list[tuple[float, bool]] = [(0.0, True)] * len(windows)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = pick_bucket(max(len(windows[i][0]) for i in chunk), buckets, max_length)
        tokens = np.zeros((batch_size, width), np.int32)  # fixed batch: one shape per bucket
        targets = np.zeros((batch_size, width), np.int32)
        weights = np.zeros((batch_size, width), np.float32)
        for row, i in enumerate(chunk):
            inp, tgt, n_cont = windows[i]
            tokens[row, :len(inp)] = inp
            targets[row, :len(tgt)] = tgt
            weights[row, len(inp) - n_cont:len(inp)] = 1.0
        sums, greedy = scorer(tokens, targets, weights)
        for row, i in enumerate(chunk):
            results[i] = (float(sums[row]), bool(greedy[row]))
        if progress is not None:
            progress(start + len(chunk), len(order))
    return results


class ContextGroup(NamedTuple):
    """One shared context followed by its continuations' inputs, and what to score in it."""

    tokens: list[int]
    positions: list[int]
    segments: list[int]  # 0 context, i > 0 the i-th continuation
    scored: list[tuple[int, int, int]]  # (request, column in the group, target id)


def context_groups(windows: Sequence[tuple[Sequence[int], Sequence[int], int]],
                   max_length: int) -> list[ContextGroup]:
    """Requests that share a prefix of their inputs as one group: that prefix once, then each
    request's remaining inputs, at most max_length tokens a group.

    First the requests of one context (the choices of one question) form a group; a context
    with more continuations than fit is repeated in another. Then, taken in the sorted order
    of their prefixes, neighbouring groups that share at least MIN_SHARED_PREFIX tokens merge
    when that saves tokens and the merged group fits a row (WinoGrande's two contexts
    differ only in the option at their end). A request's scored positions are then in the
    shared prefix or in its own segment.
    """
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, (inp, _, n_cont) in enumerate(windows):
        if n_cont:  # nothing to score: log-likelihood 0, greedy
            by_context.setdefault(tuple(inp[:len(inp) - n_cont + 1]), []).append(i)
    plans: list[list[int]] = []  # member requests of each group
    for members in by_context.values():
        plans.append([])
        for i in members:
            if _group_tokens(windows, plans[-1] + [i]) > max_length:
                plans.append([])
            plans[-1].append(i)
    merged: list[list[int]] = []
    for members in sorted(plans, key=lambda m: tuple(windows[m[0]][0])):
        if merged:
            both = merged[-1] + members
            size = _group_tokens(windows, both)
            if (_shared_length(windows, both) >= MIN_SHARED_PREFIX and size <= min(ROW_WIDTH, max_length)
                    and size < _group_tokens(windows, merged[-1])
                    + _group_tokens(windows, members)):
                merged[-1] = both
                continue
        merged.append(members)
    return [_group(windows, members) for members in merged]


def _shared_length(windows: Sequence[tuple[Sequence[int], Sequence[int], int]],
                   members: Sequence[int]) -> int:
    """Length of the longest prefix that the inputs of all `members` share."""
    inputs = [windows[i][0] for i in members]
    n = min(len(x) for x in inputs)
    first = inputs[0]
    for k in range(n):
        if any(x[k] != first[k] for x in inputs[1:]):
            return k
    return n


def _group_tokens(windows: Sequence[tuple[Sequence[int], Sequence[int], int]],
                  members: Sequence[int]) -> int:
    """Tokens of the group of `members`: their shared prefix once, then each one's rest."""
    if not members:
        return 0
    shared = _shared_length(windows, members)
    return shared + sum(len(windows[i][0]) - shared for i in members)


def _group(windows: Sequence[tuple[Sequence[int], Sequence[int], int]],
           members: Sequence[int]) -> ContextGroup:
    """The group of `members` sharing their first `shared` input tokens: the prefix, then one
    segment per member with its inputs after the prefix (RoPE positions going on from it)."""
    shared = _shared_length(windows, members)
    prefix = list(windows[members[0]][0][:shared])
    group = ContextGroup(prefix, list(range(shared)), [0] * shared, [])
    for segment, i in enumerate(members, start=1):
        inp, tgt, n_cont = windows[i]
        start = len(group.tokens) - shared  # column of input `shared` of this request
        group.scored.extend((i, k if k < shared else start + k, tgt[k])
                            for k in range(len(inp) - n_cont, len(inp)))
        group.tokens.extend(inp[shared:])
        group.positions.extend(range(shared, len(inp)))
        group.segments.extend([segment] * (len(inp) - shared))
    return group


def row_widths(max_length: int) -> tuple[int, ...]:
    """Widths a packed row may take: ROW_WIDTH, doubled up to max_length (the last one)."""
    widths = [ROW_WIDTH]
    while widths[-1] < max_length:
        widths.append(min(2 * widths[-1], max_length))
    return tuple(widths)


def pack_rows(groups: Sequence[ContextGroup], width: int, buckets: Sequence[int],
              max_length: int) -> list[tuple[int, list[ContextGroup]]]:
    """(row width, groups) rows, filled first-fit decreasing: rows are `width` tokens, or one
    bucket wide for a longer group, so padding is only what is left at the end of a row."""
    rows: list[tuple[int, list[ContextGroup]]] = []
    free: list[int] = []
    for group in sorted(groups, key=lambda g: -len(g.tokens)):
        n = len(group.tokens)
        for r, space in enumerate(free):
            if space >= n:
                rows[r][1].append(group)
                free[r] -= n
                break
        else:
            row_width = max(width, pick_bucket(n, buckets, max_length))
            rows.append((row_width, [group]))
            free.append(row_width - n)
    return rows


def packed_batches(windows: Sequence[tuple[Sequence[int], Sequence[int], int]], max_length: int,
                   batch_size: int) -> list[tuple[tuple[int, int], list[list[ContextGroup]]]]:
    """The batches `_score_packed` runs, widest first: ((rows, width), rows of groups).

    batch_size rows of ROW_WIDTH tokens a batch, or as many tokens in fewer, wider rows; the
    last batch of a width has a power of two of rows. So few shapes compile: with the widths
    doubling, one or two per width.
    """
    by_width: dict[int, list[list[ContextGroup]]] = {}
    for width, row in pack_rows(context_groups(windows, max_length), ROW_WIDTH,
                                row_widths(max_length), max_length):
        by_width.setdefault(width, []).append(row)
    batches = []
    for width, rows in sorted(by_width.items(), reverse=True):
        per_batch = max(1, batch_size * ROW_WIDTH // width)
        for start in range(0, len(rows), per_batch):
            batch = rows[start:start + per_batch]
            batches.append(((min(per_batch, 1 << (len(batch) - 1).bit_length()), width), batch))
    return batches


def _score_packed(lm: Any, windows: Sequence[tuple[list, list, int]], *, max_length: int,
                  batch_size: int, buckets: Sequence[int],
                  progress: Callable[[int, int], None] | None) -> list[tuple[float, bool]]:
    """The `packed_batches` of the windows through the body, logits only at the scored
    positions. (`buckets` pads unpacked rows only: packed rows take `row_widths`.)"""
    from effllm_jax.model.decode import model_program_key, packed_scoring_programs

    kind, key, params, masks, _ = model_program_key(lm)
    hidden_fn, score_fn = packed_scoring_programs(kind, key, HEAD_CHUNK)
    sums = np.zeros(len(windows), np.float64)
    greedy = np.ones(len(windows), bool)  # an empty continuation: 0 and greedy
    done = sum(n_cont == 0 for _, _, n_cont in windows)
    for shape, batch in packed_batches(windows, max_length, batch_size):
        arrays = _batch_arrays(batch, shape)
        scored = arrays.pop("scored")
        n = max(16, 1 << (len(scored) - 1).bit_length())  # few head shapes
        index = np.zeros((3, n), np.int32)  # row, column, target; padding scores (0, 0)
        index[:, :len(scored)] = scored[:, 1:].T
        x = hidden_fn(params, masks, **arrays)
        logp, is_max = (np.asarray(a)[:len(scored)]
                        for a in score_fn(params, masks, x, *index))
        np.add.at(sums, scored[:, 0], logp.astype(np.float64))
        np.logical_and.at(greedy, scored[:, 0], is_max)
        done += len(np.unique(scored[:, 0]))
        if progress is not None:
            progress(done, len(windows))
    return [(float(v), bool(g)) for v, g in zip(sums, greedy)]


def _batch_arrays(batch: Sequence[Sequence[ContextGroup]], shape: tuple[int, int]) -> dict:
    """tokens, positions, documents (-1: padding), segments [rows, width] of a batch, and
    its scored entries as an int array of (request, row, column, target)."""
    tokens, positions = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    documents, segments = np.full(shape, -1, np.int32), np.zeros(shape, np.int32)
    scored = []
    for r, row in enumerate(batch):
        start = 0
        for d, group in enumerate(row):
            end = start + len(group.tokens)
            tokens[r, start:end] = group.tokens
            positions[r, start:end] = group.positions
            documents[r, start:end] = d
            segments[r, start:end] = group.segments
            scored.extend((i, r, start + col, t) for i, col, t in group.scored)
            start = end
    return dict(tokens=tokens, positions=positions, documents=documents, segments=segments,
                scored=np.asarray(scored, np.int64).reshape(-1, 4))


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
