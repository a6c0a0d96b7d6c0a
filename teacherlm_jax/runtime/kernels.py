"""Which attention implementation and kernel tiles each platform runs: chosen once at launch
and passed to the model as ModelConfig fields (the model never reads the backend)."""
from __future__ import annotations

from typing import Dict, Tuple

from teacherlm_jax.runtime import chips

_DEFAULT_ATTENTION_IMPL = {"tpu": "pallas", "gpu": "cudnn", "cuda": "cudnn", "rocm": "xla",
                           "cpu": "xla"}
# (query rows, keys) per grid step of the 'pallas' kernel. Starting points, not yet timed on
# the chips: 512 x 512 as MaxText's splash defaults (a 1 MiB float32 score tile, well inside
# v4's 16 MiB default scoped VMEM); v6e's 256-wide MXU takes twice the keys per step.
_ATTENTION_BLOCKS = {"v4": (512, 512), "v5e": (512, 512), "v5p": (512, 512),
                     "v6e": (512, 1024)}


def default_attention_impl(platform: str) -> str:
  """The attention implementation for `platform` ('tpu', 'gpu', 'cpu', ...)."""
  return _DEFAULT_ATTENTION_IMPL.get(platform, "xla")


def attention_blocks(device_kind: str) -> Tuple[int, int]:
  """The 'pallas' kernel's (block_q, block_kv) for a TPU of `device_kind` (512 x 512 if
  unknown)."""
  chip = chips.for_device_kind(device_kind)
  return _ATTENTION_BLOCKS.get(chip.name if chip else "", (512, 512))


def attention_options(attention_impl: str, device) -> Dict[str, object]:
  """ModelConfig fields for attention on `device` (a jax Device, or a TPU topology's device
  for an ahead-of-time compile): `attention_impl` as given, or the platform's default if
  empty, and the kernel tiles of its chip."""
  impl = attention_impl or default_attention_impl(device.platform)  # ModelConfig checks it.
  block_q, block_kv = attention_blocks(device.device_kind)
  return {"attention_impl": impl, "attention_block_q": block_q,
          "attention_block_kv": block_kv}
