"""Test set-up: eight fake CPU devices, so sharding is really exercised.

XLA_FLAGS must be set before jax is imported anywhere, hence at the top of conftest.
"""
import os

# The LLVM backend at -O0 halves the compile time that dominates this suite; XLA's own (HLO)
# optimisations, hence fusion and numerics up to rounding, are those of a real run.
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 " + FAST_COMPILE
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)

import pytest  # noqa: E402

from effllm_jax import config as config_lib  # noqa: E402


def make_tiny_config(**train):
    """A tiny GQA model on synthetic tokens, with pruning events early and often."""
    c = config_lib.base_config()
    c.model.update(vocab_size=128, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=8, ffn_dim=48)
    c.data.update(kind="synthetic", vocab_size=128)
    c.prune.update(target_fraction=0.45, warmup_steps=2, prune_steps=8, every=2)
    c.optim.update(lr=1e-2, warmup_steps=2)
    c.train.update(steps=12, global_batch=8, seq_len=16, log_every=4, checkpoint_every=6)
    c.train.update(**train)
    return c


def make_resume_config():
    """The resume tests' run (events at 4, 6, 8; saves at 4, 8). Train, config, integrity,
    preemption and bad-input tests all use it, so a whole-suite run compiles its step once."""
    c = make_tiny_config(steps=8, checkpoint_every=4)
    c.mesh.shape = (4, 2, 1)
    c.prune.prune_steps = 6  # the last event (step 8) within train.steps
    return c


# The same run as a --config file, for the CLI in a subprocess.
RESUME_CONFIG_FILE = f"""
import sys
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
from conftest import make_resume_config as get_config
"""


@pytest.fixture
def tiny_config():
    return make_tiny_config()


def host(tree):
    """A pytree of device arrays as host numpy arrays."""
    return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_trees_equal(a, b):
    """Two pytrees hold bit-identical leaves."""
    la, lb = jax.tree.leaves(host(a)), jax.tree.leaves(host(b))
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)
