"""Model FLOPs per token and per-device peak FLOP/s, for MFU in the training logs."""
from __future__ import annotations

import jax

from effllm_jax.arch import ArchSpec

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
    "NVIDIA H200": 989e12,
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


def peak_flops_per_device(configured: float = 0.0) -> float | None:
    """Configured peak, else the table's entry for this device kind, else None (unknown)."""
    if configured:
        return float(configured)
    kind = jax.devices()[0].device_kind
    for name, peak in PEAK_FLOPS.items():
        if kind.startswith(name):
            return peak
    return None
