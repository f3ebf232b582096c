"""Orbax checkpoints of a run: train state + architecture spec (JSON) + data position (JSON).

Layout: <workdir>/checkpoints/<step>/{state,spec,data}. Saves are async and keep the last N.
Restore reads the small JSON items first (so a reader learns the architecture without the
weights), then the state directly onto the target shardings, which may belong to a mesh
other than the one that saved it. No pickle anywhere. The run directory may be local or a
gs:// URL: every path goes through effllm_jax.paths (etils.epath, as Orbax's own).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from effllm_jax import paths
from effllm_jax.arch import ArchSpec

CONFIG_FILE = "config.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read; nothing on disk has been changed."""


def _directory(workdir: str) -> epath.Path:
    return paths.join(workdir, "checkpoints")


class Checkpointer:
    """Saves and restores {state, spec, data} steps of one run directory."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(_directory(workdir), options=options,
                                             item_names=("state", "spec", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, spec: ArchSpec, data_position: dict) -> None:
        """Starts an async save of one step (returns before the bytes are on disk)."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            spec=ocp.args.JsonSave(spec.to_json()),
            data=ocp.args.JsonSave(data_position)))

    def restore_meta(self, step: int | None = None) -> tuple[int, ArchSpec, dict]:
        """(step, spec, data position) without touching the weights."""
        step = self._step(step)
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(
                spec=ocp.args.JsonRestore(), data=ocp.args.JsonRestore()))
            return step, ArchSpec.from_json(meta["spec"]), dict(meta["data"])
        except CheckpointError:
            raise
        except Exception as e:  # orbax raises many types; name the step and the cause
            raise CheckpointError(f"cannot read the spec/data of checkpoint step {step} in "
                                  f"{self.manager.directory}: {e}") from e

    def restore_state(self, abstract_state: Any, step: int | None = None) -> Any:
        """The state at `step` (default latest), placed as `abstract_state`'s shardings say."""
        step = self._step(step)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state)))
        except Exception as e:
            missing, extra = self._field_mismatch(abstract_state, step)
            if missing or extra:  # readable, but another layout: say which, not "corrupt"
                differences = ", ".join(
                    ([f"lacks {missing}"] if missing else []) + ([f"has extra {extra}"] if extra else []))
                raise CheckpointError(
                    f"checkpoint step {step} in {self.manager.directory} holds another train "
                    f"state layout ({differences}): it was written by another version of "
                    f"effllm-jax or with other settings (e.g. prune.criterion, "
                    f"prune.compensation, distill.teacher); use a new --workdir") from e
            raise CheckpointError(f"checkpoint step {step} in {self.manager.directory} is "
                                  f"corrupt or does not match this model: {e}") from e
        return out["state"]

    def _field_mismatch(self, abstract_state: Any, step: int) -> tuple[list, list]:
        """Top-level state fields (with arrays) the target has and the save lacks, and back."""
        try:
            saved = {k for k, v in self._state_metadata(step).items() if jax.tree.leaves(v)}
        except Exception:  # unreadable metadata: the plain "corrupt" message applies
            return [], []
        if dataclasses.is_dataclass(abstract_state):
            target = {f.name: getattr(abstract_state, f.name)
                      for f in dataclasses.fields(abstract_state)}
        else:
            target = dict(abstract_state)
        wanted = {k for k, v in target.items() if jax.tree.leaves(v)}
        return sorted(wanted - saved), sorted(saved - wanted)

    def saved_teacher(self, step: int) -> Any:
        """Shapes of the distillation teacher saved in `step`'s state (None when there is none)."""
        from effllm_jax import distill  # late: distill imports the model stack
        return distill.saved_slot(self._state_metadata(step))

    def _state_metadata(self, step: int) -> dict:
        """The saved state's tree of array metadata (shapes, dtypes), without reading arrays."""
        meta = ocp.StandardCheckpointHandler().metadata(self.manager.directory / str(step) / "state")
        return getattr(meta, "tree", meta)

    def wait(self) -> None:
        """Blocks until pending async saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.manager.directory}")
        return step


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs that carry the target shardings (what restore places onto)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def save_run_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes the run's config next to its checkpoints (JSON, human-readable)."""
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    paths.write_text(paths.join(workdir, CONFIG_FILE), text)  # atomic: never half-written


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run was started with."""
    paths.check_access(workdir)  # gs:// without client or credentials: one clear line
    path = paths.join(workdir, CONFIG_FILE)
    if not path.exists():
        raise CheckpointError(f"{path} is missing: {workdir} is not a training run directory")
    return ml_collections.ConfigDict(json.loads(paths.read_text(path)))


@dataclasses.dataclass
class InferenceCheckpoint:
    """What evaluation and export need from a training run."""

    cfg: Any  # ModelConfig
    params: dict  # dense source layout, host numpy
    masks: dict  # host numpy bool
    spec: ArchSpec
    step: int
    workdir: str


def load_inference(workdir: str, step: int | None = None) -> InferenceCheckpoint:
    """Restores params and masks of a run (latest step by default) onto the host."""
    from effllm_jax import compaction, config as config_lib, train_step as ts  # late: model stack

    config = load_run_config(workdir)
    ckpt = Checkpointer(workdir, async_save=False)
    step, spec, _ = ckpt.restore_meta(step)
    cfg = spec.model_config
    record = compaction.Compaction.from_json(spec.executed)  # compacted: its executed shapes
    executed = cfg if record is None else record.executed_config(cfg)
    step_cfg = ts.StepConfig(executed, None, None, config.prune.criterion,
                             **config_lib.compensation_fields(config))
    tx, _ = ts.make_optimizer(config.optim, config.train.steps)
    cpu = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.eval_shape(lambda: ts.init_state(step_cfg, tx, jax.random.key(0)))
    abstract = abstract.replace(teacher=ckpt.saved_teacher(step))  # a distilled run's teacher
    on_host = abstract_with_shardings(abstract, jax.tree.map(lambda _: cpu, abstract))
    state = ckpt.restore_state(on_host, step)
    ckpt.close()
    params, masks = compaction.expand(jax.tree.map(np.asarray, state.params),
                                      jax.tree.map(np.asarray, state.masks), record, cfg)
    return InferenceCheckpoint(cfg=cfg, params=params, masks=masks, spec=spec, step=step,
                               workdir=workdir)
