"""An lm-evaluation-harness `LM` over our LanguageModel, for users who have the harness.

lm_eval is never a dependency: `EffLLMHarnessLM` implements the three request types on plain
tuples or on harness `Instance`s (anything with `.args`), and `register()` imports lm_eval
lazily, builds a subclass of `lm_eval.api.model.LM` and registers it as "effllm":

    from effllm_jax.evaluate.harness_adapter import register
    register()
    lm_eval --model effllm --model_args checkpoint=PATH,batch_size=16 --tasks arc_easy
or, in Python, `lm_eval.simple_evaluate(model=as_harness_lm(lm), tasks=[...])`.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Sequence

import numpy as np

from effllm_jax.evaluate.perplexity import token_loglikelihood_rolling
from effllm_jax.evaluate.scoring import (DEFAULT_BATCH_SIZE, DEFAULT_BUCKETS, loglikelihoods,
                                         pick_bucket, prefix_token_id)
from effllm_jax.evaluate.suite import model_max_length

DEFAULT_MAX_GEN_TOKS = 256


def _args(request: Any) -> tuple:
    """Arguments of a harness Instance, or the request itself when it is a plain tuple."""
    return tuple(request.args) if hasattr(request, "args") else tuple(request)


def _make_next_token(lm: Any, max_length: int) -> Callable[[list[int]], int]:
    """token ids -> greedy next token id (a LanguageModel unembeds the last position only)."""
    from effllm_jax.model.lm import LanguageModel

    if isinstance(lm, LanguageModel):
        from effllm_jax.generate import next_token_logits  # bucketed, jitted per architecture

        return lambda ids: int(np.argmax(next_token_logits(lm, [ids])[0]))

    def stub_next(ids: list[int]) -> int:  # any object with .logits(tokens [B, T])
        width = pick_bucket(len(ids), DEFAULT_BUCKETS, max_length)
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :len(ids)] = ids
        return int(np.argmax(np.asarray(lm.logits(tokens))[0, len(ids) - 1]))

    return stub_next


def greedy_generate(lm: Any, prompt: str, *, until: Sequence[str] = (),
                    max_new_tokens: int = DEFAULT_MAX_GEN_TOKS, max_length: int | None = None
                    ) -> str:
    """Greedy continuation of `prompt`, cut at the first stop string or EOS.

    No KV cache (the model exposes only full forwards), so each token re-runs the window,
    padded to a length bucket so compilations stay few.
    """
    tok = lm.tokenizer
    max_length = max_length or model_max_length(lm)
    ids = list(tok.encode(prompt)) or [prefix_token_id(tok)]
    next_token = _make_next_token(lm, max_length)
    eos = getattr(tok, "eos_id", None)
    start, out = len(ids), ""
    for _ in range(max_new_tokens):
        token = next_token(ids[-max_length:])  # left-truncated to the context length
        if eos is not None and token == eos:
            break
        ids.append(token)
        out = tok.decode(ids[start:])
        if any(s and s in out for s in until):
            break
    for s in until:  # cut at the earliest stop string, as the harness does
        if s and s in out:
            out = out.split(s)[0]
    return out


class EffLLMHarnessLM:
    """The harness's three request types over a LanguageModel (works without lm_eval)."""

    def __init__(self, lm: Any, *, batch_size: int = DEFAULT_BATCH_SIZE,
                 max_length: int | None = None, add_bos: bool = False,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS):
        if getattr(lm, "tokenizer", None) is None:
            raise ValueError("the harness adapter needs a model with a tokenizer")
        self.lm = lm
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or model_max_length(lm))
        self.add_bos = bool(add_bos)
        self.max_gen_toks = int(max_gen_toks)

    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False
                      ) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is_greedy) for each (context, continuation)."""
        pairs = [_args(r)[:2] for r in requests]
        return loglikelihoods(self.lm, pairs, add_bos=self.add_bos, batch_size=self.batch_size,
                              max_length=self.max_length)

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False
                              ) -> list[float]:
        """Total log-likelihood of each string, in disjoint max_length windows."""
        tok = self.lm.tokenizer
        out = []
        for r in requests:
            ids = list(tok.encode(_args(r)[0]))
            out.append(token_loglikelihood_rolling(
                self.lm, ids, prefix_id=prefix_token_id(tok), max_length=self.max_length,
                batch_size=self.batch_size) if ids else 0.0)
        return out

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy generation until a stop string, EOS or max_gen_toks."""
        out = []
        for r in requests:
            args = _args(r)
            context, kwargs = args[0], dict(args[1]) if len(args) > 1 else {}
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            out.append(greedy_generate(self.lm, context, until=until,
                                       max_new_tokens=int(kwargs.get("max_gen_toks",
                                                                     self.max_gen_toks)),
                                       max_length=self.max_length))
        return out


_REGISTERED: dict[str, type] = {}


def harness_available() -> bool:
    """True when lm_eval can be imported."""
    try:
        importlib.import_module("lm_eval.api.model")
        return True
    except ImportError:
        return False


def register(name: str = "effllm") -> type | None:
    """Builds and registers the lm_eval LM subclass; None when lm_eval is not installed."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    try:
        model_mod = importlib.import_module("lm_eval.api.model")
        registry = importlib.import_module("lm_eval.api.registry")
    except ImportError:
        return None

    class HarnessLM(model_mod.LM, EffLLMHarnessLM):
        """lm_eval LM backed by an effllm LanguageModel."""

        def __init__(self, lm: Any = None, checkpoint: str | None = None, **kwargs: Any):
            model_mod.LM.__init__(self)
            if lm is None:
                if checkpoint is None:
                    raise ValueError("pass lm= or checkpoint=")
                from effllm_jax.export import load_language_model
                lm = load_language_model(checkpoint)
            EffLLMHarnessLM.__init__(self, lm, **kwargs)

        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
            kwargs = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv)
            for key in ("batch_size", "max_length", "max_gen_toks"):
                if key in kwargs:
                    kwargs[key] = int(kwargs[key])
            if "add_bos" in kwargs:
                kwargs["add_bos"] = str(kwargs["add_bos"]).lower() in ("1", "true", "yes")
            extra = additional_config or {}
            if extra.get("batch_size") not in (None, "auto") and "batch_size" not in kwargs:
                kwargs["batch_size"] = int(extra["batch_size"])
            return cls(**kwargs)

    registry.register_model(name)(HarnessLM)
    _REGISTERED[name] = HarnessLM
    return HarnessLM


def as_harness_lm(lm: Any, **kwargs: Any) -> Any:
    """An lm_eval LM instance when lm_eval is installed, else the plain adapter."""
    cls = register()
    return cls(lm, **kwargs) if cls is not None else EffLLMHarnessLM(lm, **kwargs)
