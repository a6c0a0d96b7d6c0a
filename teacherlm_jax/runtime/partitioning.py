"""Device mesh, logical-axis rules, and placement of params, batches and caches.

A layout is a table: every parameter, activation constraint and cache carries logical axis
names (`embed`, `heads`, `mlp`, ...); `LOGICAL_AXIS_RULES` maps them to the mesh axes
('data', 'fsdp', 'tensor'). Changing how a model is sharded means changing the table.

Model code calls `constrain(x, names)`; it reads the mesh JAX provides while tracing
(`jax.set_mesh(mesh)`, which `runtime/program.py` enters around every call it jits) and is a
no-op without one, so the same model runs unsharded in tests and sharded under jit.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LogicalRules = Tuple[Tuple[str, object], ...]

# Logical name -> mesh axis (or tuple of axes, or None = replicated).
LOGICAL_AXIS_RULES: LogicalRules = (
    # Parameters.
    ("layers", None),  # The stacked blocks' leading axis: every device holds every layer.
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
    ("cache_layers", None),
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", None),
    ("cache_kv_heads", "tensor"),
    ("cache_head_dim", None),
)

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


def _context_mesh():
  """The mesh of the enclosing `jax.set_mesh`, or None."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def shard_count(names: Sequence[Optional[str]]) -> int:
  """How many pieces an array with logical axes `names` is split into on the context mesh (1
  with none): the divisor from a whole array's size to one device's part."""
  mesh = _context_mesh()
  if mesh is None:
    return 1
  count = 1
  for entry in logical_to_spec(names, LOGICAL_AXIS_RULES, mesh):
    for axis in (entry,) if isinstance(entry, str) else entry or ():
      count *= mesh.shape[axis]
  return count


def constrain(x: jax.Array, names: Sequence[Optional[str]]) -> jax.Array:
  """`with_sharding_constraint` by logical names on the context mesh; identity without one."""
  mesh = _context_mesh()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, LOGICAL_AXIS_RULES, mesh))


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


# ---------------------------------------------------------------------------------------------
# Placement: parameters by their logical axes, batches, multi-host start-up.


def mesh_shape(mesh: Mesh) -> dict:
  return {name: int(mesh.shape[name]) for name in MESH_AXES}


def logical_axes_of(abstract_state) -> dict:
  """Pure dict of the `logical_axes` metadata of every variable in an `nnx.State`."""
  def axes(variable):
    names = variable.get_metadata().get("logical_axes")
    if names is None:
      raise ValueError(f"parameter {variable!r} has no 'logical_axes' metadata; every nnx.Param "
                       "must name its axes so it can be sharded")
    return tuple(names)
  is_variable = lambda x: isinstance(x, nnx.Variable)
  return nnx.to_pure_dict(jax.tree.map(axes, abstract_state, is_leaf=is_variable))


def logical_shardings(logical_tree, mesh: Mesh, rules: LogicalRules = LOGICAL_AXIS_RULES):
  """NamedShardings for a tree whose leaves are tuples of logical axis names."""
  is_names = lambda x: isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)
  return jax.tree.map(lambda names: NamedSharding(mesh, logical_to_spec(names, rules, mesh)),
                      logical_tree, is_leaf=is_names)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def check_batch_divides(batch_size: int, mesh: Mesh, rules: LogicalRules = LOGICAL_AXIS_RULES,
                        what: str = "batch_size"):
  """Raises if `batch_size` rows cannot be split evenly over the mesh axes of 'batch'."""
  spec = logical_to_spec(("batch",), rules, mesh)[0]
  axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
  shards = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
  if batch_size % shards:
    sizes = "*".join(f"{a}={mesh.shape[a]}" for a in axes)
    raise ValueError(f"{what}={batch_size} does not divide over the batch mesh axes ({sizes} = "
                     f"{shards} shards); make {what} a multiple of {shards} or change the mesh")
  if batch_size % jax.process_count():
    raise ValueError(f"{what}={batch_size} does not divide over {jax.process_count()} processes; "
                     f"make it a multiple of {jax.process_count()}")


def batch_sharding(mesh: Mesh, ndim: int = 2, rules: LogicalRules = LOGICAL_AXIS_RULES,
                   stacked: bool = False):
  """Rows over the batch axes. `stacked`: arrays with a leading, unsharded axis of batches
  (one per train step of a multi-step call) before the rows."""
  names = ("batch", "length") + (None,) * (ndim - 2)
  spec = logical_to_spec(names[:ndim - stacked], rules, mesh)
  return NamedSharding(mesh, PartitionSpec(None, *spec) if stacked else spec)


def process_batch_rows(mesh: Mesh, global_batch_size: int,
                       rules: LogicalRules = LOGICAL_AXIS_RULES) -> Tuple[int, int]:
  """The [start, stop) rows of a global batch that this process's devices hold.

  Derived from the batch sharding itself, so it is right for any mesh (including meshes where
  a process's devices share rows because the batch is replicated over 'tensor').
  """
  sharding = batch_sharding(mesh, 1, rules)
  slices = sharding.addressable_devices_indices_map((global_batch_size,)).values()
  starts = [s[0].start or 0 for s in slices]
  stops = [global_batch_size if s[0].stop is None else s[0].stop for s in slices]
  start, stop = min(starts), max(stops)
  covered = set()
  for a, b in zip(starts, stops):
    covered.update(range(a, b))
  if covered != set(range(start, stop)):
    raise ValueError(f"process {jax.process_index()} holds non-contiguous batch rows under mesh "
                     f"{mesh_shape(mesh)}; order the mesh devices by process")
  return start, stop


def shard_batch(local_batch: dict, mesh: Mesh, global_batch_size: int,
                rules: LogicalRules = LOGICAL_AXIS_RULES, stacked: bool = False) -> dict:
  """Global jax.Arrays from this process's rows (`process_batch_rows`) of a batch of numpy
  arrays, via `jax.make_array_from_process_local_data` (the multi-host input path).

  `stacked`: each array holds several batches along a leading axis ([steps, rows, ...]).
  """
  out = {}
  for name, local in local_batch.items():
    local = np.asarray(local)
    global_shape = local.shape[:stacked] + (global_batch_size,) + local.shape[1 + stacked:]
    out[name] = jax.make_array_from_process_local_data(
        batch_sharding(mesh, local.ndim, rules, stacked), local, global_shape)
  return out


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None,
                           local_device_ids: Optional[Sequence[int]] = None):
  """`jax.distributed.initialize`, with gloo collectives when running on CPU.

  On TPU pods all arguments may be None (they are discovered). On CPU (tests, one machine
  with several processes) pass the coordinator `127.0.0.1:PORT`, the process count and id.
  Must run before any other JAX call that touches devices.
  """
  if num_processes is not None and num_processes > 1 and jax.config.jax_platforms in (None, "",
                                                                                       "cpu"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             local_device_ids=local_device_ids)
