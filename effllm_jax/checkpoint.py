"""Orbax checkpoints of a run: train state + architecture spec (JSON) + data position (JSON).

Layout: <workdir>/checkpoints/<step>/{state,spec,data,integrity}. Saves are async and keep the
last N. A save is refused when the state holds a NaN or an infinity (integrity.py), so rotation
only ever drops good checkpoints for good ones; `integrity` holds a checksum per state leaf.
`restore_good_state` falls back from a checkpoint that fails to read, restores non-finite values
or does not match its checksums to the step before, saying which step it skipped and why; the
trainer moves such a step to <workdir>/checkpoints_skipped/ (kept, but out of Orbax's sight, so
the run can save that step again and rotation never counts it).
Restore reads the small JSON items first (so a reader learns the architecture without the
weights), then the state directly onto the target shardings, which may belong to a mesh
other than the one that saved it. No pickle anywhere. The run directory may be local or a
gs:// URL: every path goes through effllm_jax.paths (etils.epath, as Orbax's own).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from effllm_jax import integrity, paths
from effllm_jax.arch import ArchSpec

CONFIG_FILE = "config.json"
SKIPPED_DIR = "checkpoints_skipped"  # bad steps set aside by the trainer, never deleted


# State fields added after checkpoints existed whose fresh value is zeros (counters): a checkpoint
# saved without one restores with it zeroed instead of being refused.
ZERO_STARTED_FIELDS = frozenset({"bad_steps"})


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read; nothing on disk has been changed."""


def _directory(workdir: str) -> epath.Path:
    return paths.join(workdir, "checkpoints")


class Checkpointer:
    """Saves and restores {state, spec, data} steps of one run directory."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        # read_only: a reader (export, evaluate, a resume check) never creates checkpoints/
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(_directory(workdir), options=options,
                                             item_names=("state", "spec", "data", "integrity"))
        self.workdir = workdir
        self.skipped: dict[int, str] = {}  # step -> why restore passed it over

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, spec: ArchSpec, data_position: dict) -> None:
        """Starts an async save of one step (returns before the bytes are on disk); raises
        integrity.IntegrityError, writing nothing, when the state is not finite."""
        finite, checksums = integrity.fingerprint(state)
        bad = integrity.non_finite(finite)
        if bad:
            self.wait()  # earlier (good) saves land; this one is never started
            raise integrity.IntegrityError(
                f"refusing to write checkpoint step {step}: the train state holds NaN or "
                f"infinite values in {integrity.describe(bad)}; the last good checkpoint is "
                f"step {self.latest_step()} in {self.manager.directory}")
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            spec=ocp.args.JsonSave(spec.to_json()),
            data=ocp.args.JsonSave(data_position),
            integrity=ocp.args.JsonSave({"checksums": checksums})))

    def restore_meta(self, step: int | None = None) -> tuple[int, ArchSpec, dict]:
        """(step, spec, data position) without touching the weights; with no `step`, of the
        newest step whose spec and data read (unreadable newer ones are reported and skipped)."""
        if step is None:
            for candidate in self._newest_first():
                try:
                    return self.restore_meta(candidate)
                except CheckpointError as e:
                    self._skip(candidate, str(e))
            self._step(None)  # none at all: "no checkpoint in ..."
            raise CheckpointError(f"no readable checkpoint in {self.manager.directory}: "
                                  + "; ".join(self.skipped.values()))
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
            if missing and not extra and set(missing) <= ZERO_STARTED_FIELDS:
                return self._restore_older(abstract_state, step, missing)
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

    def _restore_older(self, abstract_state: Any, step: int, missing: list[str]) -> Any:
        """A state saved before `missing` fields existed: the saved fields, the rest zeros."""
        saved = {k: getattr(abstract_state, k) for k in self._state_metadata(step)
                 if k not in missing}
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(saved)))["state"]
        zeros = {k: jax.tree.map(lambda a: jax.device_put(np.zeros(a.shape, a.dtype), a.sharding),
                                 getattr(abstract_state, k)) for k in missing}
        return abstract_state.replace(**out, **zeros)

    def restore_good_state(self, abstract_state: Any, step: int | None = None,
                           set_aside: bool = False) -> tuple[int, Any]:
        """(step, state) of the newest checkpoint at or before `step` (default latest) that reads,
        is finite and matches its checksums; each one passed over is reported on stderr. With
        `set_aside` (the trainer), those newer bad steps move to checkpoints_skipped/.
        `abstract_state` may be a function of the step (e.g. a teacher's shapes read from it).
        Another state layout is not corruption: it raises at once, and nothing is moved."""
        newest = self._step(step)
        for candidate in [s for s in self._newest_first() if s <= newest]:
            try:
                try:
                    target = abstract_state(candidate) if callable(abstract_state) else abstract_state
                except Exception as e:  # its array metadata does not read
                    raise CheckpointError(f"checkpoint step {candidate} in "
                                          f"{self.manager.directory} is corrupt: {e}") from e
                state = self.restore_state(target, candidate)
                problem = self._verify(state, candidate)
            except CheckpointError as e:
                if "another train state layout" in str(e):
                    raise
                problem = str(e)
            if _all_processes_agree(problem is None):
                if set_aside:
                    self.set_aside([s for s in self.skipped if s > candidate])
                return candidate, state
            self._skip(candidate, problem or "unreadable on another process")
        raise CheckpointError(f"no good checkpoint in {self.manager.directory}: "
                              + "; ".join(self.skipped.values()))

    def _verify(self, state: Any, step: int) -> str | None:
        """Why a restored state is not good (non-finite, or not the bytes saved), or None."""
        finite, checksums = integrity.fingerprint(state)
        bad = integrity.non_finite(finite)
        if bad:
            return (f"checkpoint step {step} restores NaN or infinite values in "
                    f"{integrity.describe(bad)}")
        if not (self.manager.directory / str(step) / "integrity").exists():
            return None  # saved before checksums existed: finiteness is all we can check
        try:
            saved = self.manager.restore(step, args=ocp.args.Composite(
                integrity=ocp.args.JsonRestore()))["integrity"]["checksums"]
        except Exception as e:
            return f"checkpoint step {step} has an unreadable checksum record: {e}"
        changed = [path for path, value in checksums.items()
                   if path in saved and int(saved[path]) != value]
        if changed:
            return (f"checkpoint step {step} does not hold the bytes it was saved with "
                    f"(checksum mismatch in {integrity.describe(changed)})")
        return None

    def _skip(self, step: int, why: str) -> None:
        self.skipped[step] = why
        if jax.process_index() == 0:
            print(f"effllm_jax: warning: skipping checkpoint step {step}: "
                  f"{' '.join(why.split())[:400]}", file=sys.stderr, flush=True)

    def set_aside(self, steps: list[int]) -> None:
        """Moves bad steps to <workdir>/checkpoints_skipped/<step>[-n] (process 0 moves; all wait)."""
        from effllm_jax import distributed  # late: only the trainer sets steps aside
        if steps and jax.process_index() == 0:
            target_dir = paths.join(self.workdir, SKIPPED_DIR)
            target_dir.mkdir(parents=True, exist_ok=True)
            for step in steps:
                source = self.manager.directory / str(step)
                target, n = target_dir / str(step), 1
                while target.exists():
                    n += 1
                    target = target_dir / f"{step}-{n}"
                source.rename(target)
                print(f"effllm_jax: warning: moved bad checkpoint step {step} to {target}",
                      file=sys.stderr, flush=True)
        if steps:
            distributed.barrier("checkpoint-set-aside")
            self.manager.reload()

    def _newest_first(self) -> list[int]:
        return sorted(self.all_steps(), reverse=True)

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
        handler = ocp.StandardCheckpointHandler()
        try:
            meta = handler.metadata(self.manager.directory / str(step) / "state")
        finally:
            handler.close()  # its reader threads stop here, also when the metadata is damaged
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


def _all_processes_agree(ok: bool) -> bool:
    """True only when `ok` holds on every process (a read may fail on one host only)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.array(ok, np.int32))))


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
    ckpt = Checkpointer(workdir, async_save=False, read_only=True)
    latest = step is None  # then a bad newest checkpoint falls back to the one before
    step, spec, _ = ckpt.restore_meta(step)
    cfg = spec.model_config
    record = compaction.Compaction.from_json(spec.executed)  # compacted: its executed shapes
    executed = cfg if record is None else record.executed_config(cfg)
    step_cfg = ts.StepConfig(executed, None, None, config.prune.criterion,
                             **config_lib.compensation_fields(config))
    tx, _ = ts.make_optimizer(config.optim, config.train.steps)
    cpu = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.eval_shape(lambda: ts.init_state(step_cfg, tx, jax.random.key(0)))

    def on_host(at_step: int) -> Any:
        target = abstract.replace(teacher=ckpt.saved_teacher(at_step))  # a distilled run's
        return abstract_with_shardings(target, jax.tree.map(lambda _: cpu, target))

    if latest:
        good, state = ckpt.restore_good_state(on_host, step)
        if good != step:
            step, spec, _ = ckpt.restore_meta(good)
    else:
        state = ckpt.restore_state(on_host(step), step)
    ckpt.close()
    params, masks = compaction.expand(jax.tree.map(np.asarray, state.params),
                                      jax.tree.map(np.asarray, state.masks), record, cfg)
    return InferenceCheckpoint(cfg=cfg, params=params, masks=masks, spec=spec, step=step,
                               workdir=workdir)
