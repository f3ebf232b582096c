r"""Post-training pruning baselines in the same code: one shot, to a parameter target.

  python -m effllm_jax.prune_posthoc --source=RUN_DIR|HF_DIR|MODEL.gguf --out=NEW_RUN \
      --method=taylor|magnitude|wanda [--scope=global|layer] [--compensation=none|obs] \
      (--target_params=N | --target_fraction=F) [--calibration_batches=8]

From a training run's latest checkpoint, or an imported dense model, to a run directory that
`python -m effllm_jax.train --workdir=NEW_RUN` continues and `python -m effllm_jax.export`
exports (same checkpoint layout: state + spec + data position; the masks hold the pruning).

Group saliency, summed over each group's weights as in training (pruning/saliency.py):
  taylor     |w · Σg| over the calibration batches   (LLM-Pruner's element-wise first order)
  magnitude  |w|
  wanda      |w| · ‖x‖, ‖x‖ = sqrt(diag H) of the weight's input (embeddings and norm gains: |w|)
The groups are removed by the training code's own selection (pruning/select.py): `global` is
one ranking over heads, FFN and hidden channels; `layer` removes heads and FFN channels as
per-layer slices (every layer keeps equal widths). With `--compensation=obs` the kept weights
then move by the same OBS update as in training (pruning/compensate.py), from the same
calibration statistics. Calibration batches come from the run's data config (an imported
model calibrates on `data.kind='synthetic'` tokens of its vocabulary unless --data_config
names a run whose data config to use). The new run starts at step 0 with fresh Adam moments.
"""
from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from effllm_jax import checkpoint as ckpt_lib
from effllm_jax import config as config_lib
from effllm_jax import data as data_lib
from effllm_jax import train_step as ts
from effllm_jax.arch import ArchSpec
from effllm_jax.cli import (USER_ERRORS, OneLineParser, non_negative_float, non_negative_int,
                            positive_int, report)
from effllm_jax.model import llama
from effllm_jax.model.llama import Masks, ModelConfig
from effllm_jax.pruning import compensate, groups, history, saliency
from effllm_jax.pruning.select import SelectConfig, select

METHODS = ("taylor", "magnitude", "wanda")
SCOPES = ("global", "layer")


def load_source(source: str) -> tuple[ml_collections.ConfigDict, dict, Masks, str | None]:
    """(run config, params, masks, tokenizer path) of a run directory or an imported model."""
    from effllm_jax import rundir
    from effllm_jax.export import api, import_hf, import_gguf
    found = rundir.kind(source)  # by contents; names a missing file
    if found == "run":
        config = ckpt_lib.load_run_config(source)
        ck = ckpt_lib.load_inference(source)
        return config, ck.params, ck.masks, api.run_tokenizer_path(source)
    if found == "gguf":
        cfg, params, masks = import_gguf(source)
    elif found == "hf":
        cfg, params, masks = import_hf(source)
    else:
        raise ValueError(f"--source={source} is a {found} export; prune a run directory, a "
                         f"Hugging Face directory or a .gguf file")
    config = config_lib.base_config()
    config.model.update(**{k: getattr(cfg, k) for k in config.model})
    config.data = ml_collections.ConfigDict(dict(kind="synthetic", vocab_size=cfg.vocab_size))
    return config, jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, masks), None


def _input_norms(stats: dict, cfg: ModelConfig) -> dict:
    """‖x‖ of every input channel (sqrt of diag H), per statistic, flattened over blocks."""
    return {k: jnp.sqrt(jnp.maximum(jnp.diagonal(h, axis1=-2, axis2=-1), 0.0)).reshape(
        h.shape[:-3] + (-1,)) for k, h in stats.items()}


def wanda_scales(params: dict, stats: dict, cfg: ModelConfig) -> dict:
    """A params-shaped tree s with |w|·s = |w|·‖x_in‖ (1 where the input is not a feature)."""
    n = _input_norms(stats, cfg)
    L, H, hd = cfg.num_layers, cfg.num_heads, cfg.head_dim
    s = jax.tree.map(jnp.ones_like, params)
    attn, mlp = dict(s["layers"]["attn"]), dict(s["layers"]["mlp"])
    for name in ("wq", "wk", "wv"):
        attn[name] = jnp.broadcast_to(n["attn_in"][:, :, None, None], attn[name].shape)
    attn["wo"] = jnp.broadcast_to(n["o_in"].reshape(L, H, hd)[..., None], attn["wo"].shape)
    for name in ("w_gate", "w_up"):
        mlp[name] = jnp.broadcast_to(n["mlp_in"][:, :, None], mlp[name].shape)
    mlp["w_down"] = jnp.broadcast_to(n["down_in"][:, :, None], mlp["w_down"].shape)
    s["layers"] = dict(s["layers"], attn=attn, mlp=mlp)
    if "lm_head" in s:
        s["lm_head"] = jnp.broadcast_to(n["final_in"][:, None], s["lm_head"].shape)
    return s


@functools.partial(jax.jit, static_argnames=("cfg", "stats_block"))
def _calibration_step(params, masks, batch, cfg: ModelConfig, stats_block: int | None):
    """Gradient of the mean loss on one batch, and the batch's input second moments."""
    def loss_fn(p):
        out = llama.apply(cfg, p, batch[:, :-1], masks, stats_block)
        logits, stats = (out, {}) if stats_block is None else out
        return ts.cross_entropy(logits, batch[:, 1:]), stats

    (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, stats


def calibrate(params: dict, masks: Masks, cfg: ModelConfig, batches, need_grads: bool,
              stats_block: int | None) -> tuple[dict | None, dict]:
    """(summed gradients or None, summed input second moments or {}) over the batches."""
    grads_sum, stats_sum = None, {}
    for batch in batches:
        grads, stats = _calibration_step(params, masks, jnp.asarray(batch), cfg, stats_block)
        grads_sum = grads if grads_sum is None else jax.tree.map(jnp.add, grads_sum, grads)
        stats_sum = stats if not stats_sum else compensate.accumulate(stats_sum, stats)
    return (grads_sum if need_grads else None), stats_sum


def group_saliency(method: str, params: dict, grads: dict | None, stats: dict,
                   cfg: ModelConfig) -> dict:
    """Per-group saliency of the chosen method (the accumulator layout of training)."""
    if method == "taylor":
        per_weight = grads  # |w · Σg|
    elif method == "magnitude":
        per_weight = jax.tree.map(jnp.sign, params)  # |w|
    elif method == "wanda":
        per_weight = jax.tree.map(lambda w, s: jnp.sign(w) * s, params,
                                  wanda_scales(params, stats, cfg))
    else:
        raise ValueError(f"--method={method!r}; expected one of {METHODS}")
    return saliency.group_saliency(params, per_weight, "taylor")


def prune(config: ml_collections.ConfigDict, params: dict, masks: Masks, batches, *,
          method: str, scope: str, target: int, compensation: str, damping: float = 0.01,
          obs_block: int = 0) -> tuple[dict, Masks]:
    """One-shot pruning of (params, masks) to at most ~`target` live params; returns both."""
    cfg = config_lib.model_config(config)
    need_stats = method == "wanda" or compensation == "obs"
    grads, stats = calibrate(params, masks, cfg, batches, method == "taylor",
                             obs_block if need_stats else None)
    scores = group_saliency(method, params, grads, stats, cfg)
    sel = SelectConfig(uniform_layers=scope == "layer",
                       group_types=tuple(config.prune.group_types),
                       round_to=int(config.prune.round_to))
    new_masks = jax.jit(select, static_argnums=(2, 4))(masks, scores, cfg, float(target), sel)
    if compensation == "obs":
        params = jax.jit(compensate.compensate, static_argnums=(4, 5))(
            params, masks, new_masks, stats, cfg, damping)
    params = ts.mask_tree(params, groups.param_masks(new_masks, cfg))
    return jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, new_masks)


def write_run(out: str, config: ml_collections.ConfigDict, params: dict, masks: Masks,
              tokenizer_path: str | None) -> ArchSpec:
    """A run directory at step 0 holding the pruned model, that `train` continues."""
    cfg = config_lib.model_config(config)
    step_cfg = ts.StepConfig(cfg, None, None, config.prune.criterion,
                             **config_lib.compensation_fields(config))
    tx, _ = ts.make_optimizer(config.optim, config.train.steps)
    state = ts.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), masks=masks,
                          saliency=saliency.zeros(cfg, step_cfg.criterion),
                          history=history.empty(cfg), stats=step_cfg.zero_stats())
    state = jax.tree.map(jnp.asarray, state)
    spec = ArchSpec.from_masks(masks, cfg, 0, 0)
    target = None if tokenizer_path is None else os.path.join(out, os.path.basename(tokenizer_path))
    if target is not None and not os.path.exists(target):  # the data pipeline may have written it
        copy = shutil.copytree if os.path.isdir(tokenizer_path) else shutil.copy2
        copy(tokenizer_path, target)
    ckpt_lib.save_run_config(out, config)
    ck = ckpt_lib.Checkpointer(out, async_save=False)
    ck.save(0, state, spec, {"step": 0, "seed": int(config.train.seed), "kind": config.data.kind})
    ck.close()
    return spec


def run(source: str, out: str, *, method: str, scope: str = "global",
        target_params: int = 0, target_fraction: float = 0.0, compensation: str = "none",
        damping: float = 0.01, obs_block: int = 0, calibration_batches: int = 8,
        steps: int | None = None) -> ArchSpec:
    """Prunes `source` to the target and writes the run directory `out`; returns its spec."""
    if method not in METHODS:
        raise ValueError(f"--method={method!r} is not a pruning method; expected one of {METHODS}")
    if scope not in SCOPES:
        raise ValueError(f"--scope={scope!r}; expected one of {SCOPES}")
    if compensation not in compensate.COMPENSATIONS:
        raise ValueError(f"--compensation={compensation!r}; expected one of "
                         f"{compensate.COMPENSATIONS}")
    if os.path.exists(os.path.join(out, "checkpoints")):
        raise FileExistsError(f"--out={out} already holds a run; choose a new directory")
    if int(calibration_batches) < 1:
        raise ValueError(f"--calibration_batches={calibration_batches} must be >= 1")
    config, params, masks, tokenizer_path = load_source(source)
    cfg = config_lib.model_config(config)
    dense = groups.dense_params(cfg)
    live = int(groups.count_params(masks, cfg))
    target = int(target_params) if target_params else int(dense * float(target_fraction))
    if not target_params and not 0.0 < float(target_fraction) <= 1.0:
        raise ValueError("give --target_params=N or --target_fraction in (0, 1]")
    if not cfg.vocab_size <= target <= live:
        raise ValueError(f"target of {target:,} params is unreachable: the source has {live:,} "
                         f"live params, and one hidden channel alone keeps "
                         f"vocab_size={cfg.vocab_size:,}")
    with config.unlocked():
        if steps is not None:
            config.train.steps = int(steps)
        # The new run continues at the fixed architecture: one no-op event at step 1.
        config.prune.update(target_params=target, warmup_steps=0, prune_steps=1, every=1,
                            compensation="none")
    compensate.validate(ml_collections.ConfigDict(dict(
        compensation=compensation, damping=damping, obs_block=obs_block)))
    t = config.train
    dataset = data_lib.build_dataset(config.data, seq_len=t.seq_len, global_batch=t.global_batch,
                                     seed=t.seed, workdir=out)
    batches = (dataset.local_batch(i) for i in range(int(calibration_batches)))
    params, new_masks = prune(config, params, masks, batches, method=method, scope=scope,
                              target=target, compensation=compensation, damping=damping,
                              obs_block=obs_block)
    with config.unlocked():  # the target the run holds: what pruning reached
        config.prune.target_params = max(int(groups.count_params(new_masks, cfg)), target)
    return write_run(out, config, params, new_masks, tokenizer_path)


def main(argv: list[str] | None = None) -> int:
    """CLI; bad input gets one line on stderr and exit status 2 (--debug: the traceback)."""
    parser = OneLineParser(prog="python -m effllm_jax.prune_posthoc", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="run dir, HF dir or .gguf file")
    parser.add_argument("--out", required=True, help="new run directory")
    parser.add_argument("--method", required=True, help=" | ".join(METHODS))
    parser.add_argument("--scope", default="global", help=" | ".join(SCOPES))
    parser.add_argument("--target_params", type=non_negative_int, default=0)
    parser.add_argument("--target_fraction", type=non_negative_float, default=0.0)
    parser.add_argument("--compensation", default="none", help="none | obs")
    parser.add_argument("--damping", type=non_negative_float, default=0.01)
    parser.add_argument("--obs_block", type=non_negative_int, default=0)
    parser.add_argument("--calibration_batches", type=positive_int, default=8)
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="train.steps of the new run")
    parser.add_debug_flag()
    args = parser.parse_args(argv)
    try:
        spec = run(args.source, args.out, method=args.method, scope=args.scope,
                   target_params=args.target_params, target_fraction=args.target_fraction,
                   compensation=args.compensation, damping=args.damping,
                   obs_block=args.obs_block, calibration_batches=args.calibration_batches,
                   steps=args.steps)
    except (*USER_ERRORS, ckpt_lib.CheckpointError) as e:
        if args.debug:
            raise
        return report(parser.prog, e)
    print(f"pruned {args.source} -> {args.out} ({args.method}, {args.scope}, "
          f"compensation {args.compensation})")
    print(spec.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
