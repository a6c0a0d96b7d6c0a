"""The one way a model runs on a mesh: split it, place its params by their logical axes, jit
with shardings and the backend's compiler options, and call under the mesh.

The trainer, the decoder and the scorer each hold a `Program`. Without a mesh it places
nothing and jits plainly (one device, tests); with one, `jit` returns a function whose calls,
traces and lowerings run inside `jax.set_mesh(mesh)`, so `partitioning.constrain` in the model
sees the mesh JAX provides. A mesh of TPU topology devices (ahead-of-time compiles on a CPU
host) gets the TPU backend's options, and an abstract model (`nnx.eval_shape`) splits into
sharded `ShapeDtypeStruct`s, so every step can be lowered for a slice that is not here.
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from teacherlm_jax.runtime import backend as backend_lib
from teacherlm_jax.runtime import partitioning


class MeshJit:
  """A `jax.jit` function whose calls, `trace` and `lower` run under its mesh."""

  def __init__(self, jitted, mesh: Optional[Mesh]):
    self.jitted, self.mesh = jitted, mesh

  def _context(self):
    # Already under this mesh: a call traced inside another (`jax.eval_shape`, an outer jit).
    if self.mesh is None or jax.sharding.get_abstract_mesh() == self.mesh.abstract_mesh:
      return contextlib.nullcontext()
    return jax.set_mesh(self.mesh)

  def __call__(self, *args, **kwargs):
    with self._context():
      return self.jitted(*args, **kwargs)

  def trace(self, *args, **kwargs):
    with self._context():
      return self.jitted.trace(*args, **kwargs)

  def lower(self, *args, **kwargs):
    with self._context():
      return self.jitted.lower(*args, **kwargs)


class Program:
  """Placement and compilation of one model's programs on `mesh` (None: one device)."""

  def __init__(self, mesh: Optional[Mesh] = None,
               backend: Optional[backend_lib.Backend] = None):
    self.mesh = mesh
    self.backend = backend or backend_lib.Backend.for_mesh(mesh)

  # ---- placement -------------------------------------------------------------------------

  @property
  def data_parallelism(self) -> int:
    """Rows must come in multiples of this (the batch is split over 'data' and 'fsdp')."""
    if self.mesh is None:
      return 1
    return int(self.mesh.shape["data"] * self.mesh.shape["fsdp"])

  def sharding(self, names: Sequence[Optional[str]]) -> Optional[NamedSharding]:
    """The sharding of an array with logical axes `names` (None without a mesh)."""
    if self.mesh is None:
      return None
    return NamedSharding(self.mesh, partitioning.logical_to_spec(names, mesh=self.mesh))

  def shardings(self, logical_tree):
    """Shardings for a tree whose leaves are tuples of logical axis names (None: no mesh)."""
    if self.mesh is None:
      return None
    return partitioning.logical_shardings(logical_tree, self.mesh)

  @property
  def replicated(self) -> Optional[NamedSharding]:
    return None if self.mesh is None else partitioning.replicated(self.mesh)

  def put(self, array, names: Sequence[Optional[str]]) -> jax.Array:
    """`array` placed by its logical axes `names`."""
    sharding = self.sharding(names)
    return jnp.asarray(array) if sharding is None else jax.device_put(array, sharding)

  def split(self, model: nnx.Module) -> Tuple[nnx.GraphDef, Any]:
    """(graphdef, params as a pure dict placed by their `logical_axes`).

    An abstract model (`nnx.eval_shape`) gives `ShapeDtypeStruct`s carrying their shardings
    (what `lower` and `trace` take), a concrete one arrays on the mesh.
    """
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    shardings = self.shardings(partitioning.logical_axes_of(state))
    if shardings is None:
      return graphdef, params
    def place(x, sharding):
      if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
      return jax.device_put(x, sharding)
    return graphdef, jax.tree.map(place, params, shardings)

  # ---- compilation -----------------------------------------------------------------------

  def jit(self, fn, *, program: str, dtype=jnp.float32, in_shardings=None, out_shardings=None,
          compiler_options: Optional[dict] = None, **jit_kwargs) -> MeshJit:
    """`jax.jit(fn)` with shardings (ignored without a mesh) and the backend's compiler
    options for `program` (`backend.TRAIN`, `DECODE`, `INIT`) computing in `dtype`;
    `compiler_options` replaces those. Other keywords go to `jax.jit`."""
    if compiler_options is None:
      compiler_options = self.backend.compiler_options(program, dtype)
    if self.mesh is not None:
      if in_shardings is not None:
        jit_kwargs["in_shardings"] = in_shardings
      if out_shardings is not None:
        jit_kwargs["out_shardings"] = out_shardings
    return MeshJit(jax.jit(fn, compiler_options=compiler_options or None, **jit_kwargs),
                   self.mesh)
