"""The default demo: a tiny Llama pruned to 40% of its parameters while it trains on CPU.

  python -m effllm_jax.train --config=configs/tiny.py --workdir=runs/tiny
"""
from effllm_jax.config import base_config


def get_config():
    config = base_config()
    config.model.update(vocab_size=4096, d_model=128, num_layers=4, num_heads=8, num_kv_heads=4,
                        head_dim=16, ffn_dim=384,
                        scan_layers=False)  # XLA:CPU runs a layer scan ~2x slower than unrolled
    config.prune.update(target_fraction=0.4, warmup_steps=100, prune_steps=200, every=20)
    config.train.update(steps=400, global_batch=16, seq_len=128, log_every=10,
                        checkpoint_every=100)
    return config
