"""Hugging Face Llama interop: export a compact model as a stock LlamaForCausalLM directory,
and import Llama-family safetensors + config.json as a dense pruning source or a LanguageModel.

Layouts (ours -> Hugging Face; both use the rotate-half RoPE pairing, so no permutation):
  embed [V,d]          model.embed_tokens.weight [V,d]
  wq [d,H,Dh]          self_attn.q_proj.weight [H*Dh, d]     (wk, wv likewise with K heads)
  wo [H,Dh,d]          self_attn.o_proj.weight [d, H*Dh]
  w_gate/w_up [d,F]    mlp.gate_proj/up_proj.weight [F, d];  w_down [F,d] -> down_proj [d, F]
  attn_norm/mlp_norm   input_layernorm / post_attention_layernorm; final_norm -> model.norm
  lm_head [d,V]        lm_head.weight [V, d] (only when untied)
Stock Llama needs one width for every layer and contiguous, even GQA groups: non-uniform
models are zero-padded exactly (see widths.py) unless `strict` asks for a refusal.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Callable, Literal

import numpy as np

from effllm_jax.arch import ArchSpec
from effllm_jax.export import flax_io, safetensors_io, tokenizer_io, widths
from effllm_jax.model.llama import Masks, ModelConfig, full_masks

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
Getter = Callable[[str, tuple[int, ...]], np.ndarray]  # HF name, HF shape -> [out, in] array


def hf_name(flat: str) -> str:
    """Compact flat name -> Hugging Face tensor name."""
    if flat == "embed":
        return "model.embed_tokens.weight"
    if flat == "final_norm.scale":
        return "model.norm.weight"
    if flat == "lm_head":
        return "lm_head.weight"
    _, i, block, leaf = flat.split(".", 3)
    names = {"attn_norm.scale": "input_layernorm", "mlp_norm.scale": "post_attention_layernorm",
             "wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
             "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj",
             "w_down": "mlp.down_proj"}
    key = f"{block}.{leaf}" if block.endswith("norm") else leaf
    return f"model.layers.{i}.{names[key]}.weight"


def to_hf(flat: str, x: np.ndarray) -> np.ndarray:
    """Our tensor -> its Hugging Face [out, in] layout."""
    leaf = flat.rsplit(".", 1)[-1]
    if leaf in ("wq", "wk", "wv"):
        return x.reshape(x.shape[0], x.shape[1] * x.shape[2]).T
    if leaf == "wo":
        return x.reshape(x.shape[0] * x.shape[1], x.shape[2]).T
    if leaf in ("w_gate", "w_up", "w_down", "lm_head"):
        return x.T
    return x


def from_hf(flat: str, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A Hugging Face tensor -> ours (of `shape`), as a contiguous float32 copy."""
    leaf = flat.rsplit(".", 1)[-1]
    if leaf in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "lm_head"):
        x = x.T
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(shape))


def hf_shape(flat: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The Hugging Face shape of our tensor of `shape`."""
    leaf = flat.rsplit(".", 1)[-1]
    if leaf in ("wq", "wk", "wv"):
        return (int(np.prod(shape[1:])), shape[0])
    if leaf == "wo":
        return (shape[-1], int(np.prod(shape[:-1])))
    if leaf in ("w_gate", "w_up", "w_down", "lm_head"):
        return (shape[1], shape[0])
    return tuple(shape)


def hf_config(spec: ArchSpec, *, bos_id: int | None = None, eos_id: int | None = None,
              max_position_embeddings: int = 2048, dtype: str = "float32") -> dict:
    """config.json for a uniform spec, in the form transformers 5.x writes."""
    if not spec.uniform:
        raise ValueError("hf_config needs uniform per-layer widths; pad the model first")
    cfg, layer = spec.model_config, spec.layers[0]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": spec.hidden_dim,
        "intermediate_size": layer.ffn_dim,
        "num_hidden_layers": len(spec.layers),
        "num_attention_heads": layer.num_heads,
        "num_key_value_heads": layer.num_kv_heads,
        "head_dim": cfg.head_dim,  # explicit: hidden_size need not equal heads * head_dim
        "hidden_act": "silu",
        "max_position_embeddings": int(max_position_embeddings),
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        "tie_word_embeddings": bool(cfg.tie_embeddings),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "dtype": dtype,
    }


def export_hf(out_dir: str, spec: ArchSpec, params: dict | widths.LazyTensors, *,
              tokenizer: Any = None, tokenizer_path: str | None = None, strict: bool = False,
              gqa: Literal["auto", "pad", "mha"] = "auto", round_to: int | None = None,
              dtype: str = "float32", max_position_embeddings: int = 2048) -> list[str]:
    """Writes a directory that AutoModelForCausalLM loads; returns notes on what was changed."""
    np_dtype = flax_io.storage_dtype(dtype)
    multiple = round_to or 1
    notes = []
    first = spec.layers[0]
    if spec.uniform and first.num_heads > 0 and first.ffn_dim > 0:
        layouts = [widths.identity_layout(l, widths.round_up(l.ffn_dim, multiple))
                   for l in spec.layers]
    elif strict:
        detail = "; ".join(f"layer {i}: q_per_kv {list(l.q_per_kv)}, ffn {l.ffn_dim}"
                           for i, l in enumerate(spec.layers[:4]))
        raise ValueError("strict HF export refused: per-layer widths or GQA groups differ, or "
                         f"a width is zero ({detail}{'; ...' if len(spec.layers) > 4 else ''}); "
                         "stock LlamaForCausalLM needs one nonzero width per model (drop strict "
                         "to zero-pad exactly)")
    else:
        layouts, note = widths.uniform_layouts(spec, gqa, multiple)
        notes.append(note)
        log.info("HF export: %s", note)
    hidden = widths.round_up(spec.hidden_dim, multiple)
    if round_to:
        notes.append(f"widths rounded up to multiples of {round_to} by exact zero padding "
                     f"(hidden {spec.hidden_dim}->{hidden})")
    num_heads = len(layouts[0].q_src)
    if hidden % num_heads:  # transformers' LlamaConfig insists, even with an explicit head_dim
        if strict:
            raise ValueError(f"strict HF export refused: hidden width {hidden} is not a multiple "
                             f"of {num_heads} heads, which transformers' LlamaConfig requires "
                             "(drop strict to zero-pad the hidden width exactly)")
        padded = widths.round_up(hidden, math.lcm(multiple, num_heads))
        notes.append(f"hidden width padded {hidden}->{padded} (exact; RMSNorm eps and gains "
                     f"rescaled) because LlamaConfig needs hidden_size % num_attention_heads == 0")
        log.info("HF export: %s", notes[-1])
        hidden = padded
    spec, tensors = widths.relayout(spec, params, layouts, hidden)
    assert spec.uniform, "relayout must give a uniform model"
    os.makedirs(out_dir, exist_ok=True)
    shapes = flax_io.expected_shapes(spec)
    order = sorted(shapes, key=_hf_order)
    plans = [safetensors_io.TensorPlan(
        hf_name(n), hf_shape(n, shapes[n]), np_dtype,
        lambda n=n: np.ascontiguousarray(to_hf(n, tensors[n]())).astype(np_dtype))
        for n in order]
    safetensors_io.write_safetensors(os.path.join(out_dir, "model.safetensors"), plans,
                                     {"format": "pt"})  # transformers insists on 'pt'
    bos = getattr(tokenizer, "bos_id", None)
    eos = getattr(tokenizer, "eos_id", None)
    config = hf_config(spec, bos_id=bos, eos_id=eos, dtype=dtype,
                       max_position_embeddings=max_position_embeddings)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    notes.append(tokenizer_io.save_hf_tokenizer(tokenizer, tokenizer_path, out_dir))
    if tokenizer_path is not None or tokenizer is not None:  # the project's own copy as well
        flax_io.copy_tokenizer(tokenizer, tokenizer_path, os.path.join(out_dir, "tokenizer"))
    with open(os.path.join(out_dir, "effllm_export.json"), "w") as f:
        json.dump({"format": "hf", "notes": notes, "spec": spec.to_json()}, f, indent=2)
    return notes


def _hf_order(flat: str) -> tuple:
    """embed, layers in order, final norm, head."""
    if flat.startswith("layers."):
        return (1, int(flat.split(".")[1]), flat)
    return ({"embed": 0, "final_norm.scale": 2, "lm_head": 3}[flat], 0, flat)


def is_hf_dir(path: str) -> bool:
    """True for a directory with config.json and safetensors weights."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        return False
    try:
        safetensors_io.find_weights(path)
        return True
    except FileNotFoundError:
        return False


def config_from_hf(config: dict) -> ModelConfig:
    """ModelConfig of a Llama-family config.json, refusing features our model lacks."""
    kind = config.get("model_type")
    if kind not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {kind!r} is not supported (supported: "
                         f"{SUPPORTED_MODEL_TYPES})")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise ValueError(f"config.json sets {key}=true; biases are not supported")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {config['hidden_act']!r} is not supported (only 'silu')")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope_type {rope_type!r} is not supported (only 'default')")
    if kind == "mistral" and config.get("sliding_window"):
        log.warning("sliding_window=%s ignored: exact only for sequences up to that length",
                    config["sliding_window"])
    try:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return ModelConfig(
            vocab_size=int(config["vocab_size"]), d_model=hidden,
            num_layers=int(config["num_hidden_layers"]), num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            ffn_dim=int(config["intermediate_size"]),
            rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            init_std=float(config.get("initializer_range", 0.02)))
    except KeyError as e:
        raise ValueError(f"config.json lacks required field {e.args[0]!r}") from e


def compact_from_hf(cfg: ModelConfig, get: Getter,
                    place: Callable[[np.ndarray], Any] | None = None) -> tuple[ArchSpec, dict]:
    """Dense (all units kept) compact params from Hugging Face tensors, one at a time.

    `place` (e.g. jax.device_put) takes each tensor as soon as it is converted, so no second
    full host copy of the model is ever alive."""
    spec = ArchSpec.from_masks(full_masks(cfg), cfg)
    shapes = flax_io.expected_shapes(spec)
    place = place or (lambda x: x)
    flat = {n: place(from_hf(n, get(hf_name(n), hf_shape(n, shapes[n])), shapes[n]))
            for n in shapes}
    return spec, widths.unflatten(flat)


def dense_from_compact(cfg: ModelConfig, params: dict) -> tuple[dict, Masks]:
    """Stacks dense compact params into the source model's [L, ...] layout + full masks."""
    layers = params["layers"]
    stacked = {group: {name: np.stack([layers[l][group][name] for l in range(cfg.num_layers)])
                       for name in layers[0][group]}
               for group in layers[0]}
    out = {"embed": params["embed"], "layers": stacked, "final_norm": params["final_norm"]}
    if "lm_head" in params:
        out["lm_head"] = params["lm_head"]
    return out, {k: np.asarray(v) for k, v in full_masks(cfg).items()}


def read_hf_config(path: str) -> dict:
    """The config.json of a Hugging Face directory."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in {path}")
    with open(config_path) as f:
        return json.load(f)


def load_hf_compact(path: str) -> tuple[ArchSpec, dict]:
    """(spec, compact params) of a Hugging Face Llama directory."""
    cfg = config_from_hf(read_hf_config(path))
    with safetensors_io.TensorSource(safetensors_io.find_weights(path)) as source:
        names = set(source.names())

        def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
            if name not in names:
                raise ValueError(f"{path}: tensor {name} is missing (config.json implies shape "
                                 f"{shape})")
            try:
                return source.get(name, shape)
            except ValueError as e:
                raise ValueError(f"{path}: weights do not match config.json: {e}") from e

        spec, params = compact_from_hf(cfg, get)
        used = {hf_name(n) for n in widths.flatten(params)} | {"lm_head.weight"}
        ignored = sorted(names - used)
        if ignored:
            log.warning("%s: ignored tensors %s", path, ignored[:8])
    return spec, params


def hf_context_length(path: str) -> int | None:
    """max_position_embeddings of a Hugging Face directory's config.json, if it states one."""
    value = read_hf_config(path).get("max_position_embeddings")
    return None if value is None else int(value)


def import_hf(path: str) -> tuple[ModelConfig, dict, Masks]:
    """A Hugging Face Llama directory as a dense pruning source: (cfg, params, full masks)."""
    spec, params = load_hf_compact(path)
    cfg = spec.model_config
    dense, masks = dense_from_compact(cfg, params)
    return cfg, dense, masks


def load_hf_tokenizer(path: str) -> Any:
    """The tokenizer of a Hugging Face directory (the project's copy first), or None."""
    if os.path.exists(os.path.join(path, "tokenizer")):
        return tokenizer_io.load_tokenizer(os.path.join(path, "tokenizer"))
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return tokenizer_io.BPETokenizer.load(path)
    model = tokenizer_io.find_sentencepiece_model(path)
    return tokenizer_io.SentencePieceTokenizer(model) if model else None
