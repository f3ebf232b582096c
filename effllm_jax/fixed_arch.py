r"""Direct pretraining of an architecture that pruning found: its final masks, fixed from step 0.

  python -m effllm_jax.fixed_arch --masks_from=RUN --out=NEW_RUN [--seed=N] [--steps=N]

A masked model computes exactly what its sliced twin computes, so training the source's shape
from a fresh initialisation with a pruned run's final masks, and no pruning event, is training
that (non-uniform) architecture from scratch. This writes a run directory at step 0 holding
fresh weights under those masks, with `prune` set to one no-op event, which `train` continues
like a post-training-pruned run (`load_run_config` + `train.run`, or the train CLI with the
same config). The weights are a fresh draw, not the pruned run's initial weights, which would
be a lottery-ticket rewind rather than training from scratch.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import ml_collections
import numpy as np

from effllm_jax import checkpoint as ckpt_lib
from effllm_jax import config as config_lib
from effllm_jax import prune_posthoc
from effllm_jax import train_step as ts
from effllm_jax.arch import ArchSpec
from effllm_jax.cli import OneLineParser, non_negative_int, positive_int
from effllm_jax.export import api
from effllm_jax.model import llama
from effllm_jax.pruning import groups

INIT_STREAM = 1  # folded into the seed: a different draw from the pruned run's own init


def fixed_config(config: ml_collections.ConfigDict, live_params: int) -> ml_collections.ConfigDict:
    """`config` set to train at its masks' width: one no-op event at step 1, no distillation."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.prune.update(target_params=int(live_params), warmup_steps=0, prune_steps=1, every=1,
                        compensation="none")
    config.distill.teacher = ""
    return config


@functools.partial(jax.jit, static_argnums=0)
def _masked_init(cfg: llama.ModelConfig, key: jax.Array, masks: dict) -> dict:
    """Fresh parameters with the pruned entries zeroed (one compile, not one per op)."""
    return ts.mask_tree(llama.init_params(cfg, key), groups.param_masks(masks, cfg))


def write_run(masks_from: str, out: str, config: ml_collections.ConfigDict | None = None,
              seed: int | None = None, steps: int | None = None) -> ArchSpec:
    """Writes `out`: fresh weights masked by `masks_from`'s latest masks, at step 0."""
    source = ckpt_lib.load_inference(masks_from)
    config = ckpt_lib.load_run_config(masks_from) if config is None else config
    cfg = config_lib.model_config(config)
    shape = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
             "ffn_dim")  # numerics (dtype, remat) may differ
    if any(getattr(cfg, k) != getattr(source.cfg, k) for k in shape):
        raise ValueError(f"--masks_from={masks_from} holds masks of {source.cfg}, not of the "
                         f"configured model {cfg}")
    config = fixed_config(config, int(groups.count_params(source.masks, cfg)))
    with config.unlocked():
        if seed is not None:
            config.train.seed = int(seed)
        if steps is not None:
            config.train.steps = int(steps)
            config.continued.steps = 0
    key = jax.random.fold_in(jax.random.key(int(config.train.seed)), INIT_STREAM)
    params = jax.tree.map(np.asarray, _masked_init(cfg, key, source.masks))
    os.makedirs(out, exist_ok=True)  # write_run copies the tokenizer in first
    return prune_posthoc.write_run(out, config, params, source.masks,
                                   api.run_tokenizer_path(masks_from))


def main(argv: list[str] | None = None) -> int:
    """CLI; bad input gets one line on stderr and exit status 2."""
    parser = OneLineParser(prog="python -m effllm_jax.fixed_arch", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--masks_from", required=True, help="a pruned run directory")
    parser.add_argument("--out", required=True, help="new run directory")
    parser.add_argument("--seed", type=non_negative_int, default=None,
                        help="train.seed of the new run (default: the pruned run's)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="train.steps of the new run (default: the pruned run's)")
    args = parser.parse_args(argv)
    if os.path.exists(os.path.join(args.out, "checkpoints")):
        parser.error(f"--out={args.out} already holds a run; choose a new directory")
    try:
        spec = write_run(args.masks_from, args.out, seed=args.seed, steps=args.steps)
    except (ValueError, FileNotFoundError, ckpt_lib.CheckpointError) as e:
        parser.error(str(e))
    print(f"{args.out}: the architecture of {args.masks_from}, fresh weights, step 0")
    print(spec.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
