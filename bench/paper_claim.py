r"""The paper's claim at equal tokens: pruning-aware pretraining against direct pretraining and
post-training pruning, on real text, with held-out perplexity and bits per byte.

  nice -n 10 python bench/paper_claim.py [--stage=all|tune|grid|report] [--seeds=0,1] [--scale]

Arms (bench/paper_claim_configs.py), each trained for the same steps x batch x sequence:
  a   pruning-aware pretraining of the source to the target, with the settings `tune` picked
  b   (a)'s final architecture trained from scratch at fixed masks (effllm_jax.fixed_arch)
  c   a hand-designed uniform Llama with the target's parameter count
  d   the source trained dense for (a)'s pruning span, one-shot Taylor pruning to the target
      (prune_posthoc: d_taylor without, d_taylor_obs with OBS compensation), then the rest of
      the budget at the fixed architecture (on a fresh data order: no batch is seen twice)
  e   (a) plus distillation from the source as it enters the first event
`tune` runs variants of (a) (criterion, compensation, schedule, normalisation) on the first seed
(or `--tune_seeds`) and picks the one with the lowest mean final training loss (never a
held-out number). Every arm is evaluated on
two held-out texts never trained on: Persuasion (novel) and the Python tutorial (docs).

Resumable: a finished arm has bench/results/paper_claim/<grid>/arms/<arm>_s<seed>.json and is
skipped; an interrupted one resumes from its run directory's checkpoint. `report` writes
summary.json, table.md, loss.png (every arm, first seed) and arm (a)'s evolution plots.
`--scale` is the same grid for one GPU/TPU host (a ~60M-parameter source, ~1.3B tokens/arm).
"""
from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import math
import os
import shutil
import sys
import time

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [BENCH, os.path.dirname(BENCH)]  # bench/ (configs, report) and this checkout
import paper_claim_configs as grids  # noqa: E402
from report import report  # noqa: E402

from effllm_jax import checkpoint as ckpt_lib  # noqa: E402
from effllm_jax import data as data_lib  # noqa: E402
from effllm_jax import fixed_arch, plot, prune_posthoc, train  # noqa: E402
from effllm_jax.pruning import groups  # noqa: E402



def tune_variants(grid: grids.Grid) -> dict[str, dict]:
    """Variants of (a) tried on the tuning seeds: prune-section overrides."""
    return {"taylor": {}, "taylor_obs": {"compensation": "obs"}, "fisher": {"criterion": "fisher"},
            # earlier and faster: the target is reached at 40% of the budget instead of 65%
            "taylor_early": {"warmup_steps": grid.warmup_steps // 3,
                             "prune_steps": grid.prune_steps * 7 // 10},
            # groups compete on their raw saliency sum, not per live parameter
            "taylor_sum": {"reduction": "sum"},
            # every layer keeps the same widths: a balanced shape instead of one wide layer
            "taylor_uniform": {"uniform_layers": True}}


ARMS = ("a", "b", "c", "d_taylor", "d_taylor_obs", "e")
ARM_NAMES = {"a": "(a) pruning-aware", "b": "(b) (a)'s architecture, from scratch",
             "c": "(c) uniform Llama, from scratch", "d_taylor": "(d) dense + Taylor one-shot",
             "d_taylor_obs": "(d) dense + Taylor one-shot + OBS", "e": "(e) (a) + distillation"}
# Arms of an earlier (a) setting, kept beside the current ones (their result files renamed)
EARLIER_ARMS = {"b_taylor": "(b) for (a) = taylor", "e_taylor": "(e) for (a) = taylor"}
POSTHOC_DATA_SEED = 1000  # (d)'s continuation reads a data order the dense phase never saw
POSTHOC_WARMUP = 10  # (d)'s continuation re-warms its learning rate over this many steps


class Bench:
    """Run directories, result files and the held-out texts of one grid."""

    def __init__(self, grid: grids.Grid, runs: str, out: str, heldout_chars: int):
        self.grid, self.runs, self.out = grid, os.path.join(runs, grid.name), os.path.join(out, grid.name)
        self.target = grids.target_params(grid)
        self.heldout_chars = heldout_chars
        self._texts = None

    def run_dir(self, name: str) -> str:
        return os.path.join(self.runs, name)

    def result_path(self, name: str) -> str:
        return os.path.join(self.out, "arms", f"{name}.json")

    def done(self, name: str) -> dict | None:
        path = self.result_path(name)
        return json.load(open(path)) if os.path.exists(path) else None

    # ---------------------------------------------------------------- held-out text
    def texts(self) -> dict[str, str]:
        """The held-out texts (first `heldout_chars` characters of each), never trained on."""
        if self._texts is None:
            from effllm_jax.data import sources
            root = data_lib.cache_root()
            self._texts = {}
            for name, pattern in grids.HELDOUT.items():
                docs = sources.read_source(pattern.split("/")[0], root=root)
                chosen = [d.text for d in docs if fnmatch.fnmatch(d.name, pattern)]
                if not chosen:
                    raise ValueError(f"held-out pattern {pattern!r} matches no document")
                self._texts[name] = "\n\n".join(chosen)[:self.heldout_chars]
        return self._texts

    def evaluate(self, workdir: str) -> dict:
        """Perplexity and bits per byte of the run's final model on each held-out text."""
        from effllm_jax.evaluate.perplexity import perplexity
        from effllm_jax.export import load_language_model
        lm = load_language_model(workdir)
        return {name: perplexity(lm, text, max_length=self.grid.seq_len).to_json()
                for name, text in self.texts().items()}

    # ---------------------------------------------------------------- arms
    def train(self, name: str, config, workdir: str | None = None) -> dict:
        """Trains (or resumes) `config` in the run directory of `name`; returns its metrics."""
        workdir = workdir or self.run_dir(name)
        start = time.perf_counter()
        _, spec = train.run(config, workdir)
        return {"live_params": spec.live_params, "train_seconds": time.perf_counter() - start,
                "spec": spec.summary(), "final_train_loss": _final_loss(workdir)}

    def finish(self, name: str, info: dict, workdir: str | None = None) -> dict:
        """Evaluates the finished run and writes its result file."""
        workdir = workdir or self.run_dir(name)
        start = time.perf_counter()
        result = {"name": name, "grid": self.grid.name, "run_dir": workdir, **info,
                  "heldout": self.evaluate(workdir), "eval_seconds": None,
                  "heldout_chars": self.heldout_chars}
        result["eval_seconds"] = time.perf_counter() - start
        report(result, self.result_path(name))
        return result

    def arm_a(self, seed: int, variant: str, name: str | None = None) -> dict:
        """(a) with the `variant` settings; a_s<seed> and tune_<variant>_s<seed> are one run."""
        name = name or f"a_s{seed}"
        same = self.done(f"tune_{variant}_s{seed}" if name == f"a_s{seed}" else f"a_s{seed}")
        if (r := self.done(name)) is None and same is not None and same.get("variant") == variant:
            r = dict(same, name=name)
            report(r, self.result_path(name))
        if r is None:
            config = grids.pruning_aware(self.grid, seed, **tune_variants(self.grid)[variant])
            r = self.finish(name, {"variant": variant, "tokens": self.grid.steps * self.grid.tokens_per_step,
                                   **self.train(name, config)})
        return r

    def arm_b(self, seed: int) -> dict:
        name, source = f"b_s{seed}", self.done(f"a_s{seed}")["run_dir"]
        if (r := self.done(name)) is None:
            workdir = self.run_dir(name)
            if not os.path.exists(os.path.join(workdir, "checkpoints")):
                fixed_arch.write_run(source, workdir, seed=seed)
            config = ckpt_lib.load_run_config(workdir)
            r = self.finish(name, {"masks_from": source, "tokens": self.grid.steps * self.grid.tokens_per_step,
                                   **self.train(name, config)})
        return r

    def arm_c(self, seed: int) -> dict:
        name = f"c_s{seed}"
        if (r := self.done(name)) is None:
            config = grids.uniform(self.grid, seed, self.target)
            r = self.finish(name, {"model": dict(config.model), "tokens": self.grid.steps * self.grid.tokens_per_step,
                                   **self.train(name, config)})
        return r

    def arm_d(self, seed: int, compensation: str) -> dict:
        name = f"d_taylor{'_obs' if compensation == 'obs' else ''}_s{seed}"
        if (r := self.done(name)) is not None:
            return r
        dense_dir = self.run_dir(f"dense_s{seed}")
        config = grids.dense(self.grid, seed)
        dense_info = self.train(f"dense_s{seed}", config, dense_dir)
        workdir = self.run_dir(name)
        if not os.path.exists(os.path.join(workdir, "checkpoints")):
            shutil.rmtree(workdir, ignore_errors=True)  # a half-written start
            self.posthoc(dense_dir, workdir, compensation, seed)
        info = self.train(name, ckpt_lib.load_run_config(workdir), workdir)
        g = self.grid
        info.update(dense_steps=g.dense_steps, dense_train_seconds=dense_info["train_seconds"],
                    tokens=g.steps * g.tokens_per_step, dense_dir=dense_dir)
        return self.finish(name, info, workdir)

    def posthoc(self, dense_dir: str, out: str, compensation: str, seed: int) -> None:
        """prune_posthoc.run's steps, with the continuation on a fresh data order."""
        config, params, masks, tokenizer = prune_posthoc.load_source(dense_dir)
        g = self.grid
        with config.unlocked():
            config.train.update(steps=g.steps - g.dense_steps, seed=seed + POSTHOC_DATA_SEED,
                                eval_every=max((g.steps - g.dense_steps) // 2, 1))
            config.optim.warmup_steps = POSTHOC_WARMUP
            config.prune.update(target_params=self.target, warmup_steps=0, prune_steps=1, every=1,
                                compensation="none")
        t = config.train
        dataset = data_lib.build_dataset(config.data, seq_len=t.seq_len, global_batch=t.global_batch,
                                         seed=t.seed, workdir=out)
        batches = (dataset.local_batch(i) for i in range(8))
        params, new_masks = prune_posthoc.prune(config, params, masks, batches, method="taylor",
                                                scope="global", target=self.target,
                                                compensation=compensation)
        with config.unlocked():
            config.prune.target_params = max(int(groups.count_params(new_masks, config_model(config))),
                                             self.target)
        prune_posthoc.write_run(out, config, params, new_masks, tokenizer)

    def arm_e(self, seed: int, variant: str) -> dict:
        name = f"e_s{seed}"
        if (r := self.done(name)) is None:
            config = grids.distilled(self.grid, seed, **tune_variants(self.grid)[variant])
            r = self.finish(name, {"variant": variant, "tokens": self.grid.steps * self.grid.tokens_per_step,
                                   **self.train(name, config)})
        return r

    # ---------------------------------------------------------------- stages
    def tune(self, seeds: list[int], variants: tuple[str, ...]) -> str:
        """Runs the (a) variants on `seeds`; returns the one with the lowest mean final train
        loss over them."""
        names = {(s, v): f"tune_{v}_s{s}" for s in seeds for v in variants}
        while missing := [key for key, name in names.items() if self.done(name) is None]:
            for seed, variant in missing:  # several processes may share the variants
                with self.claim(names[seed, variant]) as mine:
                    if mine and self.done(names[seed, variant]) is None:
                        self.arm_a(seed, variant, names[seed, variant])
            if any(self.done(names[key]) is None for key in missing):
                time.sleep(20)  # the rest is being run by another process
        losses = {v: {str(s): self.done(names[s, v])["final_train_loss"] for s in seeds}
                  for v in variants}
        mean = {v: float(np.mean(list(by_seed.values()))) for v, by_seed in losses.items()}
        best = min(mean, key=mean.get)
        report({"seeds": seeds, "final_train_loss": losses, "mean_final_train_loss": mean,
                "best": best}, os.path.join(self.out, "tune.json"))
        return best

    def grid_runs(self, seeds: list[int], variant: str, arms: tuple[str, ...] = ARMS) -> None:
        """Runs the named arms for every seed; arms another process runs now are left to it."""
        for seed in seeds:
            done = self.done(f"a_s{seed}")
            if done is not None and done.get("variant") != variant:
                raise ValueError(f"a_s{seed} was run with variant {done.get('variant')}, "
                                 f"not {variant}; remove its result file")
        run = {"a": lambda s: self.arm_a(s, variant), "b": self.arm_b, "c": self.arm_c,
               "d_taylor": lambda s: self.arm_d(s, "none"),
               "d_taylor_obs": lambda s: self.arm_d(s, "obs"), "e": lambda s: self.arm_e(s, variant)}
        todo = [(seed, arm) for seed in seeds for arm in arms]
        while todo := [(s, a) for s, a in todo if self.done(f"{a}_s{s}") is None]:
            progressed = False
            for seed, arm in todo:
                if arm == "b" and self.done(f"a_s{seed}") is None:
                    continue  # (b) needs (a)'s final masks
                # (d)'s two arms share one dense run: one lock for both
                with self.claim(f"{'d' if arm.startswith('d_') else arm}_s{seed}") as mine:
                    if mine and self.done(f"{arm}_s{seed}") is None:
                        run[arm](seed)
                        progressed = True
            if not progressed:
                time.sleep(20)  # what is left is being run by another process

    @contextlib.contextmanager
    def claim(self, name: str):
        """Yields whether this process may run `name` (no other live process holds its lock)."""
        path = os.path.join(self.out, "locks", name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            holder = int(open(path).read() or 0)
            os.kill(holder, 0)  # raises if the holder is gone: a stale lock is taken over
            if holder != os.getpid():
                print(f"{name}: run by process {holder}; skipped", flush=True)
                yield False
                return
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
        with open(path, "w") as f:
            f.write(str(os.getpid()))
        try:
            yield True
        finally:
            os.remove(path)


def config_model(config):
    from effllm_jax import config as config_lib
    return config_lib.model_config(config)


def _final_loss(workdir: str, last: int = 3) -> float:
    """Mean training loss of the last `last` logged steps."""
    rows = [r for r in plot.read_metrics(workdir) if "loss" in r]
    return float(np.mean([r["loss"] for r in rows[-last:]]))


def _spread(values: list[float]) -> tuple[float, float]:
    """(mean, half the range): the seed spread reported as mean ± spread."""
    return float(np.mean(values)), float((max(values) - min(values)) / 2)


def _entries(bench: Bench, seeds: list[int]) -> list[tuple[str, str, list[dict]]]:
    """(key, label, results over seeds) of every arm and tried (a) variant with a result."""
    out = []
    for arm in ARMS:
        out.append((arm, ARM_NAMES[arm], [bench.done(f"{arm}_s{s}") for s in seeds]))
    for key, label in EARLIER_ARMS.items():
        out.append((key, label, [bench.done(f"{key}_s{s}") for s in seeds]))
    for variant in tune_variants(bench.grid):
        out.append((f"tune_{variant}", f"(a) tried: {variant}",
                    [bench.done(f"tune_{variant}_s{s}") for s in seeds]))
    return [(key, label, [r for r in results if r]) for key, label, results in out
            if any(results)]


def summarise(bench: Bench, seeds: list[int]) -> dict:
    """Mean ± spread per arm and held-out text, the markdown table, and the figures."""
    rows, table = {}, []
    g = bench.grid
    header = ("| arm | seeds | live params | tokens | final train loss | novel ppl | novel bits/byte "
              "| docs ppl | docs bits/byte |\n|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for key, label, results in _entries(bench, seeds):
        row = {"seeds": [int(r["name"].rsplit("_s", 1)[1]) for r in results],
               "live_params": [r["live_params"] for r in results], "tokens": results[0]["tokens"],
               "final_train_loss": _spread([r["final_train_loss"] for r in results])}
        for text in grids.HELDOUT:
            for metric in ("perplexity", "bits_per_byte"):
                row[f"{text}_{metric}"] = _spread([r["heldout"][text][metric] for r in results])
        rows[key] = row
        cells = [f"{row[c][0]:.{p}f} ± {row[c][1]:.{p}f}" for c, p in
                 [("final_train_loss", 3)] + [(f"{t}_{m}", p) for t in grids.HELDOUT
                                              for m, p in (("perplexity", 1), ("bits_per_byte", 3))]]
        table.append(f"| {label} | {','.join(map(str, row['seeds']))} | "
                     f"{int(np.mean(row['live_params'])):,} | {row['tokens']:,} | "
                     + " | ".join(cells) + " |")
    md = header + "\n" + "\n".join(table) + "\n"
    os.makedirs(bench.out, exist_ok=True)
    with open(os.path.join(bench.out, "table.md"), "w") as f:
        f.write(md)
    print(md)
    summary = {"grid": g.name, "seeds": seeds, "target_params": bench.target,
               "source_params": grids.source_params(g),
               "tokens_per_arm": g.steps * g.tokens_per_step, "arms": rows}
    report(summary, os.path.join(bench.out, "summary.json"))
    figures(bench, seeds[0])
    return summary


def _offset(rows: list[dict], tokens: int) -> list[dict]:
    return [dict(r, tokens=r["tokens"] + tokens) for r in rows]


def figures(bench: Bench, seed: int) -> None:
    """loss.png of the grid's arms (one seed) and (a)'s evolution plots, into the results dir."""
    g, runs, pruned = bench.grid, {}, None
    for key, label, results in _entries(bench, [seed]):
        if key not in ARMS:
            continue  # tried variants and earlier arms: in the table, not on the figure
        workdir = results[0]["run_dir"]
        rows = plot.read_metrics(workdir)
        if key.startswith("d_"):  # the dense phase, then the continuation after it
            rows = _offset(rows, g.dense_steps * g.tokens_per_step)
            if key == "d_taylor":
                rows = plot.read_metrics(bench.run_dir(f"dense_s{seed}")) + rows
        runs[label] = rows
        if key == "a":
            pruned = (label, workdir)
    if runs:
        plot._save(plot.loss_figure(runs), bench.out, "loss.png")  # pylint: disable=protected-access
    if pruned is not None:
        spec = plot.read_spec(pruned[1])
        for name, fig in plot.evolution_figures(spec, title=f"{pruned[0]}, seed {seed}").items():
            plot._save(fig, bench.out, f"a_{name}")  # pylint: disable=protected-access


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="all", choices=("all", "tune", "grid", "report"))
    parser.add_argument("--seeds", default="0,1", help="comma list; the first one tunes")
    parser.add_argument("--scale", action="store_true", help="the GPU/TPU-host grid")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long grid (a check)")
    parser.add_argument("--variant", default="", help="skip tuning: use this (a) variant")
    parser.add_argument("--tune", default="taylor,taylor_obs,fisher,taylor_early,taylor_sum,taylor_uniform",
                        help="comma list of (a) variants to try")
    parser.add_argument("--tune_seeds", default="",
                        help="comma list of seeds the variants run on (default: the first seed)")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma list of arms to run")
    parser.add_argument("--runs", default="runs/paper_claim", help="run directories")
    parser.add_argument("--out", default="bench/results/paper_claim", help="results")
    parser.add_argument("--heldout_chars", type=int, default=200_000,
                        help="characters of each held-out text scored")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    grid = grids.Grid.scale() if args.scale else grids.Grid.smoke() if args.smoke else grids.Grid.cpu()
    bench = Bench(grid, args.runs, args.out, args.heldout_chars)
    print(f"grid {grid.name}: target {bench.target:,} params, "
          f"{grid.steps * grid.tokens_per_step:,} tokens per arm, seeds {seeds}", flush=True)
    variant = args.variant
    if args.stage in ("all", "tune") and not variant:
        tried = tuple(v for v in args.tune.split(",") if v)
        if not tried or set(tried) - set(tune_variants(grid)):
            parser.error(f"--tune={args.tune!r}; known variants {sorted(tune_variants(grid))}")
        tune_seeds = [int(s) for s in args.tune_seeds.split(",") if s] or seeds[:1]
        variant = bench.tune(tune_seeds, tried)
    elif not variant:
        tuned = os.path.join(bench.out, "tune.json")
        variant = json.load(open(tuned))["best"] if os.path.exists(tuned) else "taylor"
    if variant not in tune_variants(grid):
        parser.error(f"--variant={variant!r}; expected one of {sorted(tune_variants(grid))}")
    print(f"arm (a) settings: {variant} {tune_variants(grid)[variant]}", flush=True)
    if args.stage in ("all", "grid"):
        arms = tuple(a for a in args.arms.split(",") if a)
        if set(arms) - set(ARMS):
            parser.error(f"--arms: unknown {sorted(set(arms) - set(ARMS))}; known {ARMS}")
        bench.grid_runs(seeds, variant, arms)
    if args.stage in ("all", "grid", "report"):
        summarise(bench, seeds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
