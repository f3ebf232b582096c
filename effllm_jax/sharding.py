"""Device mesh and the logical-axis table: the only place that says how arrays are laid out.

Model code names axes logically ('embed', 'heads', 'mlp', ...); the config's `mesh.rules`
maps each name to mesh axes of the ('data', 'fsdp', 'tensor') mesh. A dimension that a mesh
axis does not divide is replicated along it instead (e.g. 3 KV heads on 4 tensor shards).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fills a single -1 entry so the mesh covers every device; checks the product."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh.shape={shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh.shape={shape}: entries must be positive, with at most one -1")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if num_devices % known:
            raise ValueError(f"mesh.shape={shape} does not divide the {num_devices} devices")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh.shape={shape} needs {math.prod(shape)} devices, but "
                         f"{num_devices} are available")
    return shape


def make_mesh(shape: Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh with Auto axes (sharding propagates through jit)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(shape, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> P:
    """PartitionSpec for an array with the given logical axes and shape."""
    table = dict((name, target) for name, target in rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape):
        target = table.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        chosen = []
        for axis in targets:
            size = mesh.shape[axis]
            if axis in used or size == 1 or dim % (math.prod(mesh.shape[a] for a in chosen) * size):
                continue
            chosen.append(axis)
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return P(*spec)


def tree_shardings(abstract_tree: Any, axes_tree: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """NamedShardings for every leaf of `abstract_tree` from its logical axes."""
    return jax.tree.map(
        lambda x, axes: NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, rules)),
        abstract_tree, axes_tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """Sharding of a [batch, seq] token array: rows over the batch axes."""
    return NamedSharding(mesh, logical_to_spec(("batch", None), (_batch_divisor(mesh, rules), 1),
                                               mesh, rules))


def _batch_divisor(mesh: Mesh, rules) -> int:
    target = dict(rules).get("batch")
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    return math.prod(mesh.shape[a] for a in targets)


def batch_shards(mesh: Mesh, rules=DEFAULT_RULES) -> int:
    """How many ways the global batch is split (it must divide the global batch)."""
    return _batch_divisor(mesh, rules)


def global_batch_array(local_rows: np.ndarray, mesh: Mesh, rules=DEFAULT_RULES) -> jax.Array:
    """Assembles the global batch from this process's rows (multi-host safe)."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh, rules), local_rows)
