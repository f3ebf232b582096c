"""XLA options for the TPU compiles of a run: the config's `train.tpu_compiler_options`.

A comma-separated list of `name=value` pairs in libtpu's option names, e.g.
`xla_tpu_enable_windowed_einsum_for_all_gather=false`. They are passed to
`jax.jit(..., compiler_options=...)` of the train step and the held-out loss whenever the mesh
is made of TPUs, so a real run and `python -m effllm_jax.aot` (which compiles the trainer's own
step) compile the same program. On CPU or GPU meshes (tests, laptops) they are not passed: the
names are libtpu's, and XLA:CPU would refuse them. libtpu itself rejects a name it does not know
("No such compile option") when the step compiles.
"""
from __future__ import annotations

import re

_NAME = re.compile(r"^xla_[a-z0-9_]+$")


def parse(text: str) -> dict[str, str]:
    """{'name': 'value'} from 'name=value,name=value' ('' -> {}); ValueError naming a bad entry."""
    options = {}
    for entry in (e.strip() for e in str(text).split(",")):
        if not entry:
            continue
        name, sep, value = (s.strip() for s in entry.partition("="))
        if not sep or not _NAME.match(name) or not value:
            raise ValueError(f"train.tpu_compiler_options: {entry!r} is not 'xla_<name>=<value>'")
        if name in options:
            raise ValueError(f"train.tpu_compiler_options: {name} is given twice")
        options[name] = value
    return options


def for_mesh(text: str, mesh) -> dict[str, str] | None:
    """The options to compile for `mesh`: parsed on a TPU mesh, None (XLA's defaults) otherwise."""
    if mesh.devices.flat[0].platform != "tpu":
        return None
    return parse(text) or None


def validate_config(config) -> None:
    """Raises ValueError naming a malformed `train.tpu_compiler_options` entry."""
    parse(config.train.get("tpu_compiler_options", ""))
