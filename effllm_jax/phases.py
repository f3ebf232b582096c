"""The phases of a run and its one learning-rate schedule.

A run has up to two phases, one after the other:
  pruning    steps 1 .. train.steps: dense warm-up, pruning events, then the fixed architecture;
             learning rate: warm-up + cosine over the phase (`optim.*`).
  continued  steps train.steps+1 .. train.steps+continued.steps (only when continued.steps > 0):
             continued pretraining at the final architecture, with its own schedule: the rate
             re-warms from where the pruning phase ended to `continued.lr`, then decays by
             cosine, or by WSD (warmup-stable-decay: flat, then linear decay over the last
             `decay_fraction` of the phase), to `continued.lr * continued.min_lr_ratio`.
The phases are joined into one optax schedule (`optax.join_schedules`), a pure function of the
optimizer's step count, so the jitted step stays one compilation and resume stays exact. The
phase spans are recorded in every checkpoint's architecture spec (arch.PhaseSpan).
"""
from __future__ import annotations

import ml_collections
import optax

from effllm_jax.arch import PhaseSpan

PHASES = ("pruning", "continued")
SCHEDULES = ("cosine", "wsd")


def total_steps(config: ml_collections.ConfigDict) -> int:
    """Steps of the whole run: the pruning phase plus continued pretraining."""
    return int(config.train.steps) + int(config.continued.steps)


def spans(config: ml_collections.ConfigDict) -> tuple[PhaseSpan, ...]:
    """The phases of a run with their (1-based, inclusive) step ranges."""
    pruning_end = int(config.train.steps)
    out = (PhaseSpan("pruning", 1, pruning_end),)
    if int(config.continued.steps) > 0:
        out += (PhaseSpan("continued", pruning_end + 1, total_steps(config)),)
    return out


def pruning_schedule(optim: ml_collections.ConfigDict, steps: int) -> optax.Schedule:
    """Warm-up + cosine decay over the pruning phase (the whole run when there is no other)."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim.lr, warmup_steps=max(int(optim.warmup_steps), 1),
        decay_steps=max(int(steps), int(optim.warmup_steps) + 1),
        end_value=optim.lr * optim.min_lr_ratio)


def continued_peak_lr(config: ml_collections.ConfigDict) -> float:
    """The continued phase's peak rate (`continued.lr`, or `optim.lr` when that is 0)."""
    return float(config.continued.lr) or float(config.optim.lr)


def continued_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Re-warm from the pruning phase's final rate, then cosine or WSD decay (count from 0)."""
    c, optim = config.continued, config.optim
    start = float(optim.lr) * float(optim.min_lr_ratio)
    peak = continued_peak_lr(config)
    end = peak * float(c.min_lr_ratio)
    steps, warmup = int(c.steps), int(c.warmup_steps)
    if c.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(init_value=start, peak_value=peak,
                                                  warmup_steps=warmup, decay_steps=steps,
                                                  end_value=end)
    decay = wsd_decay_steps(config)
    return optax.join_schedules(
        [optax.linear_schedule(start, peak, warmup), optax.constant_schedule(peak),
         optax.linear_schedule(peak, end, decay)],
        [warmup, steps - decay])


def wsd_decay_steps(config: ml_collections.ConfigDict) -> int:
    """Length of WSD's final decay: `decay_fraction` of the continued phase, at least 1 step."""
    c = config.continued
    return max(1, round(float(c.decay_fraction) * int(c.steps)))


def lr_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """The learning rate of the whole run as one schedule of the optimizer's update count."""
    first = pruning_schedule(config.optim, config.train.steps)
    if int(config.continued.steps) <= 0:
        return first  # exactly the single-phase schedule
    # Update k (1-based step k) reads count k-1, so count train.steps is the first continued step.
    return optax.join_schedules([first, continued_schedule(config)], [int(config.train.steps)])


def describe(config: ml_collections.ConfigDict) -> str:
    """One line naming the phases (empty when there is only the pruning phase)."""
    if int(config.continued.steps) <= 0:
        return ""
    c = config.continued
    return (f"continued pretraining: steps {config.train.steps + 1}-{total_steps(config)} "
            f"({c.schedule}, re-warm over {c.warmup_steps} steps to lr "
            f"{continued_peak_lr(config):g})")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first illegal `continued.*` setting."""
    c = config.continued
    steps, warmup = int(c.steps), int(c.warmup_steps)
    if steps < 0:
        raise ValueError(f"continued.steps={c.steps} must be >= 0 (0: no continued pretraining)")
    if c.schedule not in SCHEDULES:
        raise ValueError(f"continued.schedule={c.schedule!r}; expected one of {SCHEDULES}")
    if float(c.lr) < 0:
        raise ValueError(f"continued.lr={c.lr} must be >= 0 (0: optim.lr)")
    if not 0.0 <= float(c.min_lr_ratio) <= 1.0:
        raise ValueError(f"continued.min_lr_ratio={c.min_lr_ratio} must be in [0, 1]")
    if not 0.0 < float(c.decay_fraction) <= 1.0:
        raise ValueError(f"continued.decay_fraction={c.decay_fraction} must be in (0, 1]")
    if warmup < 0:
        raise ValueError(f"continued.warmup_steps={c.warmup_steps} must be >= 0")
    if steps == 0:
        return
    if warmup >= steps:
        raise ValueError(f"continued.warmup_steps={warmup} leaves no decay in "
                         f"continued.steps={steps}")
    if c.schedule == "wsd" and warmup + wsd_decay_steps(config) > steps:
        raise ValueError(f"continued: warm-up ({warmup}) plus WSD decay "
                         f"({wsd_decay_steps(config)} = decay_fraction {c.decay_fraction} of "
                         f"{steps}) is longer than continued.steps={steps}")
    # Starting before the last event is refused by pruning/validate.py (train.steps >= it).
