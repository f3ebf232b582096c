"""Text generation over a LanguageModel (or the masked model): KV-cached, greedy or sampled.

Generation runs through model/decode.py: one jitted prefill of the (left-padded) prompts,
then a jitted decode loop over a preallocated K/V cache; greedy, or temperature with top-k and
top-p; stops at EOS, at stop strings, or after max_new_tokens. `next_token_logits` is the
uncached full forward (right-padded to a power-of-two bucket), kept as the reference.
CLI: python -m effllm_jax.generate --model=PATH --prompt="..." [--max_new_tokens=32]
"""
from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from effllm_jax.arch import ArchSpec
from effllm_jax.cli import (OneLineParser, non_negative_float, positive_int, unit_interval,
                            user_errors)
from effllm_jax.model.compact import apply_compact
from effllm_jax.model.decode import Decoder
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
def _last_logits_fn(spec_json: str):
    """Jitted (params, tokens [B, T], pos [B]) -> logits [B, V] at each row's position."""
    spec = ArchSpec.from_json(spec_json)
    return jax.jit(lambda params, tokens, pos: apply_compact(spec, params, tokens, pos)[:, 0])


def next_token_logits(lm: LanguageModel, tokens: Sequence[Sequence[int]]) -> np.ndarray:
    """Logits [B, V] of the token after each (unpadded) row: the uncached full forward."""
    lengths = np.asarray([len(t) for t in tokens])
    buf = np.zeros((len(tokens), bucket_length(lengths.max())), np.int32)
    for b, row in enumerate(tokens):
        buf[b, :len(row)] = row
    fn = _last_logits_fn(lm.spec.shape_key())
    return np.asarray(fn(lm.params, buf, jnp.asarray(lengths - 1, jnp.int32)))


def encode_prompts(lm: Any, prompts: Sequence[str | Sequence[int]], add_bos: bool = False
                   ) -> list[list[int]]:
    """Token rows of text prompts (through lm.tokenizer) or token-id prompts."""
    tok = getattr(lm, "tokenizer", None)
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
    return rows


def _cut_at_stop(tok: Any, tokens: list[int], stop: Sequence[str]) -> tuple[list[int], str, bool]:
    """(tokens through the first stop string, text cut before it, whether one was found)."""
    text = tok.decode(tokens)
    hits = sorted((text.index(s), i) for i, s in enumerate(stop) if s and s in text)
    if not hits:
        return tokens, text, False
    cut, first = hits[0]
    for n in range(1, len(tokens) + 1):  # fewest tokens whose text holds the stop string
        if len(tok.decode(tokens[:n])) >= cut + len(stop[first]):
            return tokens[:n], text[:cut], True
    return tokens, text[:cut], True


def generate_batch(lm: Any, prompts: Sequence[str | Sequence[int]], *,
                   max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
                   top_p: float = 1.0, seed: int = 0, eos_id: int | None = None,
                   stop_at_eos: bool = True, stop: Sequence[str] = (), add_bos: bool = False,
                   max_length: int | None = None, chunk: int = 32) -> list[Generation]:
    """Continues each prompt with the KV-cached decoder (text needs lm.tokenizer).

    Stops a row at EOS (excluded from its tokens), at the first of the `stop` strings (text
    cut before it; checked every `chunk` tokens) or after max_new_tokens. With max_length,
    prompts are left-truncated so prompt + max_new_tokens fits the context.
    """
    tok = getattr(lm, "tokenizer", None)
    rows = encode_prompts(lm, prompts, add_bos)
    if stop and tok is None:
        raise ValueError("stop strings need a tokenizer; this model has none")
    if eos_id is None and tok is not None:
        eos_id = tok.eos_id
    if max_length is not None:
        if max_new_tokens >= max_length:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for the prompt in "
                             f"a context of {max_length}")
        rows = [r[-(max_length - max_new_tokens):] for r in rows]
    decoder = Decoder(lm, rows, max_new_tokens, temperature=temperature, top_k=top_k,
                      top_p=top_p, seed=seed, eos_id=eos_id if stop_at_eos else None)
    stopped = np.zeros(len(rows), bool)
    while not decoder.all_done:
        out = decoder.run(chunk if stop else None)
        if stop:
            for b in np.flatnonzero(~stopped):
                if _cut_at_stop(tok, _real(out[b]), stop)[2]:
                    stopped[b] = True
            if stopped.any():
                decoder.finish(np.flatnonzero(stopped))
    out = decoder.run(0)
    results = []
    for b in range(len(rows)):
        tokens = _real(out[b])
        at_eos = bool(stop_at_eos and eos_id is not None and tokens and tokens[-1] == eos_id)
        if at_eos:
            tokens = tokens[:-1]
        text = tok.decode(tokens) if tok is not None else None
        if stop:
            tokens, text, found = _cut_at_stop(tok, tokens, stop)
            at_eos = at_eos and not found
        results.append(Generation(tokens, text, at_eos))
    return results


def _real(row: np.ndarray) -> list[int]:
    """Generated ids of one row, up to the -1 fill of a finished row."""
    ends = np.flatnonzero(row < 0)
    return [int(t) for t in row[:ends[0] if len(ends) else len(row)]]


def generate(lm: LanguageModel, prompt: str | Sequence[int], **kwargs) -> Generation:
    """Continues one prompt; see `generate_batch` for the options."""
    return generate_batch(lm, [prompt], **kwargs)[0]


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    prog = "python -m effllm_jax.generate"
    parser = OneLineParser(prog=prog)
    parser.add_argument("--model", required=True, help="workdir, export dir, HF dir or .gguf")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max_new_tokens", type=positive_int, default=32)
    parser.add_argument("--temperature", type=non_negative_float, default=0.0)
    parser.add_argument("--top_k", type=positive_int, default=None)
    parser.add_argument("--top_p", type=unit_interval, default=1.0)
    parser.add_argument("--stop", action="append", default=[],
                        help="stop string (repeatable); the text is cut before it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--add_bos", action="store_true")
    parser.add_debug_flag()
    args = parser.parse_args(argv)
    from effllm_jax.evaluate.suite import model_max_length
    from effllm_jax.export import load_language_model

    with user_errors(prog, args.debug):
        lm = load_language_model(args.model)
        out = generate(lm, args.prompt, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       seed=args.seed, add_bos=args.add_bos, stop=args.stop,
                       max_length=model_max_length(lm))
    print(args.prompt + (out.text if out.text is not None else " ".join(map(str, out.tokens))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
