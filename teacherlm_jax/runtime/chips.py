"""Vendor figures per accelerator generation: HBM size and bandwidth per device, dense bf16
peak FLOP/s.

MFU is reported against these published peaks, never against a matmul timed at start-up
(which flatters a chip that runs below its peak). CPU has no vendor peak: callers measure one.
Figures are per JAX device: on v4 and v5p that is one megacore chip (two TensorCores).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str                  # our short name, as in topology names ('v5e', 'h100')
  device_kind: str           # what `jax.devices()[0].device_kind` reports
  hbm_bytes: int             # memory per JAX device
  peak_bf16_flops: float     # dense bf16 FLOP/s per JAX device
  hbm_bytes_per_s: float     # HBM bandwidth per JAX device (roofline step-time estimates)


CHIPS = (
    Chip("v4", "TPU v4", 32 * GiB, 275e12, 1228e9),
    Chip("v5e", "TPU v5 lite", 16 * GiB, 197e12, 819e9),
    Chip("v5p", "TPU v5", 95 * GiB, 459e12, 2765e9),
    Chip("v6e", "TPU v6 lite", 32 * GiB, 918e12, 1640e9),
    Chip("a100", "NVIDIA A100-SXM4-80GB", 80 * GiB, 312e12, 2039e9),
    Chip("h100", "NVIDIA H100 80GB HBM3", 80 * GiB, 989e12, 3350e9),
    Chip("h200", "NVIDIA H200", 141 * GiB, 989e12, 4800e9),
)


def by_name(name: str) -> Chip:
  for chip in CHIPS:
    if chip.name == name:
      return chip
  raise ValueError(f"unknown chip {name!r}; known: {[c.name for c in CHIPS]}")


def for_device_kind(device_kind: str) -> Optional[Chip]:
  """The chip whose `device_kind` matches (exactly, else by prefix for GPU SKUs); None on CPU."""
  for chip in CHIPS:
    if device_kind == chip.device_kind:
      return chip
  for chip in CHIPS:
    if chip.device_kind.startswith("NVIDIA") and device_kind.startswith(chip.device_kind[:11]):
      return chip
  return None
