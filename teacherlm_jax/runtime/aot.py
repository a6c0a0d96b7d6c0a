"""Ahead-of-time compiles for a TPU slice: one lowered step -> a record of what it needs.

`compile_step` compiles a `jax.stages.Lowered` (lowered over a mesh of `topologies.devices`)
with the real TPU compiler and reads the per-device HBM the program needs from
`memory_analysis()` (arguments + outputs + temporaries - aliased, i.e. donated, buffers). A
program larger than HBM fails to compile with RESOURCE_EXHAUSTED; that is recorded as
`fits: False` with the size the compiler reports (often its temporaries alone: at least that
much).
FLOPs: `cost_analysis()` counts a loop body once, so a model whose layers run as one
`lax.scan` shows about one layer's FLOPs. Its figure is kept as `cost_analysis_flops_per_device`;
`flops_per_device` is the step's analytic FLOPs (useful plus remat recomputation, from the
model's shapes) where the caller gives them, else the cost analysis figure (a loop-free
program's is right).
`estimate` turns a record into a roofline step time (FLOPs at peak, or HBM traffic at full
bandwidth, whichever is slower; no communication) and the MFU that time implies.
"""
from __future__ import annotations

import re
import time
from typing import Optional

import jax
from jax.sharding import Mesh

from teacherlm_jax.runtime import chips
from teacherlm_jax.runtime import partitioning
from teacherlm_jax.runtime import topologies

GiB = chips.GiB

# The TPU compiler's out-of-memory reports: what it needed (temporaries alone in the first
# form, so a lower bound of the program's HBM) and what the chip has.
_OUT_OF_MEMORY = (
    re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM"),
    re.compile(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm"),
)
_UNITS = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def hbm_bytes(memory) -> int:
  """Per-device HBM of a compiled program from its `memory_analysis()`."""
  return int(memory.argument_size_in_bytes + memory.output_size_in_bytes
             + memory.temp_size_in_bytes - memory.alias_size_in_bytes)


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per computation.
    cost = cost[0] if cost else {}
  return dict(cost or {})


def compile_step(step: str, lowered: jax.stages.Lowered, slice_name: str, mesh: Mesh,
                 model_flops_per_device: Optional[float] = None,
                 executed_flops_per_device: Optional[float] = None) -> dict:
  """Compiles `lowered` and returns its record:

  {step, topology, devices, mesh, hbm_bytes_per_device, hbm_capacity_bytes, fits,
   flops_per_device, flops_source, cost_analysis_flops_per_device, model_flops_per_device,
   bytes_accessed_per_device, argument_bytes_per_device, compile_s}

  `model_flops_per_device`: the step's useful FLOPs (no recomputation), for MFU;
  `executed_flops_per_device`: those plus what remat recomputes, the step's `flops_per_device`
  (`flops_source` 'analytic'). Without them both are the cost analysis figure.
  """
  chip = topologies.by_name(slice_name).chip
  record = {"step": step, "topology": slice_name, "devices": int(mesh.devices.size),
            "mesh": partitioning.mesh_shape(mesh), "hbm_capacity_bytes": chip.hbm_bytes}
  executed = executed_flops_per_device or model_flops_per_device
  start = time.perf_counter()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    matches = [m for m in (p.search(str(e)) for p in _OUT_OF_MEMORY) if m]
    if "RESOURCE_EXHAUSTED" not in str(e) or not matches:
      raise
    needed = float(matches[0].group(1)) * _UNITS[matches[0].group(2)]
    record.update(hbm_bytes_per_device=int(needed), fits=False, flops_per_device=executed,
                  flops_source="analytic" if executed else None,
                  cost_analysis_flops_per_device=None,
                  model_flops_per_device=model_flops_per_device,
                  bytes_accessed_per_device=None, argument_bytes_per_device=None,
                  compile_s=round(time.perf_counter() - start, 2))
    return record
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  needed = hbm_bytes(memory)
  cost = _cost(compiled)
  compiled_flops = None if cost.get("flops") is None else float(cost["flops"])
  record.update(
      hbm_bytes_per_device=needed, fits=needed <= chip.hbm_bytes,
      flops_per_device=executed or compiled_flops,
      flops_source="analytic" if executed else "cost_analysis",
      cost_analysis_flops_per_device=compiled_flops,
      model_flops_per_device=model_flops_per_device,
      bytes_accessed_per_device=cost.get("bytes accessed"),
      argument_bytes_per_device=int(memory.argument_size_in_bytes),
      compile_s=round(compile_s, 2))
  return record


def estimate(record: dict) -> dict:
  """Roofline estimate of a record's step: {'step_s', 'mfu', 'bound'} (None when the record
  has no FLOPs). The slower of compute at peak (`flops_per_device`) and HBM traffic at full
  bandwidth; overlap with communication and every other inefficiency is ignored, so real
  steps are slower. HBM traffic is at least the arguments read once: the cost analysis's
  bytes, like its FLOPs, count a scanned body once."""
  chip = topologies.by_name(record["topology"]).chip
  flops = record.get("flops_per_device")
  if not flops:
    return {"step_s": None, "mfu": None, "bound": None}
  compute_s = flops / chip.peak_bf16_flops
  traffic = max(record.get("bytes_accessed_per_device") or 0.0,
                record.get("argument_bytes_per_device") or 0.0)
  memory_s = traffic / chip.hbm_bytes_per_s
  step_s = max(compute_s, memory_s)
  useful = record.get("model_flops_per_device") or flops
  return {"step_s": step_s, "mfu": useful / (step_s * chip.peak_bf16_flops),
          "bound": "compute" if compute_s >= memory_s else "HBM bandwidth"}


def misfit_message(record: dict, what: str, remedy: str) -> str:
  """'train step needs 19.3 GiB of 16 GiB per chip on v5e-16: <remedy>'."""
  return (f"{what} needs {record['hbm_bytes_per_device'] / GiB:.1f} GiB of "
          f"{record['hbm_capacity_bytes'] / GiB:.3g} GiB per chip on {record['topology']}: "
          f"{remedy}")
