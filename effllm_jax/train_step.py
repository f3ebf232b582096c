"""The train state and the jit-compiled train step, with saliency and pruning inside it.

One step: loss and gradients of the masked model -> gradients of pruned weights zeroed ->
group saliency accumulated (inside the pruning window) -> AdamW update -> on event steps,
the pruning event (select.py) shrinks the masks, zeroes the removed weights and their Adam
moments, and resets the saliency. With `prune.compensation='obs'` the step also sums the
input second moments of the prunable linear layers inside the pruning window, and the event
first moves the kept weights to make up for the removed inputs (pruning/compensate.py).
Masks are tiny arrays of static shape, so events never recompile: the event is a `lax.cond`
branch compiled once with the step.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from effllm_jax.model import llama
from effllm_jax.model.llama import ModelConfig
from effllm_jax.pruning import compensate, groups, saliency
from effllm_jax.pruning.schedule import PruneSchedule
from effllm_jax.pruning.select import SelectConfig, select
from effllm_jax import sharding
from effllm_jax.losses import token_nll


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue: a plain pytree (checkpointed as is)."""

    step: jax.Array  # completed updates
    params: dict
    opt_state: Any
    masks: dict  # {'hidden': [D], 'heads': [L, H], 'ffn': [L, F]} bool
    saliency: dict  # group saliency summed since the last event (pruning/saliency.py)
    stats: dict = dataclasses.field(default_factory=dict)  # OBS input second moments since
    # the last event (pruning/compensate.py); {} unless prune.compensation='obs'


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The static facts the step is compiled for."""

    model: ModelConfig
    schedule: PruneSchedule
    select: SelectConfig
    criterion: str
    compensation: str = "none"  # 'none' | 'obs' (pruning/compensate.py)
    damping: float = 0.01  # OBS damping, relative to mean diag H
    obs_block: int = 0  # block-diagonal H with blocks of this size (0: full)

    @property
    def stats_block(self) -> int | None:
        """What the model is asked for: None (no statistics) or the H block size."""
        return self.obs_block if self.compensation == "obs" else None

    def zero_stats(self) -> dict:
        return {} if self.stats_block is None else compensate.zero_stats(self.model, self.obs_block)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int):
    """AdamW with warm-up + cosine decay and global-norm clipping; no decay on norm gains.

    Returns (optimizer, learning-rate schedule).
    """
    lr = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim.lr, warmup_steps=max(int(optim.warmup_steps), 1),
        decay_steps=max(int(total_steps), int(optim.warmup_steps) + 1),
        end_value=optim.lr * optim.min_lr_ratio)

    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key != "scale", params)

    tx = optax.chain(
        optax.clip_by_global_norm(optim.grad_clip),
        optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                    weight_decay=optim.weight_decay, mask=decay_mask))
    return tx, lr


def mask_tree(tree: dict, param_masks: dict) -> dict:
    """Zeroes the pruned entries of a params-shaped tree."""
    return jax.tree.map(lambda x, m: jnp.where(m, x, jnp.zeros((), x.dtype)), tree, param_masks)


def init_state(cfg: StepConfig, tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
    """A fresh dense state (jit it with out_shardings to create it directly sharded)."""
    params = llama.init_params(cfg.model, key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      masks=llama.full_masks(cfg.model), saliency=saliency.zeros(cfg.model),
                      stats=cfg.zero_stats())


def state_shardings(cfg: StepConfig, tx: optax.GradientTransformation, mesh, rules) -> TrainState:
    """Where every leaf of the state lives: params and Adam moments by logical axes,
    masks, saliency and counters replicated, OBS statistics like the weights' inputs."""
    abstract = jax.eval_shape(lambda: init_state(cfg, tx, jax.random.key(0)))
    params = sharding.tree_shardings(abstract.params, llama.param_axes(cfg.model), mesh, rules)
    rep = sharding.replicated(mesh)
    opt_state = optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state, params,
                                      transform_non_params=lambda _: rep)
    return TrainState(step=rep, params=params, opt_state=opt_state,
                      masks=jax.tree.map(lambda _: rep, abstract.masks),
                      saliency=jax.tree.map(lambda _: rep, abstract.saliency),
                      stats=sharding.tree_shardings(
                          abstract.stats, compensate.stats_axes(cfg.model, cfg.obs_block)
                          if abstract.stats else {}, mesh, rules))


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy (float32)."""
    total, count = token_nll(logits, targets)
    return total / count


def prune_event(state: TrainState, cfg: StepConfig, tx: optax.GradientTransformation) -> TrainState:
    """Shrinks the masks to this step's budget; removed weights and moments become zero."""
    budget = cfg.schedule.budget(state.step)
    masks = select(state.masks, state.saliency, cfg.model, budget, cfg.select)
    params = state.params
    if cfg.compensation == "obs":  # moments of moved weights are kept (compensate.py)
        params = compensate.compensate(params, state.masks, masks, state.stats, cfg.model,
                                       cfg.damping)
    pmask = groups.param_masks(masks, cfg.model)
    opt_state = optax.tree_map_params(
        tx, lambda x, m: jnp.where(m, x, jnp.zeros((), x.dtype)), state.opt_state, pmask,
        transform_non_params=lambda x: x)
    return state.replace(masks=masks, params=mask_tree(params, pmask), opt_state=opt_state,
                         saliency=saliency.zeros(cfg.model), stats=cfg.zero_stats())


def train_step(state: TrainState, batch: jax.Array, *, cfg: StepConfig,
               tx: optax.GradientTransformation) -> tuple[TrainState, dict]:
    """One update on a [B, T+1] token batch; returns the new state and scalar metrics."""
    inputs, targets = batch[:, :-1], batch[:, 1:]

    def loss_fn(params, stats_block=None):
        """Mean loss; with stats_block also the forward's input second moments (OBS)."""
        out = llama.apply(cfg.model, params, inputs, state.masks, stats_block)
        logits, batch_stats = (out, {}) if stats_block is None else out
        return cross_entropy(logits, targets), batch_stats

    def loss_and_grads(with_stats: bool):
        (loss, batch_stats), grads = jax.value_and_grad(
            lambda p: loss_fn(p, cfg.stats_block if with_stats else None), has_aux=True)(
                state.params)
        return loss, grads, compensate.accumulate(state.stats, batch_stats) if with_stats \
            else state.stats

    step = state.step + 1
    if cfg.stats_block is None:
        loss, grads, stats = loss_and_grads(False)
    else:  # statistics only inside the pruning window (lax.cond: no cost outside it)
        loss, grads, stats = jax.lax.cond(cfg.schedule.collecting(step),
                                          lambda: loss_and_grads(True),
                                          lambda: loss_and_grads(False))
    # Exactly zero already (masked activations); explicit so moments of pruned weights stay 0.
    grads = mask_tree(grads, groups.param_masks(state.masks, cfg.model))
    new_saliency = jax.lax.cond(
        cfg.schedule.collecting(step),
        lambda: saliency.accumulate(state.saliency,
                                    saliency.group_saliency(state.params, grads, cfg.criterion)),
        lambda: state.saliency)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    state = state.replace(step=step, params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state, saliency=new_saliency, stats=stats)
    is_event = cfg.schedule.is_event(step)
    state = jax.lax.cond(is_event, lambda s: prune_event(s, cfg, tx), lambda s: s, state)
    counts = groups.unit_counts(state.masks, cfg.model)
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "live_params": groups.count_params(state.masks, cfg.model),
        "pruning_event": is_event,
        "kept_heads": counts["heads"].sum(),
        "kept_ffn": counts["ffn"].sum(),
        "kept_hidden": counts["hidden"],
    }
    return state, metrics


def eval_loss(params: dict, masks: dict, batch: jax.Array, *, cfg: ModelConfig) -> jax.Array:
    """Mean next-token loss of the masked model on a [B, T+1] batch."""
    return cross_entropy(llama.apply(cfg, params, batch[:, :-1], masks), batch[:, 1:])
