"""The train state and the jit-compiled train step, with saliency and pruning inside it.

One step: loss and gradients of the masked model -> gradients of pruned weights zeroed ->
saliency accumulated (inside the pruning window) -> AdamW update -> on event steps, the
pruning event (select.py) shrinks the masks, records what went (history.py), zeroes the
removed weights and their Adam moments, and resets the saliency. Masks are tiny arrays of
static shape, so events never recompile: the event is a `lax.cond` branch compiled once with
the step.
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
from effllm_jax.pruning import groups, history, saliency
from effllm_jax.pruning.schedule import PruneSchedule
from effllm_jax.pruning.select import SelectConfig, select_with_record
from effllm_jax import sharding
from effllm_jax.losses import chunked_token_nll, token_nll


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue: a plain pytree (checkpointed as is)."""

    step: jax.Array  # completed updates
    params: dict
    opt_state: Any
    masks: dict  # {'hidden': [D], 'heads': [L, H], 'ffn': [L, F]} bool
    saliency: dict  # group saliency summed since the last event (pruning/saliency.py)
    history: dict  # per unit: step, group type and score of its removal (pruning/history.py)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The static facts the step is compiled for."""

    model: ModelConfig
    schedule: PruneSchedule
    select: SelectConfig
    criterion: str
    adam_b2: float = 0.95  # Adam's b2: bias correction of the Fisher estimate (saliency.py)
    loss_chunk: int = 0  # positions of logits per piece of the loss (0: the whole sequence)


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
                      masks=llama.full_masks(cfg.model),
                      saliency=saliency.zeros(cfg.model, cfg.criterion),
                      history=history.empty(cfg.model))


def state_shardings(cfg: StepConfig, tx: optax.GradientTransformation, mesh, rules) -> TrainState:
    """Where every leaf of the state lives: params, Adam moments and Σg by logical axes;
    masks, group saliency, history and counters replicated."""
    abstract = jax.eval_shape(lambda: init_state(cfg, tx, jax.random.key(0)))
    params = sharding.tree_shardings(abstract.params, llama.param_axes(cfg.model), mesh, rules)
    rep = sharding.replicated(mesh)
    opt_state = optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state, params,
                                      transform_non_params=lambda _: rep)
    sal = {k: (params if k == "grad_sum" else jax.tree.map(lambda _: rep, v))
           for k, v in abstract.saliency.items()}
    return TrainState(step=rep, params=params, opt_state=opt_state,
                      masks=jax.tree.map(lambda _: rep, abstract.masks), saliency=sal,
                      history=jax.tree.map(lambda _: rep, abstract.history))


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy (float32)."""
    total, count = token_nll(logits, targets)
    return total / count


def _adam_fisher(opt_state: Any, cfg: StepConfig, sequences: int) -> dict:
    """The diagonal Fisher estimate (saliency.adam_fisher) from Adam's state."""
    adam = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(
        x, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)]
    if not adam:
        raise ValueError(f"prune.criterion={cfg.criterion!r} reads its Fisher estimate from "
                         f"Adam's second moment, but the optimizer has no Adam state")
    return saliency.adam_fisher(adam[0].nu, adam[0].count, cfg.adam_b2, float(sequences))


def prune_event(state: TrainState, cfg: StepConfig, tx: optax.GradientTransformation,
                sequences: int = 1) -> TrainState:
    """Shrinks the masks to this step's budget; removed weights and moments become zero.
    `sequences` (per batch) scales the Fisher estimate of the second-order criteria."""
    budget = cfg.schedule.budget(state.step)
    fisher = (_adam_fisher(state.opt_state, cfg, sequences)
              if cfg.criterion in ("fisher", "taylor_fisher") else None)
    scores = saliency.event_saliency(state.saliency, state.params, cfg.criterion, fisher)
    masks, removed = select_with_record(state.masks, scores, cfg.model, budget, cfg.select)
    pmask = groups.param_masks(masks, cfg.model)
    opt_state = optax.tree_map_params(
        tx, lambda x, m: jnp.where(m, x, jnp.zeros((), x.dtype)), state.opt_state, pmask,
        transform_non_params=lambda x: x)
    return state.replace(masks=masks, params=mask_tree(state.params, pmask), opt_state=opt_state,
                         saliency=saliency.zeros(cfg.model, cfg.criterion),
                         history=history.record(state.history, removed, state.step))


def train_step(state: TrainState, batch: jax.Array, *, cfg: StepConfig,
               tx: optax.GradientTransformation) -> tuple[TrainState, dict]:
    """One update on a [B, T+1] token batch; returns the new state and scalar metrics."""
    inputs, targets = batch[:, :-1], batch[:, 1:]

    def loss_fn(params):
        return model_loss(cfg.model, params, state.masks, inputs, targets, cfg.loss_chunk)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    # Exactly zero already (masked activations); explicit so moments of pruned weights stay 0.
    grads = mask_tree(grads, groups.param_masks(state.masks, cfg.model))
    step = state.step + 1
    new_saliency = jax.lax.cond(
        cfg.schedule.collecting(step),
        lambda: saliency.accumulate(state.saliency, state.params, grads, cfg.criterion),
        lambda: state.saliency)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    state = state.replace(step=step, params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state, saliency=new_saliency)
    is_event = cfg.schedule.is_event(step)
    state = jax.lax.cond(is_event, lambda s: prune_event(s, cfg, tx, batch.shape[0]),
                         lambda s: s, state)
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


def model_loss(cfg: ModelConfig, params: dict, masks: dict, inputs: jax.Array,
               targets: jax.Array, loss_chunk: int = 0) -> jax.Array:
    """Mean next-token cross-entropy of the masked model, `loss_chunk` positions of logits
    at a time (0: all at once)."""
    hidden = llama.hidden_states(cfg, params, inputs, masks)
    total, count = chunked_token_nll(
        hidden, targets, lambda h: llama.logits_from_hidden(cfg, params, h), loss_chunk)
    return total / count


def eval_loss(params: dict, masks: dict, batch: jax.Array, *, cfg: ModelConfig,
              loss_chunk: int = 0) -> jax.Array:
    """Mean next-token loss of the masked model on a [B, T+1] batch."""
    return model_loss(cfg, params, masks, batch[:, :-1], batch[:, 1:], loss_chunk)
