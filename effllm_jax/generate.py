"""Text generation over a LanguageModel: greedy or temperature (top-k) sampling.

No KV cache: each step reruns the causal forward over the sequence padded to a power-of-two
length bucket (>= 32), so a generation compiles once per bucket, not once per token. Right
padding is harmless under causal attention; only the last real position is unembedded.
CLI: python -m effllm_jax.generate --model=PATH --prompt="..." [--max_new_tokens=32]
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from effllm_jax.arch import ArchSpec
from effllm_jax.model.compact import apply_compact
from effllm_jax.model.lm import LanguageModel


@dataclasses.dataclass
class Generation:
    """New tokens of one prompt (EOS excluded), their text, and whether EOS ended them."""

    tokens: list[int]
    text: str | None
    stopped_at_eos: bool


def bucket_length(n: int, min_bucket: int = 32) -> int:
    """Smallest power of two >= max(n, min_bucket)."""
    return max(min_bucket, 1 << max(0, int(n) - 1).bit_length())


@functools.lru_cache(maxsize=16)
def _step_fn(spec_json: str):
    """Jitted (params, tokens [B,T], pos [B], key, temperature, top_k) -> (next [B], logits [B,V]).

    temperature and top_k are traced, so greedy and sampling share one compilation.
    """
    spec = ArchSpec.from_json(spec_json)

    @jax.jit
    def step(params, tokens, pos, key, temperature, top_k):
        logits = apply_compact(spec, params, tokens, pos)[:, 0]  # only the last real position
        scaled = logits / jnp.maximum(temperature, 1e-6)
        kth = jnp.sort(scaled, axis=-1)[:, scaled.shape[-1] - top_k][:, None]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
        # one key per row, so a row's samples do not depend on what else is in the batch
        keys = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(tokens.shape[0]))
        sampled = jax.vmap(jax.random.categorical)(keys, scaled)
        return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)), logits

    return step


def next_token_logits(lm: LanguageModel, tokens: Sequence[Sequence[int]]) -> np.ndarray:
    """Logits [B, V] of the token after each (unpadded) row, via the bucketed forward."""
    lengths = np.asarray([len(t) for t in tokens])
    buf = np.zeros((len(tokens), bucket_length(lengths.max())), np.int32)
    for b, row in enumerate(tokens):
        buf[b, :len(row)] = row
    step = _step_fn(lm.spec.shape_key())
    _, logits = step(lm.params, buf, jnp.asarray(lengths - 1, jnp.int32), jax.random.key(0),
                     jnp.float32(0.0), jnp.int32(1))
    return np.asarray(logits)


def generate_batch(lm: LanguageModel, prompts: Sequence[str | Sequence[int]], *,
                   max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
                   seed: int = 0, eos_id: int | None = None, stop_at_eos: bool = True,
                   add_bos: bool = False, min_bucket: int = 32) -> list[Generation]:
    """Continues each prompt (text needs lm.tokenizer; token lists do not)."""
    tok = lm.tokenizer
    rows = []
    for p in prompts:
        if isinstance(p, str):
            if tok is None:
                raise ValueError("text prompts need a tokenizer; this model has none")
            ids = list(tok.encode(p))
        else:
            ids = [int(i) for i in p]
        if add_bos:
            if tok is None or tok.bos_id is None:
                raise ValueError("add_bos=True but the tokenizer has no BOS id")
            ids = [tok.bos_id] + ids
        if not ids:
            raise ValueError("an empty prompt has no position to continue from")
        rows.append(ids)
    if eos_id is None and tok is not None:
        eos_id = tok.eos_id
    step = _step_fn(lm.spec.shape_key())
    vocab = lm.spec.model_config.vocab_size
    if top_k is not None and not 1 <= top_k <= vocab:
        raise ValueError(f"top_k={top_k} must lie in [1, {vocab}]")
    k = jnp.int32(vocab if top_k is None else top_k)
    lengths = np.asarray([len(r) for r in rows])
    new: list[list[int]] = [[] for _ in rows]
    done = np.zeros(len(rows), bool)
    buf = np.zeros((len(rows), bucket_length(lengths.max() + max_new_tokens, min_bucket)), np.int32)
    for b, r in enumerate(rows):
        buf[b, :len(r)] = r
    key = jax.random.key(seed)
    for i in range(max_new_tokens):
        width = bucket_length(lengths.max(), min_bucket)  # grows with the sequence
        nxt, _ = step(lm.params, buf[:, :width], jnp.asarray(lengths - 1, jnp.int32),
                      jax.random.fold_in(key, i), jnp.float32(temperature), k)
        nxt = np.asarray(nxt)
        for b in np.flatnonzero(~done):
            token = int(nxt[b])
            if stop_at_eos and eos_id is not None and token == eos_id:
                done[b] = True
                continue
            new[b].append(token)
            buf[b, lengths[b]] = token
            lengths[b] += 1
        if done.all():
            break
    return [Generation(t, tok.decode(t) if tok is not None else None, bool(d))
            for t, d in zip(new, done)]


def generate(lm: LanguageModel, prompt: str | Sequence[int], **kwargs) -> Generation:
    """Continues one prompt; see `generate_batch` for the options."""
    return generate_batch(lm, [prompt], **kwargs)[0]


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m effllm_jax.generate")
    parser.add_argument("--model", required=True, help="workdir, export dir, HF dir or .gguf")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--add_bos", action="store_true")
    args = parser.parse_args(argv)
    from effllm_jax.export import load_language_model

    lm = load_language_model(args.model)
    out = generate(lm, args.prompt, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                   add_bos=args.add_bos)
    print(args.prompt + (out.text or " ".join(map(str, out.tokens))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
