"""The demo is reproducible: a shortened demo prints exactly the committed architecture, from
exactly the committed tokenizer.

It is the README's command (configs/tiny.py on Jane Austen's novels, the tokenizer trained on
a fixed thread count) with fewer steps and an earlier, shorter pruning schedule, run as a user
runs it: the train CLI in a fresh process on one CPU device. If this test fails after a
deliberate change to training, data or pruning, rerun the demo and update both
tests/data/demo_short.txt and the README's printed result.
"""
import hashlib
import os
import subprocess
import sys

from conftest import FAST_COMPILE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECTED = os.path.join(REPO, "tests", "data", "demo_short.txt")
SHORT = ["--config.train.steps=40", "--config.prune.warmup_steps=10",
         "--config.prune.prune_steps=20", "--config.prune.every=5",
         "--config.optim.warmup_steps=10", "--config.train.checkpoint_every=40",
         "--config.train.eval_every=0"]
# sha256 of the demo's tokenizer.model: SentencePiece writes other bytes on another thread count
TOKENIZER_SHA256 = "d570eca784c5e18d54218ba0c2dfb16742a7d6d0729f854f291ce172a26c3507"


def test_short_demo_prints_the_committed_architecture(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()  # the README's run
                                if not f.startswith("--xla_force_host_platform_device_count")
                                and f != FAST_COMPILE)
    proc = subprocess.run([sys.executable, "-m", "effllm_jax.train",
                           f"--workdir={tmp_path / 'demo'}", *SHORT],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    start = lines.index("Architecture found by pruning-aware pretraining:")
    printed = lines[start:start + 1 + next(i for i, line in enumerate(lines[start:])
                                           if line.startswith("pruned:"))]
    with open(EXPECTED) as f:
        assert printed == f.read().splitlines()
    with open(tmp_path / "demo" / "tokenizer.model", "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == TOKENIZER_SHA256
