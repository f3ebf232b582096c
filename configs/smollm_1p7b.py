"""The paper's setting: a SmolLM-1.7B-shaped source pruned while it pretrains.

  python -m effllm_jax.train --config=configs/smollm_1p7b.py:134m --workdir=gs://.../run
Variants (the paper's Table 2 sizes): 134m, 469m, 1.1b (target live parameters), and
`cpu` (same code path, tiny widths, for a smoke run on a laptop).
"""
from effllm_jax.config import base_config

TARGETS = {"134m": 134_000_000, "469m": 469_000_000, "1.1b": 1_100_000_000}


def get_config(variant: str = "134m"):
    config = base_config()
    config.model.update(vocab_size=49152, d_model=2048, num_layers=24, num_heads=32,
                        num_kv_heads=32, head_dim=64, ffn_dim=8192, rope_theta=10000.0,
                        tie_embeddings=True, dtype="bfloat16",
                        # Fits a 16 GiB v5e chip at 4 rows of 2048 tokens (AOT: 5.8 GiB per chip;
                        # 'dots' needs 15.9 GiB). Attention: splash on TPU, chosen by 'auto'.
                        remat="full", attention="auto", attention_block=512,
                        # SwiGLU 512 tokens at a time: its [B, T, 8192] buffers were the
                        # largest per-row ones at the TPU step's memory peak
                        mlp_chunk=512)
    config.train.loss_chunk = 512  # logits of 512 positions at a time, never all [B, T, V]
    # No windowed einsums (collective matmuls) for the FSDP weight gathers and gradient
    # reduce-scatters: libtpu picks them on v5e:4x4, not on 8x8, and they keep extra per-row
    # buffers live (4 rows per chip: 4.15 -> 3.60 GiB of temporaries on 4x4, 8x8 unchanged).
    # The scheduler's memory limit (default 95%) trades some overlap of communication with
    # compute for a smaller live set: with mlp_chunk, 3.19 -> 2.94 GiB on 4x4, 8x8 2.77 both.
    config.train.tpu_compiler_options = ("xla_tpu_enable_windowed_einsum_for_all_gather=false,"
                                         "xla_tpu_enable_windowed_einsum_for_reduce_scatter=false,"
                                         "xla_tpu_scheduler_percent_shared_memory_limit=20")
    config.optim.update(lr=3e-4, min_lr_ratio=0.1, warmup_steps=2000, weight_decay=0.1,
                        b2=0.95)
    config.train.update(steps=100_000, global_batch=512, seq_len=2048, log_every=50,
                        checkpoint_every=1000, keep_checkpoints=3)
    config.prune.update(warmup_steps=2000, prune_steps=40_000, every=200,
                        criterion="taylor_fisher")
    config.mesh.shape = (1, -1, 1)  # FSDP over every chip; add tensor parallelism for >1k chips
    if variant == "cpu":
        config.model.update(d_model=64, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16,
                            ffn_dim=256, dtype="float32", remat="none")
        config.train.update(steps=20, global_batch=8, seq_len=64, checkpoint_every=10)
        config.prune.update(target_fraction=0.8, warmup_steps=4, prune_steps=8, every=2)
        config.optim.update(warmup_steps=4)
        config.mesh.shape = (-1, 1, 1)
        return config
    if variant not in TARGETS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {sorted(TARGETS)} or 'cpu'")
    config.prune.target_params = TARGETS[variant]
    return config
