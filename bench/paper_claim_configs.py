"""Configs of the paper-claim grid (bench/paper_claim.py): one source, one budget, five arms.

Every arm trains for the same number of steps of the same batch shape, so the same tokens:
  a  pruning-aware pretraining of the source to the target (`pruning_aware`)
  b  the architecture (a) found, trained from scratch at fixed masks (`fixed_architecture`)
  c  a hand-designed uniform Llama of the same parameter count (`uniform`)
  d  the source trained dense for (a)'s pruning span, one-shot Taylor pruning, then the rest
     of the budget at the fixed architecture (`dense` + prune_posthoc + `posthoc_continued`)
  e  (a) plus distillation from the source as it enters the first event (`distilled`)
`Grid.cpu()` fits a 2-core machine; `Grid.scale()` is the same grid for one GPU/TPU host.
"""
from __future__ import annotations

import dataclasses

import ml_collections

from effllm_jax.config import base_config
from effllm_jax.model.llama import ModelConfig
from effllm_jax.pruning import groups

# Real text: Austen and the Python documentation, half each; held out (never trained on):
# the novel Persuasion and the Python tutorial.
SOURCES = ("austen", "python_docs")
HELDOUT = {"novel": "austen/persuasion", "docs": "python_docs/tutorial/*"}


@dataclasses.dataclass(frozen=True)
class Grid:
    """Sizes of one grid: the source model, the budget and the pruning schedule of (a)."""

    name: str
    model: dict  # the source's shape
    uniform_model: dict  # (c)'s shape, without ffn_dim (solved to match the target)
    target_fraction: float
    steps: int  # every arm's budget, in steps of global_batch x seq_len tokens
    global_batch: int
    seq_len: int
    warmup_steps: int  # (a): dense steps before the first event
    prune_steps: int  # (a): steps over which the budget falls to the target
    every: int
    vocab_size: int = 4096
    lr: float = 3e-3

    @classmethod
    def cpu(cls) -> "Grid":
        """A 0.64M-parameter source pruned to 40%, 0.41M tokens per arm (a shared 2-core CPU)."""
        return cls("cpu", model=dict(d_model=96, num_layers=4, num_heads=8, num_kv_heads=4,
                                     head_dim=12, ffn_dim=288, scan_layers=False),
                   uniform_model=dict(d_model=64, num_layers=4, num_heads=4, num_kv_heads=2,
                                      head_dim=16, scan_layers=False),
                   target_fraction=0.4, steps=200, global_batch=16, seq_len=128,
                   warmup_steps=30, prune_steps=100, every=20, vocab_size=2048)

    @classmethod
    def smoke(cls) -> "Grid":
        """Seconds per arm: checks that every arm and the report run end to end."""
        return cls("smoke", model=dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                       head_dim=8, ffn_dim=64, scan_layers=False),
                   uniform_model=dict(d_model=24, num_layers=2, num_heads=2, num_kv_heads=1,
                                      head_dim=8, scan_layers=False),
                   target_fraction=0.7, steps=12, global_batch=8, seq_len=32,
                   warmup_steps=3, prune_steps=6, every=2, vocab_size=2048)

    @classmethod
    def scale(cls) -> "Grid":
        """A ~60M-parameter source pruned to 40%, ~1.3B tokens per arm (one GPU/TPU host)."""
        return cls("scale", model=dict(d_model=512, num_layers=12, num_heads=8, num_kv_heads=4,
                                       head_dim=64, ffn_dim=2048, scan_layers=True,
                                       dtype="bfloat16"),
                   uniform_model=dict(d_model=384, num_layers=10, num_heads=6, num_kv_heads=3,
                                      head_dim=64, scan_layers=True, dtype="bfloat16"),
                   target_fraction=0.4, steps=20_000, global_batch=128, seq_len=512,
                   warmup_steps=2_000, prune_steps=10_000, every=200, vocab_size=16384, lr=1e-3)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    @property
    def dense_steps(self) -> int:
        """(d)'s dense phase: as long as (a) takes to reach its target."""
        return self.warmup_steps + self.prune_steps


def _base(grid: Grid, seed: int) -> ml_collections.ConfigDict:
    """Data, batch, optimizer and logging shared by every arm."""
    c = base_config()
    c.model.update(vocab_size=grid.vocab_size, **grid.model)
    c.data.sources = SOURCES
    c.data.weights = (0.5, 0.5)
    c.data.heldout = tuple(HELDOUT.values())
    c.data.tokenizer.vocab_size = grid.vocab_size
    c.optim.lr = grid.lr
    c.train.update(steps=grid.steps, global_batch=grid.global_batch, seq_len=grid.seq_len,
                   seed=seed, log_every=10, eval_every=max(grid.steps // 6, 1), eval_batches=8,
                   checkpoint_every=max(grid.steps // 3, 1), keep_checkpoints=1)
    return c


def no_pruning(c: ml_collections.ConfigDict, steps: int) -> None:
    """One no-op event at the last step: the trainer's way of training at a fixed width."""
    c.prune.update(target_fraction=1.0, target_params=0, warmup_steps=steps - 1, prune_steps=1,
                   every=1, compensation="none")


def pruning_aware(grid: Grid, seed: int, **prune) -> ml_collections.ConfigDict:
    """(a): the source pruned to the target while it trains; `prune` overrides settings."""
    c = _base(grid, seed)
    c.prune.update(target_fraction=grid.target_fraction, warmup_steps=grid.warmup_steps,
                   prune_steps=grid.prune_steps, every=grid.every)
    c.prune.update(**prune)
    return c


def distilled(grid: Grid, seed: int, alpha: float = 0.5, **prune) -> ml_collections.ConfigDict:
    """(e): (a) plus distillation from the source as it enters the first event."""
    c = pruning_aware(grid, seed, **prune)
    c.distill.update(teacher="source_at_first_event", alpha=alpha, phases=("pruning",))
    return c


def dense(grid: Grid, seed: int) -> ml_collections.ConfigDict:
    """(d)'s first phase: the source trained dense for `grid.dense_steps`."""
    c = _base(grid, seed)
    c.train.steps = grid.dense_steps
    c.train.eval_every = max(grid.dense_steps // 4, 1)
    no_pruning(c, grid.dense_steps)
    return c


def uniform_model(grid: Grid, target: int) -> dict:
    """(c)'s shape: the hand-designed widths with the FFN width that best matches `target`."""
    base = dict(vocab_size=grid.vocab_size, **grid.uniform_model)
    def params(ffn: int) -> int:
        return groups.dense_params(ModelConfig(**base, ffn_dim=ffn))
    per_channel = params(2) - params(1)
    ffn = max(1, round((target - params(0 + 1)) / per_channel) + 1)
    return dict(base, ffn_dim=ffn)


def uniform(grid: Grid, seed: int, target: int) -> ml_collections.ConfigDict:
    """(c): a uniform Llama with ~`target` parameters, trained from scratch."""
    c = _base(grid, seed)
    c.model.update(**uniform_model(grid, target))
    no_pruning(c, grid.steps)
    return c


def source_params(grid: Grid) -> int:
    """The source model's parameter count."""
    return groups.dense_params(ModelConfig(vocab_size=grid.vocab_size, **grid.model))


def target_params(grid: Grid) -> int:
    """The parameter budget every small arm meets (the source's count times the fraction)."""
    return int(source_params(grid) * grid.target_fraction)
