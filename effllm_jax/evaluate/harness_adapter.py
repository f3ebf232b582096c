"""An lm-evaluation-harness `LM` over our models (tested against lm-eval==0.4.13).

`EffLLMHarnessLM` implements the three request types (loglikelihood, loglikelihood_rolling,
generate_until) on harness `Instance`s or plain tuples, so it works without lm_eval too.
`register()` imports lm_eval lazily, builds a subclass of `lm_eval.api.model.LM` (our methods
first in the MRO, so the harness's abstract ones do not shadow them) and registers it as
"effllm". Both of the harness's entry points then work:

    lm_eval.simple_evaluate(model=as_harness_lm(lm), tasks=[...])
    python -m effllm_jax.evaluate.harness --model effllm \
        --model_args checkpoint=PATH,batch_size=16,device=cpu --tasks arc_easy

(the second registers the model, then runs the harness's own CLI). Install with
`pip install -e '.[harness]'`. Generation uses the KV-cached decoder (model/decode.py).
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
MODEL_NAME = "effllm"
# model_args the adapter understands, and how each is parsed from a CLI string
_ARG_TYPES: dict[str, Callable[[Any], Any]] = {
    "checkpoint": str, "batch_size": int, "max_length": int, "max_gen_toks": int,
    "add_bos": lambda v: v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes"),
    "device": str, "tokenizer": str,
}


def _args(request: Any) -> tuple:
    """Arguments of a harness Instance, or the request itself when it is a plain tuple."""
    return tuple(request.args) if hasattr(request, "args") else tuple(request)


def _uncached_greedy(lm: Any, ids: list[int], max_new_tokens: int, max_length: int,
                     until: Sequence[str]) -> str:
    """Greedy continuation for models with only `.logits` (test stand-ins): full forwards."""
    tok, eos, start = lm.tokenizer, getattr(lm.tokenizer, "eos_id", None), len(ids)
    out = ""
    for _ in range(max_new_tokens):
        window = ids[-max_length:]
        tokens = np.zeros((1, pick_bucket(len(window), DEFAULT_BUCKETS, max_length)), np.int32)
        tokens[0, :len(window)] = window
        token = int(np.argmax(np.asarray(lm.logits(tokens))[0, len(window) - 1]))
        if eos is not None and token == eos:
            break
        ids.append(token)
        out = tok.decode(ids[start:])
        if any(s and s in out for s in until):
            break
    return out


def generate_texts(lm: Any, contexts: Sequence[str], *, until: Sequence[str] = (),
                   max_new_tokens: int = DEFAULT_MAX_GEN_TOKS, max_length: int | None = None,
                   batch_size: int = DEFAULT_BATCH_SIZE, add_bos: bool = False,
                   temperature: float = 0.0, top_k: int | None = None, top_p: float = 1.0,
                   seed: int = 0) -> list[str]:
    """Continuations of `contexts`, each cut at the earliest stop string (as the harness does).

    An empty context starts from the prefix token (BOS, else EOS), as in the harness. Prompts
    are left-truncated so prompt + max_new_tokens fits max_length.
    """
    from effllm_jax.generate import generate_batch
    from effllm_jax.model.decode import can_decode

    tok = lm.tokenizer
    max_length = int(max_length or model_max_length(lm))
    max_new_tokens = min(int(max_new_tokens), max_length - 1)
    rows = []
    for context in contexts:
        ids = list(tok.encode(context)) if context else []
        if add_bos:
            ids = [prefix_token_id(tok)] + ids
        rows.append(ids or [prefix_token_id(tok)])
    out: list[str] = []
    if not can_decode(lm):
        for ids in rows:
            text = _uncached_greedy(lm, list(ids), max_new_tokens, max_length, until)
            out.append(_cut(text, until))
        return out
    for start in range(0, len(rows), batch_size):
        gens = generate_batch(lm, rows[start:start + batch_size], max_new_tokens=max_new_tokens,
                              temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                              stop=[s for s in until if s], max_length=max_length)
        out.extend(g.text for g in gens)
    return out


def _cut(text: str, until: Sequence[str]) -> str:
    for s in until:
        if s and s in text:
            text = text.split(s)[0]
    return text


def greedy_generate(lm: Any, prompt: str, *, until: Sequence[str] = (),
                    max_new_tokens: int = DEFAULT_MAX_GEN_TOKS, max_length: int | None = None
                    ) -> str:
    """Greedy continuation of `prompt`, cut at the first stop string or EOS."""
    return generate_texts(lm, [prompt], until=until, max_new_tokens=max_new_tokens,
                          max_length=max_length)[0]


class EffLLMHarnessLM:
    """The harness's three request types over a LanguageModel (works without lm_eval)."""

    def __init__(self, lm: Any, *, batch_size: int = DEFAULT_BATCH_SIZE,
                 max_length: int | None = None, add_bos: bool = False,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, device: str | None = None):
        if getattr(lm, "tokenizer", None) is None:
            raise ValueError("the harness adapter needs a model with a tokenizer")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.lm = place_on_device(lm, device) if device else lm
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
        """Generation until a stop string, EOS or max_gen_toks; greedy unless do_sample.

        Requests with the same generation settings run together in batches of batch_size.
        """
        groups: dict[tuple, list[int]] = {}
        settings = []
        for i, r in enumerate(requests):
            args = _args(r)
            kwargs = dict(args[1]) if len(args) > 1 and args[1] else {}
            until = kwargs.get("until") or []
            until = (until,) if isinstance(until, str) else tuple(until)
            sample = bool(kwargs.get("do_sample", False)) and float(
                kwargs.get("temperature", 1.0)) > 0
            key = (until, int(kwargs.get("max_gen_toks", self.max_gen_toks)),
                   float(kwargs.get("temperature", 1.0)) if sample else 0.0,
                   kwargs.get("top_k") if sample else None,
                   float(kwargs.get("top_p") or 1.0) if sample else 1.0)
            settings.append(args[0])
            groups.setdefault(key, []).append(i)
        out: list[str] = [""] * len(requests)
        for (until, max_toks, temperature, top_k, top_p), idx in groups.items():
            texts = generate_texts(self.lm, [settings[i] for i in idx], until=until,
                                   max_new_tokens=max_toks, max_length=self.max_length,
                                   batch_size=self.batch_size, add_bos=self.add_bos,
                                   temperature=temperature,
                                   top_k=None if top_k is None else int(top_k), top_p=top_p)
            for i, text in zip(idx, texts):
                out[i] = text
        return out


def place_on_device(lm: Any, device: str) -> Any:
    """Moves the model's arrays to a JAX device named like 'cpu', 'gpu:1', 'cuda', 'tpu:0'."""
    import jax

    name, _, index = str(device).partition(":")
    platform = {"cuda": "gpu", "rocm": "gpu"}.get(name.lower(), name.lower())
    try:
        devices = jax.devices(platform)
    except RuntimeError as e:
        raise ValueError(f"device={device!r}: no JAX {platform!r} backend here ({e})") from None
    i = int(index or 0)
    if not 0 <= i < len(devices):
        raise ValueError(f"device={device!r}: there are {len(devices)} {platform} device(s)")
    for name in ("params", "masks"):
        if getattr(lm, name, None) is not None:
            setattr(lm, name, jax.device_put(getattr(lm, name), devices[i]))
    return lm


def model_kwargs(arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """Constructor kwargs from the harness's model_args plus its own batch_size/device.

    model_args win over the CLI's --batch_size/--device (which always arrive, with defaults);
    batch_size "auto" keeps our default; max_batch_size has no meaning here and is dropped.
    """
    kwargs = dict(arg_dict)
    for key, value in (additional_config or {}).items():
        if key in ("batch_size", "device") and value is not None and key not in kwargs:
            kwargs[key] = value
    if str(kwargs.get("batch_size", "")).startswith("auto"):
        kwargs.pop("batch_size")
    unknown = sorted(set(kwargs) - set(_ARG_TYPES) - {"lm"})
    if unknown:
        raise ValueError(f"unknown effllm model_args {unknown}; known: {sorted(_ARG_TYPES)}")
    return {k: (v if k == "lm" or v is None else _ARG_TYPES[k](v)) for k, v in kwargs.items()}


_REGISTERED: dict[str, type] = {}


def harness_available() -> bool:
    """True when lm_eval can be imported."""
    try:
        importlib.import_module("lm_eval.api.model")
        return True
    except ImportError:
        return False


def register(name: str = MODEL_NAME) -> type | None:
    """Builds and registers the lm_eval LM subclass; None when lm_eval is not installed."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    try:
        model_mod = importlib.import_module("lm_eval.api.model")
        registry = importlib.import_module("lm_eval.api.registry")
    except ImportError:
        return None

    class HarnessLM(EffLLMHarnessLM, model_mod.LM):
        """lm_eval LM backed by an effllm model (a run, export, HF directory or .gguf)."""

        def __init__(self, lm: Any = None, checkpoint: str | None = None,
                     tokenizer: str | None = None, **kwargs: Any):
            model_mod.LM.__init__(self)
            if lm is None:
                if checkpoint is None:
                    raise ValueError("pass lm= or checkpoint=")
                from effllm_jax.export import load_language_model
                lm = load_language_model(checkpoint)
            if tokenizer:
                from effllm_jax.export.tokenizer_io import load_tokenizer
                lm.tokenizer = load_tokenizer(tokenizer)
            EffLLMHarnessLM.__init__(self, lm, **kwargs)

        @classmethod
        def create_from_arg_string(cls, arg_string: str,
                                   additional_config: dict | None = None) -> "HarnessLM":
            """From 'checkpoint=PATH,batch_size=16' (the harness's string form)."""
            args = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv)
            return cls(**model_kwargs(args, additional_config))

        @classmethod
        def create_from_arg_obj(cls, arg_dict: dict,
                                additional_config: dict | None = None) -> "HarnessLM":
            """From a parsed model_args dict (what lm-eval 0.4.13's CLI passes)."""
            return cls(**model_kwargs(arg_dict, additional_config))

        @property
        def tokenizer_name(self) -> str:
            return type(self.lm.tokenizer).__name__

    registry.register_model(name)(HarnessLM)
    _REGISTERED[name] = HarnessLM
    return HarnessLM


def as_harness_lm(lm: Any, **kwargs: Any) -> Any:
    """An lm_eval LM instance when lm_eval is installed, else the plain adapter."""
    cls = register()
    return cls(lm, **kwargs) if cls is not None else EffLLMHarnessLM(lm, **kwargs)
