"""The run configuration: one schema with defaults, and the one place that says what is legal.

Experiment files in configs/ start from `base_config()` and override fields; the CLI
overrides any field with --config.a.b=value. `validate` runs before anything compiles and
names the first problem it finds.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re

import ml_collections

from effllm_jax import data as data_lib
from effllm_jax import compaction, compiler_options, distill, init_from, phases, sharding
from effllm_jax.model import attention
from effllm_jax.model.llama import REMAT_POLICIES, ModelConfig
from effllm_jax.pruning import groups, select
from effllm_jax.pruning import validate as prune_validate


def base_config() -> ml_collections.ConfigDict:
    """Every field a run reads, with defaults (a tiny model, for a quick CPU run)."""
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dataclasses.asdict(ModelConfig(
        vocab_size=4096, d_model=128, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=16,
        ffn_dim=384)))
    c.data = data_lib.default_data_config()
    c.prune = ml_collections.ConfigDict(dict(
        target_params=0,  # absolute live-parameter budget; or set target_fraction
        target_fraction=0.5,  # budget as a fraction of the dense count (used when target_params=0)
        warmup_steps=100,  # dense steps before the first event
        prune_steps=200,  # steps over which the budget falls linearly to the target
        every=20,  # one pruning event every N steps
        criterion="taylor",  # taylor | taylor_acc | fisher | taylor_fisher (pruning/saliency.py)
        reduction="mean",  # mean (per live parameter) | sum
        uniform_layers=False,  # True: equal head/KV/FFN widths and GQA grouping in every layer
        group_types=select.DEFAULT_GROUP_TYPES,  # + kv_groups, attn_blocks, mlp_blocks
        rounds=3,  # unused: an event's passes repeat until the budget holds
        round_to=1,  # FFN and hidden widths stay multiples of this (e.g. 8, 64, 128)
        min_heads_per_layer=1,  # floors: only attn_blocks / mlp_blocks may empty a layer
        min_ffn=1,
        min_hidden=1,
        compensation="none",  # none | obs: OBS weight update at each event (pruning/compensate.py)
        damping=0.01,  # OBS damping, relative to the mean diagonal of H
        obs_block=0,  # OBS input second moments block-diagonal with this block (0: full H)
        compact_at=(),  # compact the state when the budget falls to these fractions of the
        # source's parameters, e.g. (0.75, 0.5) (effllm_jax/compaction.py); () never
        compact_after_last_event=False,  # True: also compact right after the last event
    ))
    c.optim = ml_collections.ConfigDict(dict(
        lr=3e-3, min_lr_ratio=0.1, warmup_steps=50, weight_decay=0.1, b1=0.9, b2=0.95,
        eps=1e-8, grad_clip=1.0))
    c.continued = ml_collections.ConfigDict(dict(  # continued pretraining (phases.py)
        steps=0,  # steps after train.steps at the final architecture (0: none)
        lr=0.0,  # peak learning rate of the phase (0: optim.lr)
        warmup_steps=20,  # re-warm from the pruning phase's final rate to lr
        schedule="cosine",  # cosine | wsd (warmup-stable-decay)
        decay_fraction=0.2,  # wsd: the final fraction of the phase that decays linearly
        min_lr_ratio=0.1,  # the rate ends at lr * min_lr_ratio
    ))
    c.distill = ml_collections.ConfigDict(dict(  # knowledge distillation (distill.py)
        teacher="",  # '' (off) | 'source_at_first_event' | a run dir, export or .gguf path
        alpha=0.5,  # loss = alpha * CE + (1 - alpha) * T^2 * KL(teacher || student)
        temperature=1.0,
        phases=("pruning", "continued"),  # the phases that distil
    ))
    c.train = ml_collections.ConfigDict(dict(
        steps=400, global_batch=16, seq_len=128, seed=0, log_every=10,
        checkpoint_every=100, keep_checkpoints=3, peak_flops_per_device=0.0,
        eval_every=100,  # held-out loss every N steps and at the end (0: never)
        eval_batches=8,
        eval_tasks=(),  # zero-shot tasks scored during training, e.g. ('arc_easy', 'piqa')
        eval_tasks_every=0,  # every N steps and at the end (0: never)
        eval_tasks_limit=200,  # first N items of each task
        loss_chunk=512,  # positions of logits per piece of the loss (0: whole sequence at once)
        init_from="",  # '' (random init) | a .gguf, HF dir, export or run dir (init_from.py)
        max_bad_steps=20,  # non-finite steps in a row (skipped) before the run stops (integrity.py)
        grad_accum_steps=1,  # microbatches per update (global_batch / this rows each, summed)
        tpu_compiler_options=""))  # 'xla_name=value,...' for TPU compiles (compiler_options.py)
    c.mesh = ml_collections.ConfigDict(dict(
        shape=(-1, 1, 1),  # (data, fsdp, tensor); one -1 fills the remaining devices
        rules=sharding.DEFAULT_RULES,
    ))
    return c


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The frozen model config of a run."""
    return ModelConfig.from_config(config.model)


def select_config(config: ml_collections.ConfigDict) -> select.SelectConfig:
    """How the run's pruning events choose what to remove."""
    return prune_validate.select_config(config.prune)


def compensation_fields(config: ml_collections.ConfigDict) -> dict:
    """The StepConfig fields of OBS compensation (defaults for runs saved before they existed)."""
    p = config.prune
    return {"compensation": str(p.get("compensation", "none")),
            "damping": float(p.get("damping", 0.01)), "obs_block": int(p.get("obs_block", 0))}


def target_params(config: ml_collections.ConfigDict) -> int:
    """The absolute live-parameter budget of a run."""
    return prune_validate.target_params(config.prune, model_config(config))


def field_names(config: ml_collections.ConfigDict) -> list[str]:
    """Every field of `config` as a dotted name ('train.steps', 'data.tokenizer.vocab_size')."""
    names = []
    for key, value in config.items():
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            names += [f"{key}.{sub}" for sub in field_names(ml_collections.ConfigDict(value))]
        else:
            names.append(key)
    return names


def check_field_name(dotted: str, known: list[str] | None = None) -> None:
    """Raises ValueError naming an unknown config field and the nearest known one."""
    known = field_names(base_config()) if known is None else known
    dotted = re.sub(r"\[.*$", "", dotted)  # an element override such as mesh.shape[0]
    if dotted in known or any(k.startswith(dotted + ".") for k in known):
        return
    section, _, leaf = dotted.rpartition(".")
    same_leaf = [k for k in known if k.rpartition(".")[2] == leaf]  # train.lr -> optim.lr
    in_section = [k for k in known if k.rpartition(".")[0] == section]
    nearest = same_leaf or difflib.get_close_matches(dotted, in_section, n=1, cutoff=0.6) or \
        difflib.get_close_matches(dotted, known, n=1, cutoff=0.5)
    hint = f"; did you mean {' or '.join(nearest)}?" if nearest else ""
    raise ValueError(f"unknown config field {dotted}{hint}")


def check_overrides(argv: list[str]) -> None:
    """Checks that --config=FILE[:arg] exists and that --config.a.b=value overrides name known
    fields (before the flags parse them)."""
    known = field_names(base_config())
    for arg in argv:
        match = re.match(r"^--(?:no)?config\.([^=]+)", arg)
        if match:
            check_field_name(match.group(1), known)
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1].split(":", 1)[0]
            if not os.path.isfile(path):
                raise FileNotFoundError(f"--config={path}: no such config file")


# Loop and optimizer numbers that must lie in a range: (section, field, test, what it must be).
_RANGES = (
    ("model", "rope_theta", lambda v: v > 0, "> 0"),
    ("model", "norm_eps", lambda v: v > 0, "> 0"),
    ("model", "init_std", lambda v: v > 0, "> 0"),
    ("model", "attention_block", lambda v: v >= 1, ">= 1"),
    ("model", "mlp_chunk", lambda v: v >= 0, ">= 0 (0: the whole sequence)"),
    ("train", "seed", lambda v: v >= 0 and float(v).is_integer(), "a whole number >= 0"),
    ("train", "log_every", lambda v: v >= 1, ">= 1"),
    ("train", "checkpoint_every", lambda v: v >= 1, ">= 1"),
    ("train", "keep_checkpoints", lambda v: v >= 1, ">= 1 (0 would delete every checkpoint)"),
    ("train", "eval_every", lambda v: v >= 0, ">= 0 (0: never)"),
    ("train", "eval_batches", lambda v: v >= 1, ">= 1"),
    ("train", "eval_tasks_every", lambda v: v >= 0, ">= 0 (0: never)"),
    ("train", "eval_tasks_limit", lambda v: v >= 1, ">= 1"),
    ("train", "max_bad_steps", lambda v: v >= 1 and v == int(v), "a whole number >= 1"),
    ("train", "peak_flops_per_device", lambda v: v >= 0,
     ">= 0 (0: the device table, else a measured matmul peak on CPU)"),
    ("train", "grad_accum_steps", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    ("optim", "lr", lambda v: v > 0, "> 0"),
    ("optim", "min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("optim", "warmup_steps", lambda v: v >= 0, ">= 0"),
    ("optim", "weight_decay", lambda v: v >= 0, ">= 0"),
    ("optim", "b1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim", "b2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim", "eps", lambda v: v > 0, "> 0"),
    ("optim", "grad_clip", lambda v: v > 0, "> 0"),
)


def _check_ranges(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first loop or optimizer number out of its range."""
    for section, name, ok, must in _RANGES:
        value = config[section][name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
            raise ValueError(f"{section}.{name}={value!r} must be {must}")


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raises ValueError naming the first illegal setting."""
    known = field_names(base_config())
    for name in field_names(config):
        check_field_name(name, known)
    m = config.model
    if min(m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim,
           m.ffn_dim) <= 0:
        raise ValueError("model sizes must all be positive")
    if m.num_heads % m.num_kv_heads:
        raise ValueError(f"model.num_heads={m.num_heads} is not divisible by "
                         f"model.num_kv_heads={m.num_kv_heads} (GQA needs whole groups)")
    if m.head_dim % 2:
        raise ValueError(f"model.head_dim={m.head_dim} must be even for RoPE")
    if m.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"model.dtype={m.dtype!r}; expected 'float32' or 'bfloat16'")
    if m.remat not in REMAT_POLICIES:
        raise ValueError(f"model.remat={m.remat!r}; expected one of {REMAT_POLICIES}")
    attention.check_kind(m.attention, m.attention_block)
    t = config.train
    cfg = model_config(config)
    prune_validate.validate_prune(config.prune, cfg, int(t.steps))
    compaction.validate_config(config.prune, target_params(config) / groups.dense_params(cfg))
    if t.steps < 1 or t.global_batch < 1 or t.seq_len < 2:
        raise ValueError("train.steps, train.global_batch must be >= 1 and train.seq_len >= 2")
    _check_ranges(config)
    phases.validate_config(config)
    distill.validate_config(config, cfg)
    init_from.validate_config(config, cfg)
    if int(t.loss_chunk) < 0:
        raise ValueError(f"train.loss_chunk={t.loss_chunk} must be >= 0 (0: whole sequence)")
    compiler_options.validate_config(config)
    if t.eval_tasks_every:
        if not t.eval_tasks:
            raise ValueError(f"train.eval_tasks_every={t.eval_tasks_every} but train.eval_tasks "
                             f"is empty; name the tasks or set eval_tasks_every=0")
        from effllm_jax.evaluate.tasks import canonical_task  # names the unknown task
        for name in t.eval_tasks:
            canonical_task(name)
    mesh_shape = sharding.resolve_mesh_shape(config.mesh.shape, num_devices)
    batch_axes = dict(config.mesh.rules).get("batch") or ()
    batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    shards = math.prod(mesh_shape[sharding.MESH_AXES.index(a)] for a in batch_axes)
    if t.global_batch % shards:
        raise ValueError(f"train.global_batch={t.global_batch} is not divisible by the "
                         f"{shards} batch shards of mesh {mesh_shape}")
    accum = int(t.get("grad_accum_steps", 1))
    if t.global_batch % (accum * shards):
        raise ValueError(f"train.global_batch={t.global_batch} does not split into "
                         f"train.grad_accum_steps={accum} microbatches of whole rows on each of "
                         f"the {shards} batch shards (it must be divisible by {accum * shards})")
