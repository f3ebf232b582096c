"""Device mesh and the logical-axis table: the only place that says how arrays are laid out.

Model code names axes logically ('embed', 'heads', 'mlp', ...); the config's `mesh.rules`
maps each name to mesh axes of the ('data', 'fsdp', 'tensor') mesh. A dimension that a mesh
axis does not divide is replicated along it instead (e.g. 3 KV heads on 4 tensor shards).

Activations follow the same table: the trainer traces its step inside
`activation_sharding(mesh, rules)`, and model code calls `constrain(x, axes)` on its
activations (batch rows over ('data', 'fsdp'), so under FSDP each chip computes only its own
rows). Outside that context `constrain` is the identity (single-device eval, export).
"""
from __future__ import annotations

import contextlib
import functools
import math
import threading
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


# ----------------------------------------------------------------------------------------
# Activation sharding: a context set around tracing, read by the model code.
# ----------------------------------------------------------------------------------------

_ACTIVE = threading.local()


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules=DEFAULT_RULES):
    """Within this context, `constrain` lays activations out on `mesh` by `rules`."""
    previous = getattr(_ACTIVE, "layout", None)
    _ACTIVE.layout = (mesh, tuple((k, v) for k, v in rules))
    try:
        yield
    finally:
        _ACTIVE.layout = previous


def traced_under(mesh: Mesh, rules, fn):
    """`fn` that runs (and so is traced by jit) inside `activation_sharding(mesh, rules)`."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with activation_sharding(mesh, rules):
            return fn(*args, **kwargs)

    return wrapped


def current_mesh() -> Mesh | None:
    """The mesh of the enclosing `activation_sharding` context, if any."""
    layout = getattr(_ACTIVE, "layout", None)
    return None if layout is None else layout[0]


def current_rules() -> tuple:
    """The rules of the enclosing `activation_sharding` context (DEFAULT_RULES outside one)."""
    layout = getattr(_ACTIVE, "layout", None)
    return DEFAULT_RULES if layout is None else layout[1]


def current_platform() -> str:
    """Platform the traced code will run on: the context mesh's devices, else the default."""
    mesh = current_mesh()
    return jax.default_backend() if mesh is None else mesh.devices.flat[0].platform


def activation_spec(axes: Sequence[str | None], shape: Sequence[int]) -> P | None:
    """PartitionSpec of an activation in the current context (None outside one)."""
    layout = getattr(_ACTIVE, "layout", None)
    if layout is None:
        return None
    mesh, rules = layout
    return logical_to_spec(axes, shape, mesh, rules)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical axes; the identity outside a context."""
    layout = getattr(_ACTIVE, "layout", None)
    if layout is None:
        return x
    if len(axes) != x.ndim:
        raise ValueError(f"constrain: {len(axes)} axis names {tuple(axes)} for shape {x.shape}")
    mesh, rules = layout
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, rules)))
