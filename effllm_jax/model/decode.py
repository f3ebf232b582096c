"""KV-cached decoding: one jitted prefill, then a jitted decode loop over a preallocated cache.

Works for the compact model (`LanguageModel`) and the masked source (`MaskedLanguageModel`),
reusing their own blocks (norms, MLP, attention weights) rather than a second implementation;
only attention is re-expressed here, to read and write the cache.

Batched prompts are left-padded to one length P, so every row writes the same cache slot at
each step. Each row's RoPE positions start at 0 on its first real token and its padding slots
are masked out of attention, so a padded row computes exactly what it computes alone.
The cache holds K/V per layer ([B, S, kv_heads_l, head_dim], layers may differ in KV heads).

The decode loop is a `lax.while_loop` that stops when every row has hit EOS or `stop` steps
were taken; the host calls it in chunks, so it can check stop strings between chunks.
Sampling: greedy (temperature 0) or temperature with top-k and top-p, all traced, so greedy and
sampling share one compilation. Each row draws from its own key (fold_in of the row index), so
its samples do not depend on what else is in the batch.

The same pieces also score packed rows for evaluation (`packed_scoring_programs`, at the end):
several contexts per row, each followed by its continuations, logits only where scored.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effllm_jax.arch import ArchSpec
from effllm_jax.model import llama
from effllm_jax.model.compact import CompactLlama

_NEG = jnp.finfo(jnp.float32).min


class Cache(NamedTuple):
    """Per-layer K/V buffers and the row facts the decode loop needs."""

    keys: tuple[jax.Array, ...]  # [B, S, kv_heads_l, head_dim] per layer
    values: tuple[jax.Array, ...]
    pad: jax.Array  # [B] left-padding slots of each row


class Sampling(NamedTuple):
    """Traced sampling settings (temperature 0 = greedy)."""

    temperature: jax.Array  # f32 []
    top_k: jax.Array  # i32 [], 1..V (V = no top-k)
    top_p: jax.Array  # f32 [], (0, 1] (1 = no top-p)


# ---------------------------------------------------------------------------- the model ---

@functools.lru_cache(maxsize=None)
def _compact_graph(spec_json: str):
    spec = ArchSpec.from_json(spec_json)
    return nnx.split(nnx.eval_shape(lambda: CompactLlama(spec, rngs=nnx.Rngs(0))))


@functools.lru_cache(maxsize=None)
def _masked_graph(cfg: llama.ModelConfig):
    return nnx.split(nnx.eval_shape(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0))))


class _Layer(NamedTuple):
    block: Any  # model.llama.Block
    kv_index: np.ndarray
    head_mask: jax.Array | None
    ffn_mask: jax.Array | None


class _Model(NamedTuple):
    cfg: llama.ModelConfig
    embed: jax.Array
    lm_head: jax.Array | None
    final_norm: Any
    layers: tuple[_Layer, ...]
    hidden: jax.Array | None  # float hidden mask (masked model only)


def _merge(graph, params):
    graphdef, abstract = graph
    state = jax.tree.map(lambda x: x, abstract)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def _build(kind: str, key: Any, params: dict, masks: dict | None) -> _Model:
    """The model's own modules, merged with `params` (inside jit)."""
    if kind == "compact":
        model = _merge(_compact_graph(key), params)
        spec = ArchSpec.from_json(key)
        layers = tuple(_Layer(b, np.asarray(l.kv_index, np.int32), None, None)
                       for b, l in zip(model.layers, spec.layers))
        hidden = None
    else:
        cfg = key
        model = _merge(_masked_graph(cfg), params)
        graphdef, stacked = nnx.split(model.layers)
        kv_index = np.arange(cfg.num_heads, dtype=np.int32) // cfg.group_size
        layers = tuple(_Layer(nnx.merge(graphdef, jax.tree.map(lambda a: a[i], stacked)),
                              kv_index, masks["heads"][i], masks["ffn"][i])
                       for i in range(cfg.num_layers))
        hidden = masks["hidden"].astype(jnp.float32)
    cfg = model.cfg
    lm_head = None if cfg.tie_embeddings else model.lm_head[...]
    return _Model(cfg, model.embed[...], lm_head, model.final_norm, layers, hidden)


def _rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """llama.apply_rope with per-row tables cos/sin [B, T, head_dim/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def _attention(layer: _Layer, x, cos, sin, keys, values, valid):
    """Attention of x [B, T, D] over keys/values [B, S, kv, hd] where valid [B, T, S]."""
    attn, dtype = layer.block.attn, x.dtype
    q = jnp.einsum("btd,dhk->bthk", x, attn.wq[...].astype(dtype))
    q = _rope(q, cos, sin)
    k = jnp.take(keys, layer.kv_index, axis=2)
    v = jnp.take(values, layer.kv_index, axis=2)
    scores = jnp.einsum("bthk,bshk->bhts", q, k, preferred_element_type=jnp.float32)
    scores = scores / np.sqrt(q.shape[-1]).astype(np.float32)
    scores = jnp.where(valid[:, None], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bhts,bshk->bthk", probs, v)
    if layer.head_mask is not None:
        out = out * layer.head_mask.astype(dtype)[None, None, :, None]
    return jnp.einsum("bthk,hkd->btd", out, attn.wo[...].astype(dtype))


def _new_kv(layer: _Layer, h, cos, sin):
    attn, dtype = layer.block.attn, h.dtype
    k = jnp.einsum("btd,dhk->bthk", h, attn.wk[...].astype(dtype))
    v = jnp.einsum("btd,dhk->bthk", h, attn.wv[...].astype(dtype))
    return _rope(k, cos, sin), v


def _run(model: _Model, tokens, positions, cache: Cache, slot, attend_to_cache: bool):
    """Layers over tokens [B, T] written at cache slots [slot, slot+T) -> (last hidden, cache).

    attend_to_cache=False (prefill) attends over the new tokens alone (exactly the full
    forward's shapes); True (decode) attends over the whole cache.
    """
    cfg, dtype = model.cfg, model.cfg.compute_dtype
    cos_t, sin_t = (jnp.asarray(t) for t in llama.rope_tables(cache.keys[0].shape[1],
                                                              cfg.head_dim, cfg.rope_theta))
    cos, sin = cos_t[positions], sin_t[positions]
    x = llama.embed_tokens(model.embed, tokens, dtype)
    if model.hidden is not None:
        x = x * model.hidden.astype(dtype)
    T = tokens.shape[1]
    query_slot = slot + jnp.arange(T)
    if attend_to_cache:
        key_slot = jnp.arange(cache.keys[0].shape[1])
    else:
        key_slot = slot + jnp.arange(T)
    valid = ((key_slot[None, None, :] <= query_slot[None, :, None])
             & (key_slot[None, None, :] >= cache.pad[:, None, None]))
    keys, values = [], []
    for layer, ck, cv in zip(model.layers, cache.keys, cache.values):
        h = layer.block.attn_norm(x, model.hidden)
        k, v = _new_kv(layer, h, cos, sin)
        ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, slot, 0, 0))
        cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, slot, 0, 0))
        if attend_to_cache:
            x = x + _attention(layer, h, cos, sin, ck, cv, valid)
        else:
            x = x + _attention(layer, h, cos, sin, k, v, valid)
        x = x + layer.block.mlp(layer.block.mlp_norm(x, model.hidden), layer.ffn_mask)
        keys.append(ck)
        values.append(cv)
    return x[:, -1:], Cache(tuple(keys), tuple(values), cache.pad)


def _logits(model: _Model, x) -> jax.Array:
    x = model.final_norm(x, model.hidden)
    return llama.unembed(x, model.embed, model.lm_head)[:, 0]


# ------------------------------------------------------------------------------ sampling ---

def _sample(logits: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
    """A top-k/top-p filtered sample at temperature s.temperature, one key per row."""
    scaled = logits / jnp.maximum(s.temperature, 1e-6)
    ordered = -jnp.sort(-scaled, axis=-1)  # descending
    kth = jnp.take(ordered, s.top_k - 1, axis=-1)[:, None]
    ordered = jnp.where(ordered < kth, -jnp.inf, ordered)
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly ahead of each token
    keep = (before < s.top_p) | (jnp.arange(ordered.shape[-1]) == 0)
    cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    filtered = jnp.where(scaled < jnp.maximum(kth, cutoff), -jnp.inf, scaled)
    keys = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(logits.shape[0]))
    return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)


def choose(logits: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
    """Next token [B] from logits [B, V]: argmax, or a top-k/top-p filtered sample.

    A cond, so greedy decoding never pays for the vocabulary sort.
    """
    return jax.lax.cond(s.temperature > 0, _sample,
                        lambda logits, *_: jnp.argmax(logits, axis=-1).astype(jnp.int32),
                        logits, key, s)


# ----------------------------------------------------------------------- jitted programs ---

def empty_cache(cfg: llama.ModelConfig, kv_heads: tuple[int, ...], batch: int, length: int,
                pad: Any) -> Cache:
    """Zeroed K/V buffers of `length` slots in the compute dtype."""
    dtype = cfg.compute_dtype
    shape = lambda n: (batch, length, n, cfg.head_dim)  # noqa: E731
    return Cache(tuple(jnp.zeros(shape(n), dtype) for n in kv_heads),
                 tuple(jnp.zeros(shape(n), dtype) for n in kv_heads),
                 jnp.asarray(pad, jnp.int32))


@functools.lru_cache(maxsize=32)
def _programs(kind: str, key: Any):
    """(prefill, decode) jitted for one architecture; shapes retrace as usual."""

    @functools.partial(jax.jit, donate_argnums=(3,))
    def prefill(params, masks, tokens, cache: Cache):
        model = _build(kind, key, params, masks)
        positions = jnp.maximum(jnp.arange(tokens.shape[1])[None] - cache.pad[:, None], 0)
        x, cache = _run(model, tokens, positions, cache, 0, attend_to_cache=False)
        return _logits(model, x), cache

    @functools.partial(jax.jit, donate_argnums=(2, 3))
    def decode(params, masks, cache: Cache, state, sampling: Sampling, prompt_len, stop, eos,
               base_key):
        """Runs steps [state.step, stop) unless every row is done: state -> state."""
        model = _build(kind, key, params, masks)

        def cond(carry):
            st, _ = carry
            return (st["step"] < stop) & ~jnp.all(st["done"])

        def body(carry):
            st, cache = carry
            i = st["step"]
            token = choose(st["logits"], jax.random.fold_in(base_key, i), sampling)
            token = jnp.where(st["done"], -1, token)
            hit_eos = (token == eos) & (eos >= 0)
            out = jax.lax.dynamic_update_slice(st["tokens"], token[:, None], (0, i))
            slot = prompt_len + i
            positions = (slot - cache.pad)[:, None]
            x, cache = _run(model, jnp.maximum(token, 0)[:, None], positions, cache, slot,
                            attend_to_cache=True)
            return dict(step=i + 1, tokens=out, done=st["done"] | hit_eos,
                        logits=_logits(model, x)), cache

        return jax.lax.while_loop(cond, body, (state, cache))

    return prefill, decode


def model_program_key(lm: Any) -> tuple[str, Any, dict, dict | None, tuple[int, ...]]:
    """(kind, cache key, params, masks, per-layer KV heads) of a decodable model."""
    from effllm_jax.model.lm import LanguageModel, MaskedLanguageModel

    if isinstance(lm, LanguageModel):
        return ("compact", lm.spec.shape_key(), lm.params, None,
                tuple(l.num_kv_heads for l in lm.spec.layers))
    if isinstance(lm, MaskedLanguageModel):
        cfg = lm.cfg
        return "masked", cfg, lm.params, lm.masks, (cfg.num_kv_heads,) * cfg.num_layers
    raise TypeError(f"{type(lm).__name__} cannot be decoded with a KV cache (expected a "
                    "LanguageModel or MaskedLanguageModel)")


def can_decode(lm: Any) -> bool:
    """True for the model types the cached decoder handles."""
    try:
        model_program_key(lm)
        return True
    except TypeError:
        return False


def bucket(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum): padded lengths, so compilations stay few."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


class Decoder:
    """One batch of left-padded prompts in a preallocated cache, decoded chunk by chunk."""

    def __init__(self, lm: Any, rows: list[list[int]], max_new_tokens: int, *,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0,
                 seed: int = 0, eos_id: int | None = None, min_bucket: int = 16):
        kind, key, self.params, self.masks, kv_heads = model_program_key(lm)
        cfg = lm.spec.model_config if kind == "compact" else lm.cfg
        vocab = cfg.vocab_size
        if top_k is not None and not 1 <= top_k <= vocab:
            raise ValueError(f"top_k={top_k} must lie in [1, {vocab}]")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p={top_p} must lie in (0, 1]")
        if temperature < 0:
            raise ValueError(f"temperature={temperature} must be >= 0")
        if not rows or any(len(r) == 0 for r in rows):
            raise ValueError("an empty prompt has no position to continue from")
        self.prefill, self.decode = _programs(kind, key)
        lengths = np.asarray([len(r) for r in rows])
        self.prompt_len = bucket(lengths.max(), min_bucket)
        self.max_new_tokens = int(max_new_tokens)
        total = bucket(self.prompt_len + self.max_new_tokens, min_bucket)
        tokens = np.zeros((len(rows), self.prompt_len), np.int32)
        for b, r in enumerate(rows):
            tokens[b, self.prompt_len - len(r):] = r
        pad = self.prompt_len - lengths
        self.sampling = Sampling(jnp.float32(temperature),
                                 jnp.int32(vocab if top_k is None else top_k),
                                 jnp.float32(top_p))
        self.eos = jnp.int32(-1 if eos_id is None else eos_id)
        self.key = jax.random.key(seed)
        cache = empty_cache(cfg, kv_heads, len(rows), total, pad)
        logits, self.cache = self.prefill(self.params, self.masks, jnp.asarray(tokens), cache)
        self.state = dict(step=jnp.int32(0),
                          tokens=jnp.full((len(rows), total - self.prompt_len), -1, jnp.int32),
                          done=jnp.zeros(len(rows), bool), logits=logits)

    def run(self, steps: int | None = None) -> np.ndarray:
        """Decodes up to `steps` more tokens (all remaining by default) -> tokens so far [B, N].

        Finished rows hold -1 after their last token (EOS included when it was produced).
        """
        step = int(self.state["step"])
        stop = self.max_new_tokens if steps is None else min(self.max_new_tokens, step + steps)
        self.state, self.cache = self.decode(self.params, self.masks, self.cache, self.state,
                                             self.sampling, jnp.int32(self.prompt_len),
                                             jnp.int32(stop), self.eos, self.key)
        return np.asarray(self.state["tokens"])[:, :int(self.state["step"])]

    def finish(self, rows: Any) -> None:
        """Marks rows done (e.g. a stop string was found) so the loop stops early."""
        done = np.asarray(self.state["done"]).copy()
        done[np.asarray(rows, int)] = True
        self.state = dict(self.state, done=jnp.asarray(done))

    @property
    def all_done(self) -> bool:
        return bool(np.all(np.asarray(self.state["done"]))) or \
            int(self.state["step"]) >= self.max_new_tokens


# ------------------------------------------------------------------------ packed scoring ---
# Scoring (evaluation) packs several documents into a row, each one shared context and its
# continuations: segment 0 is the context (or the prefix its requests share), segment i > 0
# the i-th request's inputs after it, which see their document's context and themselves
# (never another continuation or document) and take RoPE positions that go on from the
# context's end, so each continuation computes what it would after its context alone.
# Padding has document -1. Rows attend in blocks of QUERY_BLOCK queries (at most
# MAX_QUERY_BLOCKS, longer ones for a wider row), each over the keys before its end only
# (causal), so a wide row skips about half the attention (3/8 with four blocks).

QUERY_BLOCK = 128  # packed rows attend in blocks of queries, each over the keys up to its end
MAX_QUERY_BLOCKS = 4  # a program grows with blocks x layers: an 8192-wide row stays 4 blocks


def packed_attention_mask(documents: jax.Array, segments: jax.Array) -> jax.Array:
    """valid [B, T, T]: causal, same document, and the key is the context or the query's own
    continuation."""
    t = jnp.arange(segments.shape[1])
    causal = t[None, :, None] >= t[None, None, :]
    same_doc = documents[:, :, None] == documents[:, None, :]
    seg_q, seg_k = segments[:, :, None], segments[:, None, :]
    return causal & same_doc & ((seg_k == 0) | (seg_k == seg_q))


def _packed_hidden(model: _Model, tokens, positions, documents, segments) -> jax.Array:
    """Hidden states [B, T, D] before the final norm (which runs at scored positions only)."""
    cfg, dtype = model.cfg, model.cfg.compute_dtype
    cos_t, sin_t = llama.rope_tables(tokens.shape[1], cfg.head_dim, cfg.rope_theta)
    cos, sin = cos_t[positions], sin_t[positions]
    valid = packed_attention_mask(documents, segments)
    x = llama.embed_tokens(model.embed, tokens, dtype)
    if model.hidden is not None:
        x = x * model.hidden.astype(dtype)
    width = tokens.shape[1]
    block = max(QUERY_BLOCK, -(-width // MAX_QUERY_BLOCKS))
    blocks = [(q, min(q + block, width)) for q in range(0, width, block)]
    for layer in model.layers:
        h = layer.block.attn_norm(x, model.hidden)
        x = x + _packed_attention(layer, h, cos, sin, valid, blocks)
        x = x + layer.block.mlp(layer.block.mlp_norm(x, model.hidden), layer.ffn_mask)
    return x


def _packed_attention(layer: _Layer, h, cos, sin, valid, blocks) -> jax.Array:
    """`_attention` of a whole packed row, its queries in causal blocks: the projections,
    RoPE and GQA expansion run once for the row and only the scores go block by block, so a
    block adds a few ops (a program's compile time, and the host memory its cached trace and
    executable keep, grow with blocks x layers)."""
    attn, dtype = layer.block.attn, h.dtype
    q = _rope(jnp.einsum("btd,dhk->bthk", h, attn.wq[...].astype(dtype)), cos, sin)
    k, v = _new_kv(layer, h, cos, sin)
    k, v = jnp.take(k, layer.kv_index, axis=2), jnp.take(v, layer.kv_index, axis=2)
    scale = np.sqrt(q.shape[-1]).astype(np.float32)
    out = []
    for a, b in blocks:  # causal: a block of queries needs only the keys up to its end
        scores = jnp.einsum("bthk,bshk->bhts", q[:, a:b], k[:, :b],
                            preferred_element_type=jnp.float32) / scale
        scores = jnp.where(valid[:, None, a:b, :b], scores, _NEG)
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
        out.append(jnp.einsum("bhts,bshk->bthk", probs, v[:, :b]))
    out = out[0] if len(out) == 1 else jnp.concatenate(out, axis=1)
    if layer.head_mask is not None:
        out = out * layer.head_mask.astype(dtype)[None, None, :, None]
    return jnp.einsum("bthk,hkd->btd", out, attn.wo[...].astype(dtype))


def _scored_logprobs(model: _Model, h, targets, chunk: int):
    """log p(target) and argmax == target of hidden rows h [N, D], `chunk` rows of logits at a
    time, so no more than [chunk, V] logits ever exist."""
    h = model.final_norm(h, model.hidden)

    def one(args):
        hc, tc = args
        logits = llama.unembed(hc[None], model.embed, model.lm_head)[0]  # [chunk, V] float32
        target_logit = jnp.take_along_axis(logits, tc[:, None], -1)[:, 0]
        return (target_logit - jax.nn.logsumexp(logits, axis=-1),
                jnp.argmax(logits, axis=-1) == tc)

    n = h.shape[0]
    logp, greedy = jax.lax.map(one, (h.reshape(n // chunk, chunk, -1),
                                     targets.reshape(n // chunk, chunk)))
    return logp.reshape(n), greedy.reshape(n)


@functools.lru_cache(maxsize=32)
def packed_scoring_programs(kind: str, key: Any, head_chunk: int):
    """(hidden, score) jitted for one architecture.

    hidden(params, masks, tokens, positions, documents, segments) -> hidden states [B, T, D];
    score(params, masks, hidden, rows, cols, targets) -> (log p, is argmax) [N] at the N
    scored (row, col) positions. Apart, the body compiles once per row shape and the cheap
    head once per N.
    """

    @jax.jit
    def hidden(params, masks, tokens, positions, documents, segments):
        return _packed_hidden(_build(kind, key, params, masks), tokens, positions, documents,
                              segments)

    @jax.jit
    def score(params, masks, x, rows, cols, targets):
        model = _build(kind, key, params, masks)
        return _scored_logprobs(model, x[rows, cols], targets,
                                min(head_chunk, targets.shape[0]))

    return hidden, score
