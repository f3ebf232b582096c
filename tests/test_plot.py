"""effllm_jax.plot: the architecture's evolution replayed from the spec, and valid PNGs."""
import json

import matplotlib.image
import numpy as np
import pytest
from conftest import make_tiny_config

from effllm_jax import plot, train
from effllm_jax.arch import ArchSpec

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny pruning-aware run (4 events) in a run directory, plotted by the CLI entry."""
    workdir = str(tmp_path_factory.mktemp("plotted_run"))
    _, spec = train.run(make_tiny_config(), workdir)
    return workdir, spec


def test_replayed_events_end_at_the_final_architecture(run_dir):
    _, spec = run_dir
    ev = plot.evolution(spec.to_json())
    cfg = spec.model_config
    assert len(ev["step"]) == 1 + len({e.step for e in spec.events}) > 2
    ratios = spec.pruned_ratio()
    for unit in ("heads", "ffn", "hidden"):
        assert ev["ratio"][unit][0] == 0.0
        assert ev["ratio"][unit][-1] == pytest.approx(ratios[unit])
        assert np.all(np.diff(ev["ratio"][unit]) >= 0)  # pruned units never come back
    assert ev["params"][-1] == pytest.approx(ratios["params"], abs=1e-6)
    np.testing.assert_array_equal(ev["heads"][-1], [l.num_heads for l in spec.layers])
    np.testing.assert_array_equal(ev["ffn"][-1], [l.ffn_dim for l in spec.layers])
    assert ev["tokens"][1] == ev["step"][1] * cfg_tokens_per_step()


def cfg_tokens_per_step():
    t = make_tiny_config().train
    return t.global_batch * t.seq_len


def test_cli_writes_four_valid_pngs_with_a_line_per_unit_type(run_dir, tmp_path):
    workdir, spec = run_dir
    assert plot.main(["--workdir", workdir, "--out", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["loss.png", "pruned_ratio.png", "saliency.png", "widths.png"]
    for p in tmp_path.iterdir():
        assert p.read_bytes()[:8] == PNG_MAGIC
        assert matplotlib.image.imread(p).shape[0] > 100
    figures = plot.evolution_figures(spec.to_json())
    labels = [line.get_label() for line in figures["pruned_ratio.png"].axes[0].get_lines()]
    assert labels == ["heads pruned", "ffn pruned", "hidden pruned", "parameters pruned"]
    kinds = {e.type for e in spec.events}
    assert {l.get_label() for l in figures["saliency.png"].axes[0].get_lines()} == kinds


def test_loss_figure_has_train_and_heldout_lines_per_run(run_dir):
    workdir, _ = run_dir
    rows = plot.read_metrics(workdir)
    assert rows and all("tokens" in r and "step" in r for r in rows)
    fig = plot.loss_figure({"a": rows, "b": rows})
    labels = [l.get_label() for l in fig.axes[0].get_lines()]
    assert labels == ["a train", "a held-out", "b train", "b held-out"]


def test_torn_last_metrics_line_is_ignored_but_a_bad_middle_line_is_named(tmp_path):
    good = json.dumps({"step": 1, "tokens": 8, "loss": 2.0})
    (tmp_path / "metrics.jsonl").write_text(good + "\n" + '{"step": 2, "lo')
    assert plot.read_metrics(str(tmp_path)) == [json.loads(good)]
    (tmp_path / "metrics.jsonl").write_text('{"step": 2, "lo\n' + good + "\n")
    with pytest.raises(ValueError, match="metrics.jsonl:1"):
        plot.read_metrics(str(tmp_path))


def test_missing_run_directory_is_one_clear_line(tmp_path, capsys):
    assert plot.main(["--workdir", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


def test_replay_of_hand_written_events_is_exact():
    """Every unit kind, two events: the replayed widths and ratios are the hand-counted ones."""
    cfg = make_tiny_config().model  # 2 layers, 4 heads, FFN 48, hidden 32
    masks = {"hidden": np.ones(32, bool), "heads": np.ones((2, 4), bool),
             "ffn": np.ones((2, 48), bool)}
    spec = ArchSpec.from_masks(masks, train.config_lib.model_config(make_tiny_config())).to_json()
    spec["events"] = {"step": [2, 2, 2, 4], "tokens": [16, 16, 16, 32],
                      "type": ["hidden", "heads", "mlp_blocks", "ffn"],
                      "layer": [-1, 0, 1, 0], "index": [3, 1, 5, 7],
                      "saliency": [0.5, 0.25, 1.0, 2.0]}
    ev = plot.evolution(spec)
    assert ev["step"] == [0, 2, 4] and ev["tokens"] == [0, 16, 32]
    assert ev["ratio"]["hidden"] == pytest.approx([0.0, 1 / 32, 1 / 32])
    assert ev["ratio"]["heads"] == pytest.approx([0.0, 1 / 8, 1 / 8])
    assert ev["ratio"]["ffn"] == pytest.approx([0.0, 1 / 96, 2 / 96])
    np.testing.assert_array_equal(ev["heads"][1], [3, 4])
    np.testing.assert_array_equal(ev["ffn"][2], [47, 47])
    assert ev["saliency"] == {"heads": [(16, 0.25)], "hidden": [(16, 0.5)],
                              "mlp_blocks": [(16, 1.0)], "ffn": [(32, 2.0)]}
    assert cfg.num_heads == 4
