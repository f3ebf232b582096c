"""Checkpoint errors name the problem: another state layout is not called corruption."""
import jax
import jax.numpy as jnp
import pytest
from conftest import make_tiny_config

from effllm_jax import checkpoint as ckpt_lib
from effllm_jax import config as config_lib
from effllm_jax.arch import ArchSpec
from effllm_jax.model import llama


def abstract(**fields):
    return {k: jax.ShapeDtypeStruct(shape, jnp.float32) for k, shape in fields.items()}


def test_a_state_of_another_layout_is_named_as_such_and_left_on_disk(tmp_path):
    cfg = config_lib.model_config(make_tiny_config())
    spec = ArchSpec.from_masks(llama.full_masks(cfg), cfg)
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(3, {"params": jnp.zeros(2), "stats": jnp.ones(3)}, spec, {"step": 3})
    ckpt.wait()
    with pytest.raises(ckpt_lib.CheckpointError,
                       match=r"step 3 .* another train state layout \(lacks \['history'\], "
                             r"has extra \['stats'\]\)") as err:
        ckpt.restore_state(abstract(params=(2,), history=(4,)), 3)
    assert "corrupt" not in str(err.value)
    assert ckpt.all_steps() == [3]  # nothing deleted
    restored = ckpt.restore_state(abstract(params=(2,), stats=(3,)), 3)
    assert float(restored["stats"].sum()) == 3.0
    ckpt.close()
