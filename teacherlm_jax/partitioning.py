"""Device mesh, logical-axis rules, and placement of params, batches and caches.

A layout is a table: every parameter, activation constraint and cache carries logical axis
names (`embed`, `heads`, `mlp`, ...); `LOGICAL_AXIS_RULES` maps them to the mesh axes
('data', 'fsdp', 'tensor'). Changing how a model is sharded means changing the table.

Model code calls `constrain(x, names)`; it is a no-op unless a mesh is active via
`activate(mesh, rules)`, so the same model runs unsharded in tests and sharded under jit.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Optional, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LogicalRules = Tuple[Tuple[str, object], ...]

# Logical name -> mesh axis (or tuple of axes, or None = replicated).
LOGICAL_AXIS_RULES: LogicalRules = (
    # Parameters.
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("qkv", None),
    ("mlp", "tensor"),
    ("positions", None),
    ("norm", None),
    # Activations.
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    # Batches of inputs.
    ("batch", ("data", "fsdp")),
    ("length", None),
    # KV caches.
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", None),
    ("cache_kv_heads", "tensor"),
    ("cache_head_dim", None),
)

_state = threading.local()


def logical_to_spec(names: Sequence[Optional[str]], rules: LogicalRules = LOGICAL_AXIS_RULES,
                    mesh: Optional[Mesh] = None) -> PartitionSpec:
  """PartitionSpec for logical axis `names` under `rules`.

  A mesh axis is used at most once per array (the first logical axis that claims it wins),
  and axes of size 1 in `mesh` are dropped, so one table serves every mesh shape.
  """
  table = dict(rules)
  used = set()
  spec = []
  for name in names:
    target = table.get(name) if name is not None else None
    if name is not None and name not in table:
      raise ValueError(f"logical axis {name!r} has no rule; add it to LOGICAL_AXIS_RULES")
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a not in used and (mesh is None or mesh.shape[a] > 1))
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: LogicalRules = LOGICAL_AXIS_RULES):
  """Makes `constrain` place activations on `mesh` while tracing inside this context."""
  previous = getattr(_state, "active", None)
  _state.active = (mesh, rules)
  try:
    yield mesh
  finally:
    _state.active = previous


def active_mesh() -> Optional[Mesh]:
  active = getattr(_state, "active", None)
  return active[0] if active else None


def constrain(x: jax.Array, names: Sequence[Optional[str]]) -> jax.Array:
  """`with_sharding_constraint` by logical names; identity when no mesh is active."""
  active = getattr(_state, "active", None)
  if active is None:
    return x
  mesh, rules = active
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules, mesh)))


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; one size may be -1 to fill the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: at most one may be -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if known <= 0 or len(devices) % known:
      raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} cannot fill {len(devices)} "
                       f"devices: the fixed sizes must divide the device count")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} has {int(np.prod(sizes))} devices but "
                     f"{len(devices)} are available; make data*fsdp*tensor equal the device count "
                     "or set one axis to -1")
  device_array = np.asarray(devices).reshape(sizes)
  return Mesh(device_array, MESH_AXES)
