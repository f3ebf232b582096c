"""SmolLM2-135M's shape (30 x 576, 9 heads / 3 KV heads, FFN 1536, tied): a small GQA source.

  python -m effllm_jax.train --config=configs/smollm2_135m.py --workdir=runs/smollm2
Pruned to `target_fraction` of its parameters (default 50%).
"""
from effllm_jax.config import base_config


def get_config():
    config = base_config()
    config.model.update(vocab_size=49152, d_model=576, num_layers=30, num_heads=9,
                        num_kv_heads=3, head_dim=64, ffn_dim=1536, rope_theta=100000.0,
                        tie_embeddings=True, dtype="bfloat16", remat="dots")
    config.optim.update(lr=1e-3, warmup_steps=1000)
    config.train.update(steps=50_000, global_batch=256, seq_len=2048, log_every=50,
                        checkpoint_every=1000)
    config.prune.update(target_fraction=0.5, warmup_steps=1000, prune_steps=20_000, every=100,
                        criterion="taylor_fisher")
    config.mesh.shape = (1, -1, 1)
    return config
