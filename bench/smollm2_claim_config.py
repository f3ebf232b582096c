"""bench/smollm2_claim.py's setting: SmolLM2-135M-Instruct (from its GGUF) pruned to ~70M on CPU.

Continued training of the imported model on real text (Austen + Python docs, SmolLM2's own
tokenizer), seq 256 x batch 8 = 2,048 tokens a step. `--config.train.steps` and the prune /
continued fields below set the token budget; bench/smollm2_claim.py --steps scales them.
"""
import os

from effllm_jax.config import base_config

GGUF = os.path.join(os.environ.get("EFFLLM_CACHE") or os.path.expanduser("~/.cache/effllm"),
                    "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
TARGET_PARAMS = 70_000_000


def get_config():
    config = base_config()
    config.model.update(vocab_size=49152, d_model=576, num_layers=30, num_heads=9,
                        num_kv_heads=3, head_dim=64, ffn_dim=1536, rope_theta=100000.0,
                        tie_embeddings=True, dtype="float32", remat="none")
    config.data.update(sources=("austen", "python_docs"), heldout=("austen/persuasion",),
                       heldout_fraction=0.02)
    config.data.tokenizer.path = GGUF
    config.train.update(init_from=GGUF, steps=40, global_batch=8, seq_len=256, log_every=2,
                        checkpoint_every=10, keep_checkpoints=1, eval_every=0)
    # A pretrained source: a gentle rate, a short warm-up, no decay of its weights.
    config.optim.update(lr=2e-4, warmup_steps=4, weight_decay=0.0, min_lr_ratio=0.1)
    # Dense warm-up (the first saliency window), events over most of the budget.
    config.prune.update(target_params=TARGET_PARAMS, warmup_steps=4, prune_steps=32, every=4,
                        criterion="taylor")
    config.continued.update(steps=10, warmup_steps=2, lr=2e-4)  # at the final architecture
    return config
