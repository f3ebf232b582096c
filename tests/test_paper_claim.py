"""bench/paper_claim.py's tuning rule: the (a) variant with the lowest mean final training loss
over the tuning seeds wins, and an (a) run is reused under its tuning name (no training here:
every arm's result file is written beforehand)."""
from __future__ import annotations

import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


@pytest.fixture(scope="module")
def paper_claim():
    sys.path.insert(0, BENCH)
    try:
        import paper_claim  # pylint: disable=import-outside-toplevel
        yield paper_claim
    finally:
        sys.path.remove(BENCH)


def _bench(paper_claim, tmp_path, results: dict[str, dict]):
    bench = paper_claim.Bench(paper_claim.grids.Grid.smoke(), str(tmp_path / "runs"),
                              str(tmp_path / "out"), heldout_chars=100)
    for name, result in results.items():
        path = bench.result_path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"name": name, **result}, f)

    def no_training(*args, **kwargs):
        raise AssertionError(f"trained {args}: every run here has a result already")
    bench.train = bench.finish = no_training
    return bench


def test_tune_picks_lowest_mean_over_seeds(paper_claim, tmp_path):
    # fisher wins seed 0 alone, taylor_sum wins the mean over both seeds
    losses = {"taylor": (5.6, 5.6), "fisher": (5.4, 6.0), "taylor_sum": (5.5, 5.5)}
    bench = _bench(paper_claim, tmp_path, {
        f"tune_{v}_s{s}": {"variant": v, "final_train_loss": loss[s]}
        for v, loss in losses.items() for s in (0, 1)})
    assert bench.tune([0, 1], tuple(losses)) == "taylor_sum"
    assert bench.tune([0], tuple(losses)) == "fisher"
    with open(os.path.join(bench.out, "tune.json")) as f:
        assert json.load(f)["final_train_loss"]["fisher"] == {"0": 5.4}


def test_a_run_is_reused_under_its_tuning_name_only_for_its_variant(paper_claim, tmp_path):
    bench = _bench(paper_claim, tmp_path, {
        "a_s1": {"variant": "taylor", "final_train_loss": 5.5},
        "tune_fisher_s0": {"variant": "fisher", "final_train_loss": 5.7}})
    assert bench.tune([1], ("taylor",)) == "taylor"  # a_s1 is taylor's seed-1 run
    assert bench.done("tune_taylor_s1")["final_train_loss"] == 5.5
    assert bench.arm_a(0, "fisher")["final_train_loss"] == 5.7  # and the other way round
    with pytest.raises(AssertionError, match="trained"):  # a_s1 is not fisher's run
        bench.arm_a(1, "fisher", "tune_fisher_s1")
