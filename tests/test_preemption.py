"""Preemption: SIGTERM (a real one, to the CLI in a subprocess) or SIGINT ends a run at a step
boundary with a checkpoint of that step and exit 0; resumed, it ends bit-identical to a run
that was never interrupted; the earlier signal handlers are back afterwards."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import RESUME_CONFIG_FILE, assert_trees_equal, host, make_resume_config

from effllm_jax import checkpoint as ckpt_lib
from effllm_jax import preemption, train

REPO = Path(__file__).resolve().parents[1]
CONFIG = make_resume_config()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    state, spec = train.run(CONFIG, str(tmp_path_factory.mktemp("uninterrupted")))
    return host(state), spec


def test_sigterm_saves_the_step_it_is_at_exits_0_and_the_resumed_run_is_exact(uninterrupted,
                                                                              tmp_path):
    config_path = tmp_path / "tiny_preempt.py"
    config_path.write_text(RESUME_CONFIG_FILE)
    run, err_path = tmp_path / "run", tmp_path / "stderr.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "effllm_jax.train", f"--config={config_path}",
             f"--workdir={run}"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            lines = []
            for line in proc.stdout:  # the banner comes just before the first step compiles
                lines.append(line)
                if line.startswith("source model:"):
                    proc.send_signal(signal.SIGTERM)
                    break
            lines += proc.stdout.readlines()
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, err_path.read_text()[-3000:]
    last = lines[-1].strip()
    assert last.startswith("effllm_jax.train: preempted at step "), lines
    stopped = int(last.split("step ")[1].split(";")[0])
    assert last == f"effllm_jax.train: preempted at step {stopped}; checkpoint saved"
    assert 1 <= stopped < CONFIG.train.steps  # it did stop early
    ckpt = ckpt_lib.Checkpointer(str(run))
    assert ckpt.latest_step() == stopped
    step, spec, position = ckpt.restore_meta()
    assert spec.step == stopped and position["step"] == stopped
    ckpt.close()
    assert not any(".orbax-checkpoint-tmp" in p.name for p in (run / "checkpoints").iterdir())
    state, spec = train.run(CONFIG, str(run))  # resumed here, to the end
    assert spec == uninterrupted[1]
    assert_trees_equal(state, uninterrupted[0])


def test_sigint_in_process_stops_at_that_step_and_puts_the_handlers_back(uninterrupted, tmp_path,
                                                                         monkeypatch):
    build = train.data_lib.build_dataset

    def interrupting_build(*args, **kwargs):
        dataset = build(*args, **kwargs)
        local_batch = dataset.local_batch

        def batch(index, *rest):
            if index == 4:  # while step 5 is being prepared: Ctrl-C
                os.kill(os.getpid(), signal.SIGINT)
            return local_batch(index, *rest)
        dataset.local_batch = batch
        return dataset

    monkeypatch.setattr(train.data_lib, "build_dataset", interrupting_build)
    before = {s: signal.getsignal(s) for s in preemption.SIGNALS}
    with pytest.raises(preemption.Preempted, match="preempted at step 5; checkpoint saved"):
        train.run(CONFIG, str(tmp_path))
    assert {s: signal.getsignal(s) for s in preemption.SIGNALS} == before
    assert ckpt_lib.Checkpointer(str(tmp_path)).all_steps() == [4, 5]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 5  # the steps it logged are written out
    monkeypatch.undo()
    state, _ = train.run(CONFIG, str(tmp_path))
    assert_trees_equal(state, uninterrupted[0])
