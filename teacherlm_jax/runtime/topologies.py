"""Named TPU slices as compile targets: a slice name -> the TPU devices libtpu describes for it.

`devices('v5e-16')` gives the 16 `jax.Device`s of a v5e 4x4 slice without a TPU attached
(`jax.experimental.topologies`): `jax.jit(...).lower(...).compile()` over a mesh of them runs
the real TPU compiler on this host. Slices are named as Cloud TPU names accelerator types
(`v5e-16`); a raw topology (`v5e:2x2`, `v4:2x2x1`) is accepted too. v4 and v5p are described
with `chip_config_name='megacore'` (one device per chip, two TensorCores each), as they run:
their default description has one device per TensorCore, which halves each device's HBM.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import List, Tuple

import jax

from teacherlm_jax.runtime import chips

# Generations whose chips hold two TensorCores that run as one megacore device.
_MEGACORE = ("v4", "v5p")


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str        # accelerator type as Cloud TPU spells it ('v5e-16'), or the raw topology
  topology: str    # libtpu's topology name ('v5e:4x4')

  @property
  def chip(self) -> chips.Chip:
    return chips.by_name(self.topology.split(":")[0])


SLICES = (
    Slice("v4-8", "v4:2x2x1"),
    Slice("v4-32", "v4:2x2x4"),
    Slice("v5p-8", "v5p:2x2x1"),
    Slice("v5p-32", "v5p:2x2x4"),
    Slice("v5e-4", "v5e:2x2"),
    Slice("v5e-16", "v5e:4x4"),
    Slice("v5e-256", "v5e:16x16"),
    Slice("v6e-8", "v6e:2x4"),
    Slice("v6e-256", "v6e:16x16"),
)


def by_name(name: str) -> Slice:
  """The slice `name` ('v5e-16') or a raw topology ('v5e:2x2') of a known chip."""
  for entry in SLICES:
    if name in (entry.name, entry.topology):
      return entry
  generation, sep, shape = name.partition(":")
  known = [c.name for c in chips.CHIPS]
  if sep and shape and generation in known and generation.startswith("v"):
    return Slice(name, name)
  raise ValueError(f"--topology={name!r}: unknown TPU slice; known: "
                   f"{[s.name for s in SLICES]} or a topology 'GEN:AxB[xC]' of a TPU "
                   f"generation in runtime/chips.py")


@functools.lru_cache(maxsize=None)
def _devices(topology: str) -> Tuple[jax.Device, ...]:
  # libtpu takes a machine-wide lock meant for the processes driving real chips; compiling
  # needs no chip, so several compiling processes may share the host.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  generation = topology.split(":")[0]
  options = {"chip_config_name": "megacore"} if generation in _MEGACORE else {}
  description = topologies.get_topology_desc(topology_name=topology, platform="tpu", **options)
  return tuple(description.devices)


def devices(name: str) -> List[jax.Device]:
  """Every device of slice `name`, in libtpu's order (process by process)."""
  return list(_devices(by_name(name).topology))


def host_topology(name: str) -> str:
  """The topology of one host of slice `name` (the chips process 0 drives): what a per-host
  mesh (annotation, evaluation) compiles for. The compiler takes a program's devices to be a
  whole topology, so a host's chips inside a larger slice are described as their own."""
  entry = by_name(name)
  generation, shape = entry.topology.split(":")
  every = devices(name)
  host = [d for d in every if d.process_index == 0]
  if len(host) == len(every):
    return entry.topology
  extents = [max(d.coords[i] for d in host) - min(d.coords[i] for d in host) + 1
             for i in range(3)]
  return f"{generation}:" + "x".join(str(e) for e in extents[:len(shape.split("x"))])


def host_devices(name: str) -> List[jax.Device]:
  """The devices of one host of slice `name` (every host has as many)."""
  return list(_devices(host_topology(name)))
