"""The train state and the jit-compiled train step, with saliency and pruning inside it.

One step: loss and gradients of the masked model -> gradients of pruned weights zeroed ->
saliency accumulated (inside the pruning window) -> AdamW update -> on event steps, the
pruning event (select.py) shrinks the masks, records what went (history.py), zeroes the
removed weights and their Adam moments, and resets the saliency. Masks are tiny arrays of
static shape, so events never recompile: the event's decision is a `lax.cond` branch over
small arrays, compiled once with the step, and applying it is a select on every step, so no
params-sized array is copied through a branch (on a pod that copy is per-chip memory). With
`prune.compensation='obs'` the step also sums the input second moments of the prunable linear
layers inside the pruning window, and the event first moves the kept weights
to make up for the removed inputs (pruning/compensate.py). With distillation (distill.py) the
loss mixes in a frozen teacher's logits; the learning rate follows the run's phases (phases.py).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from effllm_jax.model import llama
from effllm_jax.model.llama import ModelConfig
from effllm_jax.pruning import compensate, groups, history, saliency
from effllm_jax.pruning.schedule import PruneSchedule
from effllm_jax.pruning.select import SelectConfig, select_with_record
from effllm_jax import distill, integrity, phases, sharding
from effllm_jax.losses import token_nll, unembed_nll


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue: a plain pytree (checkpointed as is)."""

    step: jax.Array  # completed updates
    params: dict
    opt_state: Any
    masks: dict  # {'hidden': [D], 'heads': [L, H], 'ffn': [L, F]} bool
    saliency: dict  # group saliency summed since the last event (pruning/saliency.py)
    history: dict  # per unit: step, group type and score of its removal (pruning/history.py)
    teacher: Any = None  # distillation's frozen teacher {'params', 'masks'} (distill.py)
    stats: dict = dataclasses.field(default_factory=dict)  # OBS input second moments since
    # the last event (pruning/compensate.py); {} unless prune.compensation='obs'
    bad_steps: dict = dataclasses.field(default_factory=integrity.zero_counters)  # skipped
    # non-finite steps: current run, longest run, total (integrity.py)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The static facts the step is compiled for."""

    model: ModelConfig
    schedule: PruneSchedule
    select: SelectConfig
    criterion: str
    adam_b2: float = 0.95  # Adam's b2: bias correction of the Fisher estimate (saliency.py)
    distill: distill.DistillConfig | None = None
    compensation: str = "none"  # 'none' | 'obs' (pruning/compensate.py)
    damping: float = 0.01  # OBS damping, relative to mean diag H
    obs_block: int = 0  # block-diagonal H with blocks of this size (0: full)
    loss_chunk: int = 0  # positions of logits per piece of the loss (0: the whole sequence)
    grad_accum_steps: int = 1  # microbatches per update, summed by a lax.scan inside the step

    @property
    def stats_block(self) -> int | None:
        """What the model is asked for: None (no statistics) or the H block size."""
        return self.obs_block if self.compensation == "obs" else None

    def zero_stats(self) -> dict:
        return {} if self.stats_block is None else compensate.zero_stats(self.model, self.obs_block)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int,
                   lr: optax.Schedule | None = None):
    """AdamW with global-norm clipping, no decay on norm gains, and the learning rate `lr`
    (default: warm-up + cosine decay over `total_steps`; phases.lr_schedule for a run).

    Returns (optimizer, learning-rate schedule).
    """
    lr = phases.pruning_schedule(optim, total_steps) if lr is None else lr

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
    masks = llama.full_masks(cfg.model)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      masks=masks, saliency=saliency.zeros(cfg.model, cfg.criterion),
                      history=history.empty(cfg.model),
                      teacher=distill.init_slot(cfg.distill, params, masks),
                      stats=cfg.zero_stats())


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
                      history=jax.tree.map(lambda _: rep, abstract.history),
                      bad_steps=jax.tree.map(lambda _: rep, abstract.bad_steps),
                      teacher=distill.slot_shardings(cfg.distill, abstract.teacher, mesh, rules),
                      stats=sharding.tree_shardings(
                          abstract.stats, compensate.stats_axes(cfg.model, cfg.obs_block)
                          if abstract.stats else {}, mesh, rules))


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
    masks, record = event_decision(state, cfg, sequences)
    if cfg.compensation == "obs":
        state = state.replace(params=compensated_params(state, masks, cfg))
    return apply_event(state, masks, record, cfg, tx, True)


def compensated_params(state: TrainState, masks: dict, cfg: StepConfig) -> dict:
    """The params with the kept weights moved to make up for what `masks` removes (OBS,
    compensate.py); the moments of moved weights are kept."""
    return compensate.compensate(state.params, state.masks, masks, state.stats, cfg.model,
                                 cfg.damping)


def event_decision(state: TrainState, cfg: StepConfig, sequences: int) -> tuple[dict, dict]:
    """What an event decides: the new masks and the history with its removals recorded.
    Only mask- and history-sized arrays come out, so the step can branch on it cheaply."""
    budget = cfg.schedule.budget(state.step)
    fisher = (_adam_fisher(state.opt_state, cfg, sequences)
              if cfg.criterion in ("fisher", "taylor_fisher") else None)
    scores = saliency.event_saliency(state.saliency, state.params, cfg.criterion, fisher)
    masks, removed = select_with_record(state.masks, scores, cfg.model, budget, cfg.select)
    return masks, history.record(state.history, removed, state.step)


def apply_event(state: TrainState, masks: dict, record: dict, cfg: StepConfig,
                tx: optax.GradientTransformation, is_event: jax.Array | bool) -> TrainState:
    """Installs `masks` and `record`: zeroes the weights and Adam moments they remove and, where
    `is_event`, restarts the window's accumulators. Selects, not a branch, so every params-sized
    array is updated in place (a lax.cond over the state gives each its own output buffer: per
    chip, a second copy of params, moments and Σg). Between events `masks` are the current
    ones, whose pruned entries are already exactly zero, so this leaves every value unchanged."""
    pmask = groups.param_masks(masks, cfg.model)
    opt_state = optax.tree_map_params(tx, lambda x, m: jnp.where(m, x, jnp.zeros((), x.dtype)),
                                      state.opt_state, pmask, transform_non_params=lambda x: x)
    restart = functools.partial(jax.tree.map, lambda zero, x: jnp.where(is_event, zero, x))
    return state.replace(masks=masks, params=mask_tree(state.params, pmask), opt_state=opt_state,
                         saliency=restart(saliency.zeros(cfg.model, cfg.criterion),
                                      state.saliency),
                         history=record, stats=restart(cfg.zero_stats(), state.stats))


def train_step(state: TrainState, batch: jax.Array, *, cfg: StepConfig,
               tx: optax.GradientTransformation) -> tuple[TrainState, dict]:
    """One update on a [B, T+1] token batch; returns the new state and scalar metrics."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    step = state.step + 1
    kd = cfg.distill
    if kd is not None:
        state = state.replace(teacher=distill.snapshot(state.teacher, state.params, state.masks,
                                                       step, kd))
        teacher_logits, distilling = distill.teacher_logits(state.teacher, inputs, step, kd)

    def loss_fn(params, inputs, targets, teacher_logits, stats_block=None):
        """(objective, (loss parts, the forward's input second moments when stats_block))."""
        out = llama.hidden_states(cfg.model, params, inputs, state.masks, stats_block)
        hidden, batch_stats = (out, {}) if stats_block is None else out
        if kd is None:
            return hidden_nll(cfg.model, params, hidden, targets, cfg.loss_chunk), ({}, batch_stats)
        logits = llama.logits_from_hidden(cfg.model, params, hidden)
        objective, parts = distill.distill_loss(logits, teacher_logits, targets, kd.alpha,
                                                kd.temperature, distilling)
        return objective, (parts, batch_stats)

    def loss_and_grads(with_stats: bool):
        def micro(inputs, targets, teacher_logits):
            (loss, (parts, batch_stats)), grads = jax.value_and_grad(
                lambda p: loss_fn(p, inputs, targets, teacher_logits,
                                  cfg.stats_block if with_stats else None), has_aux=True)(
                    state.params)
            return loss, parts, grads, batch_stats

        rows = (inputs, targets, teacher_logits if kd is not None else None)
        if cfg.grad_accum_steps == 1:
            loss, parts, grads, batch_stats = micro(*rows)
        else:
            loss, parts, grads, batch_stats = accumulate_microbatches(micro, rows,
                                                                      cfg.grad_accum_steps)
        stats = compensate.accumulate(state.stats, batch_stats) if with_stats else state.stats
        return loss, parts, grads, stats

    if cfg.stats_block is None:
        loss, parts, grads, stats = loss_and_grads(False)
    else:  # statistics only inside the pruning window (lax.cond: no cost outside it)
        loss, parts, grads, stats = jax.lax.cond(cfg.schedule.collecting(step),
                                                 lambda: loss_and_grads(True),
                                                 lambda: loss_and_grads(False))
    # Exactly zero already (masked activations); explicit so moments of pruned weights stay 0.
    grads = mask_tree(grads, groups.param_masks(state.masks, cfg.model))
    new_saliency = saliency.accumulate_in_window(state.saliency, state.params, grads,
                                                 cfg.criterion, cfg.schedule.collecting(step))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    grad_norm = optax.tree.norm(grads)
    # A non-finite loss or gradient skips the update: params, Adam state (and so its counters
    # and the learning rate's position), saliency and statistics stay as they were; the step
    # (hence the data position) advances. An event on a skipped step still prunes, from the
    # state as it was, so the architecture follows the schedule.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updated = (optax.apply_updates(state.params, updates), opt_state, new_saliency, stats)
    params, opt_state, new_saliency, stats = integrity.keep_if_finite(
        finite, updated, (state.params, state.opt_state, state.saliency, state.stats))
    state = state.replace(step=step, params=params, opt_state=opt_state, saliency=new_saliency,
                          stats=stats, bad_steps=integrity.count_bad_steps(state.bad_steps, ~finite))
    # The event: its decision is a branch over small arrays; applying it is a select on every
    # step (apply_event), so no params-sized array passes through a branch.
    is_event = cfg.schedule.is_event(step)
    masks, record = jax.lax.cond(is_event, lambda: event_decision(state, cfg, batch.shape[0]),
                                 lambda: (state.masks, state.history))
    if cfg.compensation == "obs":  # moves kept weights: a params-sized branch, only with OBS
        state = state.replace(params=jax.lax.cond(
            is_event, lambda: compensated_params(state, masks, cfg), lambda: state.params))
    state = apply_event(state, masks, record, cfg, tx, is_event)
    counts = groups.unit_counts(state.masks, cfg.model)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "bad_step": ~finite,
        "bad_steps_longest": state.bad_steps["longest"],
        "bad_steps_total": state.bad_steps["total"],
        "live_params": groups.count_params(state.masks, cfg.model),
        "pruning_event": is_event,
        "kept_heads": counts["heads"].sum(),
        "kept_ffn": counts["ffn"].sum(),
        "kept_hidden": counts["hidden"],
    }
    if kd is not None:  # "loss" stays the cross-entropy; the objective is reported beside it
        metrics.update(loss=parts["ce"], distill_objective=loss, distill_kl=parts["kl"],
                       distill_active=distilling)
    return state, metrics


def accumulate_microbatches(fn, rows: tuple, steps: int):
    """(loss, parts, grads, statistics) of `fn` over the whole batch from `steps` microbatches
    run one after another by a lax.scan (one microbatch's activations live at a time): loss,
    parts and gradients are the microbatch means (equal token counts, so the batch mean),
    second moments are summed. Microbatch i holds rows i, i + steps, ..., so every batch shard
    contributes its own rows to each microbatch and no row moves between devices."""

    def split(x):  # [B, ...] -> [steps, B / steps, ...]
        x = x.reshape(x.shape[0] // steps, steps, *x.shape[1:])
        return sharding.constrain(jnp.moveaxis(x, 1, 0), (None, "batch") + (None,) * (x.ndim - 2))

    micro_rows = jax.tree.map(split, rows)
    shapes = jax.eval_shape(fn, *jax.tree.map(lambda x: x[0], micro_rows))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    totals, _ = jax.lax.scan(lambda total, xs: (jax.tree.map(jnp.add, total, fn(*xs)), None),
                             zeros, micro_rows)
    loss, parts, grads, stats = totals
    mean = functools.partial(jax.tree.map, lambda x: x / steps)
    return mean(loss), mean(parts), mean(grads), stats


def model_loss(cfg: ModelConfig, params: dict, masks: dict, inputs: jax.Array,
               targets: jax.Array, loss_chunk: int = 0) -> jax.Array:
    """Mean next-token cross-entropy of the masked model, `loss_chunk` positions of logits
    at a time (0: all at once)."""
    return hidden_nll(cfg, params, llama.hidden_states(cfg, params, inputs, masks), targets,
                      loss_chunk)


def hidden_nll(cfg: ModelConfig, params: dict, hidden: jax.Array, targets: jax.Array,
               loss_chunk: int) -> jax.Array:
    """Mean next-token cross-entropy from final hidden states, unembedding `loss_chunk`
    positions at a time, so the whole [B, T, V] logits never exist at once (losses.unembed_nll:
    the unembedding and the loss fused under one gradient)."""
    table = params["embed"] if cfg.tie_embeddings else params["lm_head"].T
    total, count = unembed_nll(hidden, table, targets, loss_chunk)
    return total / count


def eval_loss(params: dict, masks: dict, batch: jax.Array, *, cfg: ModelConfig,
              loss_chunk: int = 0) -> jax.Array:
    """Mean next-token loss of the masked model on a [B, T+1] batch."""
    return model_loss(cfg, params, masks, batch[:, :-1], batch[:, 1:], loss_chunk)
