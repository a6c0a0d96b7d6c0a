"""Model FLOP utilisation: training FLOPs per token, the peak each device is measured against,
and clu's progress report extended with tokens/s, TFLOP/s per device and MFU.

The peak is the vendor's dense bf16 figure for the chip (`runtime/chips.py`), as MaxText and
the PaLM paper report MFU; only on CPU, which has no vendor figure, is a matmul timed.
`LoggingConfig.peak_tflops_per_device` overrides both.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp
from clu import periodic_actions

from teacherlm_jax.models.config import ModelConfig
from teacherlm_jax.runtime import chips


def _block_matmul_params(config: ModelConfig) -> int:
  """Matmul parameters of the blocks: attention projections and MLP, every layer."""
  d, f = config.hidden_size, config.mlp_dim
  h, k, hd = config.num_heads, config.kv_heads, config.dim_per_head
  attn_proj = d * h * hd + 2 * d * k * hd + h * hd * d
  mlp = (3 if config.family == "llama" else 2) * d * f
  return config.num_layers * (attn_proj + mlp)


def _attention_macs_per_token(config: ModelConfig, seq_len: int) -> int:
  """Multiply-adds of attention scores and values per token, every layer (the full square)."""
  return 2 * config.num_layers * seq_len * config.num_heads * config.dim_per_head


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token: 6 x matmul parameters (LM head included, embedding lookups and
  norms excluded) plus attention scores and values (6 x 2 x layers x seq_len x heads x head_dim,
  full square counted as XLA computes it)."""
  head = config.embed_dim * config.vocab_size
  matmul_params = _block_matmul_params(config) + head
  return 6.0 * matmul_params + 6.0 * _attention_macs_per_token(config, seq_len)


# What each remat policy (models/transformer.REMAT_POLICIES) recomputes in the backward pass
# beyond the saved values: the blocks' projections, attention, both or neither.
_RECOMPUTED = {"none": (), "dots": (), "full": ("projections", "attention"),
               "save_projections": ("attention",), "save_attention": ("projections",)}


def recomputed_flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """Forward FLOPs per trained token that `config.remat` runs a second time in the backward
  pass (not useful work: excluded from MFU, included in the time a step takes)."""
  recomputed = _RECOMPUTED[config.remat]
  flops = 0.0
  if "projections" in recomputed:
    flops += 2.0 * _block_matmul_params(config)
  if "attention" in recomputed:
    flops += 2.0 * _attention_macs_per_token(config, seq_len)
  return flops


def measure_matmul_peak_tflops(size: int = 1024, dtype=jnp.float32, repeats: int = 5) -> float:
  """Best TFLOP/s of a square matmul on one device: CPU's stand-in for a vendor peak."""
  device = jax.local_devices()[0]
  a = jax.device_put(jnp.ones((size, size), dtype), device)
  b = jax.device_put(jnp.ones((size, size), dtype), device)
  # float32 accumulation, as the model's dots: XLA:CPU runs a bf16-output dot upcast (slower).
  matmul = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  matmul(a, b).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * size ** 3 / best / 1e12


def peak_flops_per_device(device_kind: str, platform: str, *, override_tflops: float = 0.0,
                          measure_cpu_tflops: Callable[[], float] = measure_matmul_peak_tflops
                          ) -> Optional[float]:
  """FLOP/s one device's MFU is measured against; None where no peak is known.

  Args:
    device_kind, platform: of the device (`jax.devices()[0].device_kind`, `.platform`).
    override_tflops: `LoggingConfig.peak_tflops_per_device`; above 0 it wins everywhere.
    measure_cpu_tflops: called on CPU only, which has no vendor figure.
  """
  if override_tflops > 0:
    return override_tflops * 1e12
  chip = chips.for_device_kind(device_kind)
  if chip is not None:
    return chip.peak_bf16_flops
  if platform == "cpu":
    return measure_cpu_tflops() * 1e12
  return None


def throughput_scalars(steps_per_sec: float, *, tokens_per_step: int, flops_per_token: float,
                       num_devices: int, peak_flops_per_device: Optional[float]
                       ) -> Dict[str, float]:
  """tokens/s, TFLOP/s per device and (with a peak) MFU at `steps_per_sec` optimizer steps/s."""
  tokens_per_sec = steps_per_sec * tokens_per_step
  flops_per_sec_per_device = tokens_per_sec * flops_per_token / num_devices
  scalars = {"tokens_per_sec": tokens_per_sec,
             "tflops_per_sec_per_device": flops_per_sec_per_device / 1e12}
  if peak_flops_per_device:
    scalars["mfu"] = flops_per_sec_per_device / peak_flops_per_device
  return scalars


class ReportThroughput(periodic_actions.ReportProgress):
  """clu's `ReportProgress` (steps/s, uptime, ETA in the log) that also writes tokens/s,
  TFLOP/s per device and MFU over the same window."""

  def __init__(self, *, tokens_per_step: int, flops_per_token: float, num_devices: int,
               peak_flops_per_device: Optional[float], **report_progress_kwargs):
    super().__init__(**report_progress_kwargs)
    self._rates = dict(tokens_per_step=tokens_per_step, flops_per_token=flops_per_token,
                       num_devices=num_devices, peak_flops_per_device=peak_flops_per_device)

  def _apply(self, step: int, t: float):
    # The window since the previous report, as ReportProgress measures steps/s.
    steps_per_sec = (step - self._previous_step) / (t - self._previous_time)
    super()._apply(step, t)
    if self._writer is not None:
      self._writer.write_scalars(step, throughput_scalars(steps_per_sec, **self._rates))
