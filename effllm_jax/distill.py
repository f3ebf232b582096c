"""Knowledge distillation: a frozen teacher in the train state, and the distillation loss.

  loss = alpha * CE(student) + (1 - alpha) * T^2 * KL(teacher || student),  p = softmax(logits / T)

averaged over target tokens. `kd_sums` works on any slice of tokens and returns sums, so a
chunked loss can add chunks up and call `combine` once. The teacher's logits are constants:
no gradient reaches the teacher.

Teachers (`distill.teacher`):
  'source_at_first_event'  the source as it entered the step of the first pruning event: the
                           step copies params and masks into the teacher slot with a `lax.cond`
                           at that step, so the copy is one branch of the one compiled step.
  a path                   a run directory, a compact or Hugging Face export, or a .gguf file;
                           any architecture, but the student's vocabulary. Loaded once at a
                           fresh start as a masked dense model (uneven layers zero-padded, which
                           is exact), so the same `llama.apply` serves every teacher.
Either way the teacher lives in the state's teacher slot {'params', 'masks'}, sharded by the
same logical rules on the same mesh, and is checkpointed with the state, so resume is exact
(a resumed run reads only the teacher's architecture from its path, not its weights). Distillation applies in the steps of the phases named
by `distill.phases` (phases.py), once the teacher exists.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from effllm_jax import phases as phases_lib
from effllm_jax import sharding
from effllm_jax.arch import ArchSpec
from effllm_jax.losses import token_nll
from effllm_jax.model import llama
from effllm_jax.model.llama import ModelConfig
from effllm_jax.pruning.schedule import PruneSchedule

SOURCE_AT_FIRST_EVENT = "source_at_first_event"


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """The static facts of distillation the step is compiled for."""

    teacher_model: ModelConfig  # the teacher slot's (masked dense) architecture
    alpha: float  # weight of cross-entropy; 1 - alpha weighs the KL term
    temperature: float
    first_step: int  # distillation applies to steps first_step .. last_step (1-based)
    last_step: int
    snapshot_step: int = 0  # source_at_first_event: the step whose incoming params are copied


# ---------------------------------------------------------------------------- the loss

def kd_sums(student_logits: jax.Array, teacher_logits: jax.Array, targets: jax.Array,
            temperature: float, weights: jax.Array | None = None
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sum of -log p(target), sum of KL(teacher || student) at temperature T, token count).

    Pure sums over any slice of tokens [..., V], so a chunked loss can accumulate them.
    """
    nll_sum, count = token_nll(student_logits, targets, weights)
    t = jnp.float32(temperature)
    student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    teacher = jax.nn.log_softmax(
        jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / t, axis=-1)
    kl = jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)
    if weights is not None:
        kl = kl * weights.astype(jnp.float32)
    return nll_sum, jnp.sum(kl), count


def combine(nll_sum: jax.Array, kl_sum: jax.Array, count: jax.Array, alpha: float,
            temperature: float, active: Any = True) -> tuple[jax.Array, dict]:
    """alpha * CE + (1 - alpha) * T^2 * KL from the sums (plain CE where `active` is False)."""
    ce, kl = nll_sum / count, kl_sum / count
    ce_weight = jnp.where(active, jnp.float32(alpha), jnp.float32(1.0))
    kd_weight = jnp.where(active, jnp.float32((1.0 - alpha) * temperature ** 2), jnp.float32(0.0))
    return ce_weight * ce + kd_weight * kl, {"ce": ce, "kl": kl}


def distill_loss(student_logits: jax.Array, teacher_logits: jax.Array, targets: jax.Array,
                 alpha: float, temperature: float, active: Any = True) -> tuple[jax.Array, dict]:
    """The distillation objective (mean over tokens) and its parts {'ce', 'kl'}."""
    return combine(*kd_sums(student_logits, teacher_logits, targets, temperature), alpha,
                   temperature, active)


# ---------------------------------------------------------------------------- config

def window(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """(first step, last step, snapshot step) of distillation; first > last means never."""
    d = config.distill
    spans = {s.name: s for s in phases_lib.spans(config)}
    chosen = [spans[name] for name in d.phases if name in spans]
    first = min((s.first_step for s in chosen), default=1)
    last = max((s.last_step for s in chosen), default=0)
    snapshot = 0
    if d.teacher == SOURCE_AT_FIRST_EVENT:
        p = config.prune
        snapshot = PruneSchedule(0, 0, int(p.warmup_steps), int(p.prune_steps),
                                 int(p.every)).event_steps()[0]
        first = max(first, snapshot + 1)  # the step after the copy: the first pruned one
    return first, last, snapshot


def enabled(config: ml_collections.ConfigDict) -> bool:
    """Whether the run distils from a teacher."""
    return bool(config.distill.teacher)


def validate_config(config: ml_collections.ConfigDict, student: ModelConfig) -> None:
    """Raises ValueError naming the first illegal `distill.*` setting."""
    d = config.distill
    if not 0.0 <= float(d.alpha) <= 1.0:
        raise ValueError(f"distill.alpha={d.alpha} must be in [0, 1] (the weight of "
                         f"cross-entropy; 1 - alpha weighs the teacher's KL)")
    if not float(d.temperature) > 0.0:
        raise ValueError(f"distill.temperature={d.temperature} must be > 0")
    unknown = [p for p in d.phases if p not in phases_lib.PHASES]
    if unknown or not d.phases or len(set(d.phases)) != len(d.phases):
        raise ValueError(f"distill.phases={tuple(d.phases)} must name distinct phases of "
                         f"{phases_lib.PHASES}")
    if not enabled(config):
        return
    first, last, _ = window(config)
    if first > last:
        raise ValueError(f"distill.phases={tuple(d.phases)} with distill.teacher={d.teacher!r} "
                         f"leaves no step to distil in (continued.steps={config.continued.steps}"
                         f", train.steps={config.train.steps})")
    if d.teacher != SOURCE_AT_FIRST_EVENT:
        teacher_spec(d.teacher, student)  # names a missing file or another vocabulary


def step_config(config: ml_collections.ConfigDict, student: ModelConfig) -> DistillConfig | None:
    """What the step needs to know about distillation (None when it is off)."""
    if not enabled(config):
        return None
    d = config.distill
    if d.teacher == SOURCE_AT_FIRST_EVENT:
        teacher_model = student
    else:
        teacher_model = padded_config(teacher_spec(d.teacher, student), student)
    first, last, snapshot = window(config)
    return DistillConfig(teacher_model, float(d.alpha), float(d.temperature), first, last,
                         snapshot)


# ---------------------------------------------------------------------------- teachers by path

@functools.lru_cache(maxsize=8)
def _read_spec(path: str) -> ArchSpec:
    from effllm_jax import checkpoint
    from effllm_jax.export import flax_io, gguf_import, hf, is_gguf

    if os.path.isfile(path):
        if not is_gguf(path):
            raise ValueError(f"distill.teacher={path} is a file but not GGUF; pass a run or "
                             f"export directory or a .gguf file")
        cfg = gguf_import.config_from_gguf(gguf_import.open_gguf(path))
    elif flax_io.is_compact_export(path):
        with open(os.path.join(path, "spec.json")) as f:
            return ArchSpec.from_json(f.read())
    elif hf.is_hf_dir(path):
        cfg = hf.config_from_hf(hf.read_hf_config(path))
    else:
        checkpoint.load_run_config(path)  # names a directory that is no run, creates nothing
        ckpt = checkpoint.Checkpointer(path, async_save=False, read_only=True)
        try:
            return ckpt.restore_meta()[1]
        finally:
            ckpt.close()
    return ArchSpec.from_masks(llama.full_masks(cfg), cfg)


def teacher_spec(path: str, student: ModelConfig) -> ArchSpec:
    """The architecture of the teacher at `path` (no weights read); refuses another vocabulary."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"distill.teacher={path}: no such file or directory")
    try:
        spec = _read_spec(os.path.abspath(path))
    except (ValueError, FileNotFoundError):
        raise
    except Exception as e:  # a directory that is none of the formats
        raise ValueError(f"distill.teacher={path} is not a run directory, an export or a .gguf "
                         f"file: {e}") from e
    vocab = spec.model_config.vocab_size
    if vocab != student.vocab_size:
        raise ValueError(f"distill.teacher={path} has a vocabulary of {vocab} tokens but the "
                         f"student's is {student.vocab_size}; a teacher must share the "
                         f"student's vocabulary")
    return spec


def padded_config(spec: ArchSpec, student: ModelConfig) -> ModelConfig:
    """A dense config that holds every layer of `spec` (the widest of each), with the
    student's numerics (compute dtype, layer scan) and no remat (it takes no gradient)."""
    kv = max([l.num_kv_heads for l in spec.layers] + [1])
    group = max([n for l in spec.layers for n in l.q_per_kv] + [1])
    return dataclasses.replace(
        spec.model_config, d_model=spec.hidden_dim, num_heads=kv * group, num_kv_heads=kv,
        ffn_dim=max([l.ffn_dim for l in spec.layers] + [1]), dtype=student.dtype, remat="none",
        scan_layers=student.scan_layers)


def padded_params(spec: ArchSpec, params: dict, cfg: ModelConfig) -> tuple[dict, dict]:
    """Compact params of `spec` placed into `cfg`'s dense layout, and the masks that keep
    exactly them (the inverse of compact.slice_params; host numpy)."""
    params = jax.tree.map(np.asarray, params)
    L, g = cfg.num_layers, cfg.group_size
    shapes = jax.tree.map(lambda a: a.shape, llama.abstract_params(cfg))
    layers = {group: {name: np.zeros(shape, np.float32) for name, shape in names.items()}
              for group, names in shapes["layers"].items()}
    heads = np.zeros((L, cfg.num_heads), bool)
    ffn = np.zeros((L, cfg.ffn_dim), bool)
    for l, layer in enumerate(spec.layers):
        src = params["layers"][l]
        slots = [k * g + j for k, n in enumerate(layer.q_per_kv) for j in range(n)]
        kv, f = layer.num_kv_heads, layer.ffn_dim
        heads[l, slots], ffn[l, :f] = True, True
        attn, mlp = layers["attn"], layers["mlp"]
        attn["wq"][l][:, slots] = src["attn"]["wq"]
        attn["wo"][l][slots] = src["attn"]["wo"]
        attn["wk"][l][:, :kv] = src["attn"]["wk"]
        attn["wv"][l][:, :kv] = src["attn"]["wv"]
        mlp["w_gate"][l][:, :f] = src["mlp"]["w_gate"]
        mlp["w_up"][l][:, :f] = src["mlp"]["w_up"]
        mlp["w_down"][l][:f] = src["mlp"]["w_down"]
        for norm in ("attn_norm", "mlp_norm"):
            layers[norm]["scale"][l] = src[norm]["scale"]
    out = {"embed": params["embed"], "layers": layers, "final_norm": params["final_norm"]}
    if "lm_head" in params:
        out["lm_head"] = params["lm_head"]
    masks = {"hidden": np.ones((cfg.d_model,), bool), "heads": heads, "ffn": ffn}
    return jax.tree.map(lambda a: np.asarray(a, np.float32), out), masks


def _pieces(tokenizer: Any) -> list[str]:
    return [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]


def load_model_sharing_vocabulary(path: str, tokenizer: Any, field: str, fix: str) -> Any:
    """The language model at `path` (an export, run, HF dir or .gguf), refused unless its
    tokenizer agrees with the run's token by token (same size is not enough: ids would mean
    other strings); `field` names the setting and `fix` says what to do in the message."""
    from effllm_jax.export import load_language_model  # late: only runs that ask for it pay
    lm = load_language_model(path)
    theirs = lm.tokenizer
    if tokenizer is not None and theirs is not None and (
            theirs.vocab_size != tokenizer.vocab_size or _pieces(theirs) != _pieces(tokenizer)):
        raise ValueError(f"{field}={path} has another tokenizer than this run's "
                         f"({theirs.vocab_size} vs {tokenizer.vocab_size} tokens, or the same "
                         f"ids spell other strings); {fix}")
    return lm


def load_teacher(config: ml_collections.ConfigDict, student: ModelConfig,
                 tokenizer: Any = None) -> dict | None:
    """The teacher slot {'params', 'masks'} (host numpy) of a path teacher; None otherwise.

    With the run's `tokenizer` and one stored with the teacher, the two must agree token by
    token (same size is not enough: ids would mean other strings).
    """
    path = config.distill.teacher
    if not enabled(config) or path == SOURCE_AT_FIRST_EVENT:
        return None
    teacher_spec(path, student)  # the vocabulary, before reading any weight
    lm = load_model_sharing_vocabulary(path, tokenizer, "distill.teacher",
                                       "a teacher must share the student's vocabulary")
    params, masks = padded_params(lm.spec, lm.params, padded_config(lm.spec, student))
    return {"params": params, "masks": masks}


# ---------------------------------------------------------------------------- the teacher slot

def init_slot(cfg: DistillConfig | None, params: dict, masks: dict) -> dict | None:
    """An empty teacher slot (zeros), filled by the first event's copy or `install`."""
    if cfg is None:
        return None
    if cfg.snapshot_step:  # a copy of the source to come
        return {"params": jax.tree.map(jnp.zeros_like, params), "masks": masks}
    return {"params": jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                                   llama.abstract_params(cfg.teacher_model)),
            "masks": llama.full_masks(cfg.teacher_model)}


def slot_shardings(cfg: DistillConfig | None, abstract_slot: dict | None, mesh, rules) -> Any:
    """Teacher params sharded by the same logical rules as the student's; masks replicated."""
    if cfg is None:
        return None
    rep = sharding.replicated(mesh)
    return {"params": sharding.tree_shardings(abstract_slot["params"],
                                              llama.param_axes(cfg.teacher_model), mesh, rules),
            "masks": jax.tree.map(lambda _: rep, abstract_slot["masks"])}


def install(state: Any, slot: dict | None, shardings: Any) -> Any:
    """The state with a loaded teacher placed into its slot (unchanged when `slot` is None)."""
    if slot is None:
        return state
    expected = jax.tree.map(lambda a: (a.shape, a.dtype), state.teacher)
    found = jax.tree.map(lambda a: (a.shape, a.dtype), slot)
    if expected != found:
        raise ValueError("the loaded teacher does not match the teacher slot the step was "
                         "compiled for")
    return state.replace(teacher=jax.device_put(slot, shardings.teacher))


def snapshot(teacher: dict | None, params: dict, masks: dict, step: jax.Array,
             cfg: DistillConfig | None) -> dict | None:
    """source_at_first_event: at the first event's step, the incoming params become the teacher."""
    if cfg is None or not cfg.snapshot_step:
        return teacher
    return jax.lax.cond(step == cfg.snapshot_step, lambda: {"params": params, "masks": masks},
                        lambda: teacher)


def teacher_logits(teacher: dict, inputs: jax.Array, step: jax.Array, cfg: DistillConfig
                   ) -> tuple[jax.Array, jax.Array]:
    """(teacher logits [B, T, V] float32, whether this step distils); zeros when it does not."""
    active = (step >= cfg.first_step) & (step <= cfg.last_step)
    params = jax.lax.stop_gradient(teacher["params"])
    shape = (*inputs.shape, cfg.teacher_model.vocab_size)
    logits = jax.lax.cond(
        active, lambda: llama.apply(cfg.teacher_model, params, inputs, teacher["masks"]),
        lambda: jnp.zeros(shape, jnp.float32))
    return logits, active


def saved_slot(state_metadata: Any) -> Any:
    """Abstract teacher slot of a saved state (from Orbax tree metadata), or None."""
    tree = getattr(state_metadata, "tree", state_metadata)
    slot = tree.get("teacher") if hasattr(tree, "get") else None
    if not slot:
        return None
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), slot,
                        is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
