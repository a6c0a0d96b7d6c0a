"""How XLA compiles our programs on each platform: chosen once at launch, passed as jit options.

The models are the same math on every platform (`models/` never asks which one it runs on):
the config fixes every dtype, so a step traces to the same jaxpr on CPU and on TPU. What a
platform changes is only how XLA compiles that jaxpr, and that lives here:

  * XLA:CPU on Intel hosts with AVX-512 and AMX gives the dots of a training step to oneDNN
    (the library PyTorch's CPU matmuls use) rather than YNNPACK: all of them in a float32 step;
    in a bf16 step only the float32 ones, YNNPACK keeping its bf16 kernels;
  * XLA:CPU compiles a one-off parameter init without optimisation (it runs once);
  * TPU (and GPU) take XLA's defaults.

`Backend.for_mesh(mesh)` picks by the mesh's devices, so a step compiled ahead of time for a
TPU topology on a CPU host gets TPU options; `Backend.current()` by the default backend.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Optional

import jax
import jax.numpy as jnp

# The kinds of program a backend sets compiler options for.
TRAIN = "train"  # Large matmuls: training and evaluation steps.
DECODE = "decode"  # Small matmuls: prefill and single-token steps, scoring.
INIT = "init"  # Run once: parameter initialisation.
PROGRAMS = (TRAIN, DECODE, INIT)

# Each dot alone (INDIVIDUAL_DOT): oneDNN's DOT fusion type also folds a following multiply or
# divide by a broadcast operand into the GEMM, and this jaxlib computes that wrongly.
_ONEDNN_FLOAT32_DOTS = {"xla_cpu_use_onednn": True,
                        "xla_cpu_experimental_onednn_fusion_type":
                            "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
# Every dot through oneDNN; YNNPACK keeps only the reductions.
_ONEDNN_DOTS = {**_ONEDNN_FLOAT32_DOTS,
                "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
# A program that runs once need not be optimised (its values agree to 1 ulp).
_UNOPTIMIZED = {"xla_backend_optimization_level": 0}


def onednn_dots_supported(cpuinfo: Optional[str] = None) -> bool:
  """Whether XLA:CPU's oneDNN dot fusions are used on this host (or the `cpuinfo` text given).

  Only on Intel CPUs with AVX-512 and AMX (Sapphire Rapids and newer), the kind they were
  tested on: elsewhere XLA has aborted compiling oneDNN dot fusions (openxla/xla#32521 on AMD
  EPYC). False without /proc/cpuinfo (not Linux).
  """
  if cpuinfo is None:
    return _host_onednn_dots_supported()
  vendor = re.search(r"^vendor_id\s*:\s*(\S+)", cpuinfo, re.MULTILINE)
  flags = re.search(r"^flags\s*:(.*)$", cpuinfo, re.MULTILINE)
  return (vendor is not None and vendor.group(1) == "GenuineIntel"
          and flags is not None and {"avx512f", "amx_tile"} <= set(flags.group(1).split()))


@functools.lru_cache(maxsize=None)
def _host_onednn_dots_supported() -> bool:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      return onednn_dots_supported(f.read())
  except OSError:
    return False


@dataclasses.dataclass(frozen=True)
class Backend:
  """The compiler options of one platform.

  Attributes:
    platform: 'cpu', 'tpu' or 'gpu'.
    onednn_dots: XLA:CPU only: give training dots to oneDNN (`onednn_dots_supported`).
  """
  platform: str
  onednn_dots: bool = False

  @classmethod
  def for_platform(cls, platform: str) -> "Backend":
    return cls(platform, onednn_dots=platform == "cpu" and onednn_dots_supported())

  @classmethod
  def for_mesh(cls, mesh) -> "Backend":
    """The backend of the devices of `mesh` (a `Mesh`, or None for the default backend)."""
    if mesh is None:
      return cls.current()
    return cls.for_platform(mesh.devices.flat[0].platform)

  @classmethod
  def current(cls) -> "Backend":
    return _current(jax.default_backend())

  def compiler_options(self, program: str, dtype=jnp.float32) -> dict:
    """`jax.jit(compiler_options=...)` for a `program` (TRAIN, DECODE, INIT) computing in
    `dtype`."""
    if program not in PROGRAMS:
      raise ValueError(f"program {program!r}: expected one of {PROGRAMS}")
    if self.platform != "cpu":
      return {}
    if program == INIT:
      return dict(_UNOPTIMIZED)
    # Decode-sized products (a few rows) run faster on YNNPACK.
    if program == TRAIN and self.onednn_dots:
      if jnp.dtype(dtype) == jnp.float32:
        return dict(_ONEDNN_DOTS)
      if jnp.dtype(dtype) == jnp.bfloat16:
        return dict(_ONEDNN_FLOAT32_DOTS)
    return {}


@functools.lru_cache(maxsize=None)
def _current(platform: str) -> Backend:
  return Backend.for_platform(platform)
