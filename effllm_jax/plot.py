"""Pictures of a run: how its architecture evolved, and how its loss went (PNG files).

  python -m effllm_jax.plot --workdir=runs/demo [--compare runs/direct runs/posthoc] [--out=DIR]

Reads only small files, never the weights: the newest checkpoint's architecture spec (which
lists every pruning event: step, tokens, group type, layer, index, normalised saliency) and
the run's metrics.jsonl. Writes into <workdir>/plots/ (or --out):
  pruned_ratio.png  fraction of heads, FFN channels, hidden channels and parameters removed
  saliency.png      mean normalised saliency of the units each event removed, per group type
  widths.png        kept heads and FFN width of every layer after each event (heatmaps)
  loss.png          training and held-out loss against tokens, one colour per run
The trainer calls `plot_run` at the end of every run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import numpy as np

from effllm_jax import paths
from effllm_jax.cli import USER_ERRORS, OneLineParser, report
from effllm_jax.model.llama import ModelConfig
from effllm_jax.pruning import groups
from effllm_jax.pruning.select import TYPE_UNIT, UNITS

METRICS_FILE = "metrics.jsonl"


def read_metrics(workdir: str) -> list[dict]:
    """The logged steps of a run (metrics.jsonl), one dict per line; [] when there is none."""
    path = paths.join(workdir, METRICS_FILE)
    if not paths.exists(path):
        return []
    lines = [line for line in paths.read_text(path).splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):  # a run killed mid-write leaves a torn last line
                break
            raise ValueError(f"{path}:{number} is not JSON: {e}") from e
    return rows


def read_spec(workdir: str) -> dict:
    """The newest checkpoint's architecture spec as a JSON dict (the weights are not read)."""
    from effllm_jax.checkpoint import Checkpointer  # late: Orbax is slow to import
    ckpt = Checkpointer(workdir, async_save=False)
    try:
        _, spec, _ = ckpt.restore_meta()
    finally:
        ckpt.close()
    return spec.to_json()


def evolution(spec: dict) -> dict[str, Any]:
    """Per event (in step order): tokens, pruned ratio per unit kind and of the parameters,
    kept heads and FFN width per layer, and mean normalised saliency per group type."""
    cfg = ModelConfig(**spec["model"])
    events = spec.get("events") or {}
    steps = np.asarray(events.get("step", []), np.int64)
    masks = {"heads": np.ones((cfg.num_layers, cfg.num_heads), bool),
             "ffn": np.ones((cfg.num_layers, cfg.ffn_dim), bool),
             "hidden": np.ones((cfg.d_model,), bool)}
    totals = {u: masks[u].size for u in UNITS}
    dense = groups.dense_params(cfg)
    out: dict[str, Any] = {"tokens": [0], "step": [0], "ratio": {u: [0.0] for u in UNITS},
                           "params": [0.0], "heads": [masks["heads"].sum(1)],
                           "ffn": [masks["ffn"].sum(1)], "saliency": {}}
    for step in sorted(set(steps.tolist())):
        at = np.flatnonzero(steps == step)
        for i in at:
            unit = TYPE_UNIT[events["type"][i]]
            index = events["index"][i]
            if unit == "hidden":
                masks["hidden"][index] = False
            else:
                masks[unit][events["layer"][i], index] = False
        out["step"].append(step)
        out["tokens"].append(int(events["tokens"][at[0]]))
        for u in UNITS:
            out["ratio"][u].append(1.0 - masks[u].sum() / totals[u])
        out["params"].append(1.0 - float(groups.count_params(masks, cfg)) / dense)
        out["heads"].append(masks["heads"].sum(1))
        out["ffn"].append(masks["ffn"].sum(1))
        for kind in sorted({events["type"][i] for i in at}):
            scores = [events["saliency"][i] for i in at if events["type"][i] == kind]
            out["saliency"].setdefault(kind, []).append((out["tokens"][-1], float(np.mean(scores))))
    out["cfg"] = cfg
    return out


def _figure():
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    return plt


def evolution_figures(spec: dict, title: str = "") -> dict[str, Any]:
    """{file name: matplotlib figure} of the pruned ratio, saliency and per-layer widths."""
    plt = _figure()
    ev = evolution(spec)
    tokens = np.asarray(ev["tokens"], float)
    figures = {}

    fig, ax = plt.subplots(figsize=(6, 4))
    for u in UNITS:
        ax.step(tokens, ev["ratio"][u], where="post", label=f"{u} pruned")
    ax.step(tokens, ev["params"], where="post", label="parameters pruned", color="k", ls="--")
    ax.set(xlabel="tokens", ylabel="pruned ratio", ylim=(0, 1), title=title or "pruned ratio")
    ax.legend()
    figures["pruned_ratio.png"] = fig

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, points in ev["saliency"].items():
        x, y = zip(*points)
        ax.plot(x, y, marker="o", label=kind)
    ax.set(xlabel="tokens", ylabel="mean normalised saliency of removed units",
           title=title or "saliency at pruning events")
    if ev["saliency"]:
        ax.legend()
    figures["saliency.png"] = fig

    cfg = ev["cfg"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, name, full in ((axes[0], "heads", cfg.num_heads), (axes[1], "ffn", cfg.ffn_dim)):
        grid = np.stack(ev[name], axis=1)  # [layers, events + 1]
        image = ax.imshow(grid, aspect="auto", origin="lower", vmin=0, vmax=full,
                          cmap="viridis", interpolation="nearest")
        ax.set(xlabel="event (0 = dense)", ylabel="layer",
               title=f"kept {'heads' if name == 'heads' else 'FFN width'} of {full}",
               yticks=range(cfg.num_layers))
        fig.colorbar(image, ax=ax)
    figures["widths.png"] = fig
    return figures


def loss_figure(runs: dict[str, list[dict]]) -> Any:
    """Training (solid) and held-out (dashed, dots) loss of every run against tokens."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, rows) in enumerate(runs.items()):
        colour = colours[i % len(colours)]
        train = [(r["tokens"], r["loss"]) for r in rows if "loss" in r]
        held = [(r["tokens"], r["eval_loss"]) for r in rows if "eval_loss" in r]
        if train:
            ax.plot(*zip(*train), color=colour, lw=1, label=f"{name} train")
        if held:
            ax.plot(*zip(*held), color=colour, ls="--", marker=".", label=f"{name} held-out")
    ax.set(xlabel="tokens", ylabel="loss (nats/token)", title="loss")
    if runs:
        ax.legend(fontsize="small")
    return fig


def _save(fig, out_dir: str, name: str) -> str:
    """Writes the figure as PNG through the path layer (local or gs://, atomic locally)."""
    import io

    import matplotlib.pyplot as plt
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    path = paths.join(out_dir, name)
    paths.write_bytes(path, buffer.getvalue())
    return str(path)


def plot_run(workdir: str, compare: tuple[str, ...] = (), out_dir: str | None = None,
             spec: dict | None = None) -> list[str]:
    """Every plot of the run in `workdir` (losses of the `compare` runs on the same figure)."""
    out_dir = out_dir or str(paths.join(workdir, "plots"))
    spec = read_spec(workdir) if spec is None else spec
    figures = evolution_figures(spec, title=_name(workdir))
    figures["loss.png"] = loss_figure({_name(w): read_metrics(w) for w in (workdir, *compare)})
    return [_save(fig, out_dir, name) for name, fig in figures.items()]


def _name(workdir: str) -> str:
    return os.path.basename(os.path.normpath(str(workdir)))


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m effllm_jax.plot", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="run directory (with checkpoints)")
    parser.add_argument("--compare", nargs="*", default=(), help="other runs for loss.png")
    parser.add_argument("--out", default=None, help="output directory (default WORKDIR/plots)")
    parser.add_debug_flag()
    args = parser.parse_args(argv)
    try:
        for w in (args.workdir, *args.compare):
            if not paths.exists(w):
                raise FileNotFoundError(f"run directory {w} does not exist")
        written = plot_run(args.workdir, tuple(args.compare), args.out)
    except (*USER_ERRORS, RuntimeError) as e:
        if args.debug:
            raise
        return report(parser.prog, e)
    print("\n".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
