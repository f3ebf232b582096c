r"""Pruning-aware pretraining: the training loop. Reads top to bottom.

  python -m effllm_jax.train --config=configs/tiny.py --workdir=runs/tiny \
      [--config.prune.target_fraction=0.3 ...]

Re-running with the same --workdir resumes from its latest checkpoint, on any mesh. The
workdir may be local or gs://bucket/run (effllm_jax.paths); several processes start with
--coordinator_address/--num_processes/--process_id or EFFLLM_DISTRIBUTED=1 (effllm_jax.distributed).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any

import jax
import numpy as np

from effllm_jax import checkpoint as ckpt_lib
from effllm_jax import config as config_lib
from effllm_jax import data as data_lib
from effllm_jax import compaction, compiler_options, distill, distributed, init_from, mfu, paths
from effllm_jax import resume, sharding
from effllm_jax import integrity, preemption
from effllm_jax import phases as phases_lib
from effllm_jax import train_step as ts
from effllm_jax.arch import ArchSpec
from effllm_jax.pruning import groups
from effllm_jax.pruning.schedule import PruneSchedule

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "tiny.py")


def _step_config(config) -> ts.StepConfig:
    cfg = config_lib.model_config(config)
    p = config.prune
    schedule = PruneSchedule(dense_params=groups.dense_params(cfg),
                             target_params=config_lib.target_params(config),
                             warmup_steps=int(p.warmup_steps), prune_steps=int(p.prune_steps),
                             every=int(p.every))
    return ts.StepConfig(cfg, schedule, config_lib.select_config(config), p.criterion,
                         adam_b2=float(config.optim.b2),
                         distill=distill.step_config(config, cfg),
                         loss_chunk=int(config.train.loss_chunk),
                         grad_accum_steps=int(config.train.get("grad_accum_steps", 1)),
                         **config_lib.compensation_fields(config))


@dataclasses.dataclass
class Trainer:
    """A run's compiled pieces: sharded state creation and the donated train step."""

    step_cfg: ts.StepConfig
    tx: Any
    lr_schedule: Any
    mesh: Any
    rules: tuple
    state_shardings: ts.TrainState
    init: Any  # key -> TrainState, created directly sharded
    step: Any  # (state, batch) -> (state, metrics)
    eval_loss: Any  # (params, masks, batch) -> mean held-out loss of the masked model


_TRAINERS: dict[str, Trainer] = {}


def cached_trainer(config, step_cfg: ts.StepConfig | None = None) -> Trainer:
    """`build_trainer` memoised on the config (and a compacted run's StepConfig): a process
    that runs the same config again (a resume in a notebook, a test) reuses the compiled step."""
    key = config.to_json_best_effort(sort_keys=True) + str(jax.devices()) + repr(step_cfg)
    if key not in _TRAINERS:
        _TRAINERS[key] = build_trainer(config, step_cfg=step_cfg)
    return _TRAINERS[key]


def build_trainer(config, mesh=None, step_cfg: ts.StepConfig | None = None) -> Trainer:
    """Mesh, shardings and the jitted init/step for a validated config (for `step_cfg`'s
    shapes when given: a compacted run's, compaction.py)."""
    step_cfg = _step_config(config) if step_cfg is None else step_cfg
    mesh = sharding.make_mesh(config.mesh.shape) if mesh is None else mesh
    rules = tuple((k, v) for k, v in config.mesh.rules)
    tx, lr_schedule = ts.make_optimizer(config.optim, config.train.steps,
                                        phases_lib.lr_schedule(config))
    state_sh = ts.state_shardings(step_cfg, tx, mesh, rules)
    init = jax.jit(functools.partial(ts.init_state, step_cfg, tx), out_shardings=state_sh)
    # Traced inside the activation layout, so the model's `sharding.constrain` calls apply.
    # On TPUs compiled with the run's XLA options (what `aot` measures is what runs).
    options = compiler_options.for_mesh(config.train.get("tpu_compiler_options", ""), mesh)
    step = jax.jit(sharding.traced_under(mesh, rules,
                                         functools.partial(ts.train_step, cfg=step_cfg, tx=tx)),
                   in_shardings=(state_sh, sharding.batch_sharding(mesh, rules)),
                   out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0,
                   compiler_options=options)
    eval_loss = jax.jit(sharding.traced_under(mesh, rules, functools.partial(
                            ts.eval_loss, cfg=step_cfg.model, loss_chunk=step_cfg.loss_chunk)),
                        in_shardings=(state_sh.params, state_sh.masks,
                                      sharding.batch_sharding(mesh, rules)),
                        compiler_options=options)
    return Trainer(step_cfg, tx, lr_schedule, mesh, rules, state_sh, init, step, eval_loss)


def evaluate_heldout(trainer: Trainer, state: ts.TrainState, dataset, num_batches: int) -> float | None:
    """Mean loss of the masked model over the first held-out batches (None if there are none)."""
    losses = [trainer.eval_loss(state.params, state.masks,
                                sharding.global_batch_array(b, trainer.mesh, trainer.rules))
              for b in dataset.validation_batches(num_batches, process_index=jax.process_index(),
                                                  process_count=jax.process_count())]
    return float(np.mean(jax.device_get(losses))) if losses else None


def evaluate_zero_shot(config, state: ts.TrainState, dataset, cfg=None) -> dict[str, float]:
    """Zero-shot task scores (harness conventions) of the masked model as it is now (`cfg`:
    the executed model config, when not the source's)."""
    from effllm_jax.evaluate import evaluate_tasks  # late: only runs that ask for it pay
    from effllm_jax.model.lm import MaskedLanguageModel
    t = config.train
    lm = MaskedLanguageModel(cfg or config_lib.model_config(config), state.params, state.masks,
                             dataset.tokenizer)
    results = evaluate_tasks(lm, list(t.eval_tasks), t.eval_tasks_limit,
                             max_length=t.seq_len)
    scores = {name: r["score"] for name, r in results["tasks"].items()}
    if results["average"] is not None:
        scores["average"] = results["average"]
    return scores


class MetricWriter:
    """Progress bar on a terminal (plain log lines otherwise), TensorBoard and metrics.jsonl
    (one JSON line of full-precision scalars per logged step) in the run directory; process 0 only.

    The metrics file is rewritten whole (local or gs://) at most every FLUSH_S seconds, at each
    checkpoint and at the end; a resumed run keeps the lines up to its checkpoint.
    """

    SHOWN = ("loss", "eval_loss", "tok/s", "mfu", "live_M", "pruned")
    METRICS_FILE = "metrics.jsonl"
    FLUSH_S = 60.0

    def __init__(self, workdir: str, total: int, start: int, enabled: bool,
                 tokens_per_step: int = 0):
        self.enabled = enabled
        self.tokens_per_step = tokens_per_step
        self.bar = self.tb = None
        self.lines: list[str] = []
        if enabled:
            self.tb = paths.summary_writer(paths.join(workdir, "tensorboard"))
            self.metrics_path = paths.join(workdir, self.METRICS_FILE)
            if start and self.metrics_path.exists():  # the steps a resumed run does not redo
                self.lines = [line for line in paths.read_text(self.metrics_path).splitlines()
                              if line.strip() and json.loads(line).get("step", 0) <= start]
            self.flushed = time.monotonic()
            if sys.stdout.isatty():
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def write(self, step: int, scalars: dict[str, float], quiet: bool = False) -> None:
        if not self.enabled:
            return
        for name, value in scalars.items():
            self.tb.add_scalar(name, value, step)
        self.lines.append(json.dumps({"step": step, "tokens": step * self.tokens_per_step,
                                      **scalars}, default=float))
        if time.monotonic() - self.flushed > self.FLUSH_S:
            self.flush()
        if quiet:
            return
        shown = {k: f"{scalars[k]:.4g}" for k in self.SHOWN if k in scalars}
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)
        else:
            print(f"step {step}: " + ", ".join(f"{k}={v}" for k, v in shown.items()), flush=True)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def print(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def flush(self) -> None:
        """Writes the metrics file and TensorBoard's pending events out."""
        if self.enabled:
            paths.write_text(self.metrics_path, "".join(line + "\n" for line in self.lines))
            self.tb.flush()
            self.flushed = time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.flush()
            self.tb.close()


def run(config, workdir: str, allow_config_change: bool = False
        ) -> tuple[ts.TrainState, ArchSpec]:
    """Trains (or resumes) the run in `workdir`; returns the final state and architecture.

    A resume that changes the model shape is refused, and one that changes the data mix,
    tokenizer or seed unless `allow_config_change` (effllm_jax.resume). On SIGTERM/SIGINT it
    saves the step it is at and raises preemption.Preempted."""
    with preemption.watch() as watcher:
        return _run(config, workdir, watcher, allow_config_change)


def _run(config, workdir: str, watcher: preemption.Watcher, allow_config_change: bool
         ) -> tuple[ts.TrainState, ArchSpec]:
    # ---------------------------------------------------------------- config
    config_lib.validate(config, jax.device_count())
    cfg, t = config_lib.model_config(config), config.train
    total_steps = phases_lib.total_steps(config)  # pruning phase + continued pretraining
    is_main = jax.process_index() == 0
    paths.check_access(workdir)  # a gs:// workdir without client or credentials: say so now
    distributed.check_shared_run_dir(workdir)  # per-host local folders would hang in Orbax
    resume.check(workdir, config, allow_config_change,  # before the data pipeline writes
                 log=print if is_main else lambda _: None)

    # ---------------------------------------------------------------- input
    dataset = data_lib.build_dataset(config.data, seq_len=t.seq_len, global_batch=t.global_batch,
                                     seed=t.seed, workdir=workdir,
                                     process_index=jax.process_index(), barrier=distributed.barrier)
    if dataset.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {dataset.vocab_size} tokens but model.vocab_size="
                         f"{cfg.vocab_size}; raise model.vocab_size")
    if t.eval_tasks_every and dataset.tokenizer is None:  # fail now, not at the first eval
        raise ValueError("train.eval_tasks needs a tokenizer: use real text (data.kind='corpus')")

    # ---------------------------------------------------------------- shard
    trainer = cached_trainer(config)
    step_cfg, tx, mesh, rules = trainer.step_cfg, trainer.tx, trainer.mesh, trainer.rules
    state_sh, lr_schedule = trainer.state_shardings, trainer.lr_schedule

    # ---------------------------------------------------------------- checkpoint
    ckpt = ckpt_lib.Checkpointer(workdir, keep=t.keep_checkpoints)
    compactor = compaction.Compactor(config.prune, cfg, step_cfg.schedule)
    step = ckpt.latest_step()  # resume.check has vetted it
    if step is not None:
        step, spec, _ = ckpt.restore_meta()  # the newest readable step's spec
        compactor = compaction.Compactor.from_spec(config.prune, cfg, step_cfg.schedule, spec)
        if compactor.record is not None:  # saved after a compaction: its executed shapes
            trainer = cached_trainer(config, compaction.executed_step_config(
                step_cfg, compactor.record, cfg))
            step_cfg, state_sh = trainer.step_cfg, trainer.state_shardings
        abstract = jax.eval_shape(lambda: ts.init_state(step_cfg, tx, jax.random.key(t.seed)))
        step, state = ckpt.restore_good_state(  # a bad newest step falls back (checkpoint.py)
            ckpt_lib.abstract_with_shardings(abstract, state_sh), step, set_aside=True)
        start = step
    else:
        teacher = distill.load_teacher(config, cfg, dataset.tokenizer)  # a path teacher, or None
        state = distill.install(trainer.init(jax.random.key(t.seed)), teacher, state_sh)
        state = init_from.install(state, init_from.load(config, cfg, dataset.tokenizer), state_sh)
        start = 0
    if is_main:
        resume.save_config(workdir, config)  # the first config.json kept; changes versioned

    tokens_per_step = t.global_batch * t.seq_len

    def arch_spec(state, step) -> ArchSpec:
        return compactor.arch_spec(state, step, step * tokens_per_step, phases_lib.spans(config))

    writer = MetricWriter(workdir, total_steps, start, is_main, tokens_per_step)
    bad_steps = integrity.BadStepGuard(t.max_bad_steps, ckpt)  # non-finite steps (integrity.py)

    def save(state, step):
        ckpt.save(step, state, arch_spec(state, step), {"step": step, "seed": t.seed,
                                                         "kind": config.data.kind})
        writer.flush()

    # ---------------------------------------------------------------- loop
    peak = mfu.peak_flops_per_device(t.peak_flops_per_device, cfg.dtype)
    dense = groups.dense_params(cfg)
    window = {"start": time.perf_counter(), "steps": 0}

    def log(step: int, metrics: dict) -> None:
        m = jax.device_get(metrics)
        tok_s = window["steps"] * tokens_per_step / max(time.perf_counter() - window["start"], 1e-9)
        scalars = {"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
                   "lr": float(lr_schedule(step)),
                   "live_M": float(m["live_params"]) / 1e6, "dense_M": dense / 1e6,
                   "executed_M": float(m["executed_params"]) / 1e6,
                   "pruned": 1.0 - float(m["live_params"]) / dense,
                   "pruned_heads": 1.0 - float(m["kept_heads"]) / (cfg.num_layers * cfg.num_heads),
                   "pruned_ffn": 1.0 - float(m["kept_ffn"]) / (cfg.num_layers * cfg.ffn_dim),
                   "pruned_hidden": 1.0 - float(m["kept_hidden"]) / cfg.d_model}
        scalars.update({k: float(v) for k, v in m.items() if k.startswith(("distill_", "bad_steps"))})
        if window["steps"]:  # the final log after the loop has timed no step since the last
            scalars["tok/s"] = tok_s
        if peak and window["steps"]:  # FLOPs of the live model, and those the hardware executes
            useful_flops = mfu.flops_per_token_from_counts(
                cfg, float(m["live_params"]), float(m["kept_heads"]), float(m["kept_hidden"]),
                t.seq_len)
            scalars["mfu"] = tok_s * useful_flops / (peak * jax.device_count())
            run_cfg = step_cfg.model  # the executed shapes: the source's, or a compaction's
            executed_flops = mfu.flops_per_token_from_counts(
                run_cfg, groups.dense_params(run_cfg), run_cfg.num_layers * run_cfg.num_heads,
                run_cfg.d_model, t.seq_len)
            scalars["mfu_hw"] = tok_s * executed_flops / (peak * jax.device_count())
        writer.write(step, scalars)
        if m["pruning_event"]:
            writer.print(f"step {step}: pruning event -> live {scalars['live_M']:.3f}M params "
                         f"({scalars['pruned']:.1%} pruned), loss {scalars['loss']:.3f}")
        window.update(start=time.perf_counter(), steps=0)

    writer.print(f"source model: {dense:,} params; target {step_cfg.schedule.target_params:,}; "
                 f"pruning events every {step_cfg.schedule.every} steps from step "
                 f"{step_cfg.schedule.event_steps()[0]} to {step_cfg.schedule.last_event}; "
                 f"mesh {dict(mesh.shape)}")
    phases_line = phases_lib.describe(config)
    if phases_line:
        writer.print(phases_line)
    pending = None
    for step in range(start + 1, total_steps + 1):
        local = dataset.local_batch(step - 1, jax.process_index(), jax.process_count())
        state, metrics = trainer.step(state, sharding.global_batch_array(local, mesh, rules))
        metrics = dict(metrics, executed_params=compactor.executed_params())  # host int
        window["steps"] += 1
        if compactor.due(step):  # slice to the live units and compile the smaller step once
            state, small = compactor.compact(state, step_cfg, tx, mesh, rules,
                                             step * tokens_per_step)
            trainer = cached_trainer(config, small)
            step_cfg = trainer.step_cfg
            writer.print(f"step {step}: compacted to {compactor.executed_params():,} executed "
                         f"params ({dict(compaction.shape_summary(step_cfg.model))})")
        # Metrics are read one step late, and only on log and event steps (known on the host
        # from the schedule), so the host never waits on the step in flight.
        if pending is not None and (pending[0] % t.log_every == 0
                                    or step_cfg.schedule.is_event(pending[0])):
            log(*pending)
            bad_steps.check(*pending)
        pending = (step, metrics)
        writer.advance()
        if t.eval_every and (step % t.eval_every == 0 or step == total_steps):
            heldout = evaluate_heldout(trainer, state, dataset, t.eval_batches)
            if heldout is not None:
                writer.write(step, {"eval_loss": heldout}, quiet=True)
                writer.print(f"step {step}: held-out loss {heldout:.4f} "
                             f"(perplexity {np.exp(heldout):.1f})")
        if t.eval_tasks_every and (step % t.eval_tasks_every == 0 or step == total_steps):
            scores = evaluate_zero_shot(config, state, dataset, step_cfg.model)
            writer.write(step, {f"zero_shot/{k}": v for k, v in scores.items()}, quiet=True)
            writer.print(f"step {step}: zero-shot " + ", ".join(
                f"{k} {v:.1%}" for k, v in scores.items()))
        if step % t.checkpoint_every == 0 and step != total_steps:
            save(state, step)
        if watcher.reached(step):  # SIGTERM/SIGINT: save this step below, then stop
            break
    if pending is not None:
        log(*pending)
        bad_steps.check(*pending)
    if start < total_steps:
        save(state, step)  # the last step run: total_steps, or where a signal stopped it
    ckpt.close()
    writer.close()
    if watcher.stopped_at is not None:
        raise preemption.Preempted(watcher.stopped_at, watcher.signal_name)
    spec = arch_spec(state, int(jax.device_get(state.step)))
    return state, spec


def main(argv) -> None:
    del argv
    from absl import flags, logging
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    f = flags.FLAGS
    try:
        distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)
        if jax.process_index() != 0:  # one process logs for the run
            logging.set_verbosity(logging.ERROR)
        _, spec = run(f.config, f.workdir, f.allow_config_change)
    except (ValueError, OSError, ckpt_lib.CheckpointError) as e:  # the user's: one line, exit 2
        if f.debug:
            raise
        from effllm_jax.cli import fail
        fail("effllm_jax.train", e)
    except preemption.Preempted as e:  # a clean stop: the checkpoint is on disk
        if jax.process_index() == 0:
            print(f"effllm_jax.train: {e}", flush=True)
        sys.exit(0)
    except integrity.IntegrityError as e:  # diverged: one line, exit 1, good checkpoints kept
        if f.debug:
            raise
        print(f"effllm_jax.train: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(1)
    if jax.process_index() == 0:
        print("\nArchitecture found by pruning-aware pretraining:")
        print(spec.summary())
        print(f"checkpoints: {paths.join(f.workdir, 'checkpoints')}")
        from effllm_jax import plot  # late: matplotlib is only needed here
        try:
            written = plot.plot_run(f.workdir, spec=spec.to_json())
            print(f"plots: {os.path.dirname(written[0])}")
        except Exception as e:  # a plot must never fail a finished run
            print(f"warning: plots not written: {e}", file=sys.stderr)


def define_flags() -> None:
    """The train CLI's flags (loads --config and checks its --config.* overrides)."""
    from absl import flags
    from ml_collections import config_flags
    config_lib.check_overrides(sys.argv)  # an unknown field: named, with the nearest known one
    config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "experiment config file",
                                    lock_config=True)
    flags.DEFINE_bool("debug", False, "show the traceback of a configuration or input error")
    flags.DEFINE_bool("allow_config_change", False, "resume even though the data mix, "
                      "tokenizer or seed differ from the run's (logged)")
    flags.DEFINE_string("workdir", "runs/default",
                        "run directory, local or gs://bucket/run (resumes if it has checkpoints)")
    flags.DEFINE_string("coordinator_address", None, "multi-host: process 0's HOST:PORT "
                        "(or $EFFLLM_COORDINATOR_ADDRESS); TPU pods: EFFLLM_DISTRIBUTED=1 instead")
    flags.DEFINE_integer("num_processes", None, "multi-host: number of processes "
                         "(or $EFFLLM_NUM_PROCESSES)")
    flags.DEFINE_integer("process_id", None, "multi-host: this process, 0..num_processes-1 "
                         "(or $EFFLLM_PROCESS_ID)")


def cli(argv: list[str] | None = None) -> None:
    """Entry point: absl flags with ml_collections config overrides; errors are one line."""
    from effllm_jax import cli as cli_lib
    cli_lib.run_absl("effllm_jax.train", define_flags, main, argv)


if __name__ == "__main__":
    cli()
