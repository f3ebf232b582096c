"""Model FLOPs per token and per-device peak FLOP/s, for MFU in the training logs.

Two utilisations are logged: `mfu` counts the useful FLOPs of the live (pruned) model, and
`mfu_hw` the FLOPs of the shapes the step executes (the dense source while masks are in
use). The peak is `train.peak_flops_per_device` when set, else the vendor table below, else
on CPU a practical matmul peak measured once per process (`measured_peak_flops`, ~0.3 s;
bench/peak.py runs the same measurement longer and writes it to JSON). Measuring in-process
keeps the figure true for the machine and load the run actually sees; a JSON written on
another day or box would not be.
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from effllm_jax.arch import ArchSpec
from effllm_jax.model.llama import ModelConfig

# Dense bf16 peak FLOP/s per device (vendor figures); extend as needed or set
# train.peak_flops_per_device in the config.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H200": 989e12,  # the H100 SXM's bf16 dense figure (same compute, more HBM)
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
}


def flops_per_token(spec: ArchSpec, seq_len: int, dense: bool = False) -> float:
    """Training FLOPs per token (6 x matmul params + causal-agnostic attention term).

    `dense=True` counts the source model, which is what a masked step actually executes.
    """
    cfg = spec.model_config
    if dense:
        d, layers = cfg.d_model, [(cfg.num_heads, cfg.num_kv_heads, cfg.ffn_dim)] * cfg.num_layers
    else:
        d = spec.hidden_dim
        layers = [(l.num_heads, l.num_kv_heads, l.ffn_dim) for l in spec.layers]
    matmul = cfg.vocab_size * d  # the (tied or separate) output projection
    attention = 0
    for heads, kv_heads, ffn in layers:
        matmul += d * cfg.head_dim * 2 * (heads + kv_heads) + 3 * d * ffn
        attention += 2 * 2 * heads * cfg.head_dim * seq_len  # QK^T and PV, forward
    return 6.0 * matmul + 3.0 * attention


def flops_per_token_from_counts(cfg: ModelConfig, live_params: float, kept_heads: float,
                                kept_hidden: float, seq_len: int) -> float:
    """`flops_per_token` of the live model from the step's metrics (live parameter count,
    total kept query heads, kept hidden width): no mask leaves the device."""
    norms = (2 * cfg.num_layers + 1) * kept_hidden  # gains, not matmul weights
    input_embedding = 0 if cfg.tie_embeddings else cfg.vocab_size * kept_hidden  # a lookup
    matmul = live_params - norms - input_embedding
    return 6.0 * matmul + 12.0 * kept_heads * cfg.head_dim * seq_len


def measure_matmul_flops(dtype: str = "float32", size: int = 1024, repeats: int = 5) -> float:
    """Practical peak FLOP/s of one device: best of `repeats` timed [size, size] matmuls
    (a chain of 4 per call, so dispatch cost is amortised)."""
    device = jax.local_devices()[0]  # this process's own (jax.devices()[0] may be another's)
    a = jax.device_put(np.full((size, size), 1.0 / size, dtype=jnp.dtype(dtype)), device)

    @jax.jit
    def chain(x, w):
        for _ in range(4):
            x = x @ w
        return x

    jax.block_until_ready(chain(a, a))  # compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(chain(a, a))
        best = min(best, time.perf_counter() - start)
    return 4 * 2.0 * size ** 3 / best


@functools.lru_cache(maxsize=None)
def measured_peak_flops(dtype: str = "float32") -> float:
    """`measure_matmul_flops` once per process and dtype (the trainer's CPU peak)."""
    return measure_matmul_flops(dtype)


def peak_flops_per_device(configured: float = 0.0, dtype: str = "float32") -> float | None:
    """Configured peak, else the table's entry for this device kind, else on CPU the measured
    matmul peak in the compute dtype, else None (unknown)."""
    if configured:
        return float(configured)
    device = jax.devices()[0]
    for name, peak in PEAK_FLOPS.items():
        if device.device_kind.startswith(name):
            return peak
    if device.platform == "cpu":
        return measured_peak_flops(dtype)
    return None
