"""FLOP counting, measured matmul peak, throughput and metric writers of the trainer.

The loss itself is `models/losses.py`. `MetricsWriter` sends
scalars to TensorBoard, a JSONL file and the console, and writes nothing on processes other than
0 (every process computes the same global values).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

from teacherlm_jax.models.config import ModelConfig


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token: 6 x matmul parameters (LM head included, embedding lookups and
  norms excluded) plus attention scores and values (6 x 2 x layers x seq_len x heads x head_dim,
  full square counted as XLA computes it)."""
  d, f = config.hidden_size, config.mlp_dim
  h, k, hd = config.num_heads, config.kv_heads, config.dim_per_head
  attn_proj = d * h * hd + 2 * d * k * hd + h * hd * d
  mlp = (3 if config.family == "llama" else 2) * d * f
  head = config.embed_dim * config.vocab_size
  matmul_params = config.num_layers * (attn_proj + mlp) + head
  attention = 2 * config.num_layers * seq_len * h * hd
  return 6.0 * matmul_params + 6.0 * attention


def measure_matmul_peak_tflops(size: int = 1024, dtype=jnp.float32, repeats: int = 5) -> float:
  """Best TFLOP/s of a square matmul on one device: the 'peak' MFU is measured against when no
  vendor figure is configured (on CPU the nominal peak is unknown and shared)."""
  device = jax.local_devices()[0]
  a = jax.device_put(jnp.ones((size, size), dtype), device)
  b = jax.device_put(jnp.ones((size, size), dtype), device)
  # float32 accumulation, as the model's dots: XLA:CPU runs a bf16-output dot upcast (3x slower).
  matmul = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  matmul(a, b).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * size ** 3 / best / 1e12


class Throughput:
  """Tokens/s, TFLOP/s per device and MFU over the steps since the last report.

  The clock starts when the first step of a run finishes, so compilation is not counted.
  """

  def __init__(self, tokens_per_step: int, flops_per_token: float, num_devices: int,
               peak_tflops_per_device: float):
    self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
    self.num_devices, self.peak = num_devices, peak_tflops_per_device
    self._start = self._window_start = None
    self._in_window = 0
    self.timed_steps = 0

  @property
  def elapsed_s(self) -> float:
    return 0.0 if self._start is None else time.perf_counter() - self._start

  def step_done(self, step_outputs, steps: int = 1):
    """After a call of `steps` train steps whose outputs are `step_outputs`."""
    if self._start is None:
      jax.block_until_ready(step_outputs)
      self._start = self._window_start = time.perf_counter()
    else:
      self._in_window += steps
      self.timed_steps += steps

  def window_rates(self) -> Dict[str, float]:
    """Rates since the previous call (empty if no timed step); starts a new window."""
    now = time.perf_counter()
    steps, self._in_window = self._in_window, 0
    start, self._window_start = self._window_start, now
    if not steps:
      return {}
    elapsed = max(now - start, 1e-9)
    tokens_per_s = steps * self.tokens_per_step / elapsed
    tflops = tokens_per_s * self.flops_per_token / 1e12 / self.num_devices
    return {"steps_per_s": steps / elapsed, "tokens_per_s": tokens_per_s,
            "tflops_per_device": tflops, "mfu": tflops / self.peak}


def _format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  return str(datetime.timedelta(seconds=int(seconds)))


class MetricsWriter:
  """Scalars to TensorBoard (`<dir>/tensorboard`), `<dir>/metrics.jsonl` and the console.

  Only process 0 writes; on other processes every method is a no-op.
  """

  def __init__(self, model_dir: str, num_steps: int, tensorboard: bool = True,
               stream=None):
    self.enabled = jax.process_index() == 0
    self.num_steps = num_steps
    self.stream = stream or sys.stdout
    self._tb = None
    self._jsonl = None
    if not self.enabled:
      return
    os.makedirs(model_dir, exist_ok=True)
    self._jsonl = open(os.path.join(model_dir, "metrics.jsonl"), "a")
    if tensorboard:
      from tensorboardX import SummaryWriter  # Optional dependency at import time.
      self._tb = SummaryWriter(os.path.join(model_dir, "tensorboard"))

  def write(self, step: int, scalars: Dict[str, float], prefix: str = "train"):
    if not self.enabled:
      return
    record = {"step": step, "split": prefix, **{k: float(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for name, value in scalars.items():
        self._tb.add_scalar(f"{prefix}/{name}", float(value), step)
      self._tb.flush()

  def progress(self, step: int, scalars: Dict[str, float], elapsed_s: float,
               steps_done: int):
    """One line: step, loss, accuracy, lr, throughput, MFU and ETA."""
    if not self.enabled:
      return
    remaining = self.num_steps - step
    eta = elapsed_s / steps_done * remaining if steps_done else math.inf
    parts = [f"step {step}/{self.num_steps}", f"loss {scalars['loss']:.4f}",
             f"acc {scalars['accuracy']:.3f}", f"lr {scalars['learning_rate']:.2e}"]
    if "tokens_per_s" in scalars:
      parts.append(f"{scalars['tokens_per_s']:,.0f} tok/s")
      parts.append(f"{scalars['tflops_per_device']:.3f} TFLOP/s/dev")
    if "mfu" in scalars:
      parts.append(f"MFU {100 * scalars['mfu']:.1f}%")
    parts.append(f"ETA {_format_duration(eta)}")
    print(" | ".join(parts), file=self.stream, flush=True)

  def message(self, text: str):
    if self.enabled:
      print(text, file=self.stream, flush=True)

  def close(self):
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def mean_of(sums: Dict[str, np.ndarray], num_steps: int) -> Dict[str, float]:
  """Averages of per-step metric sums, as floats."""
  weight = float(sums["weight"])
  return {"loss": float(sums["loss_sum"]) / max(weight, 1.0),
          "accuracy": float(sums["correct"]) / max(weight, 1.0),
          "target_tokens": weight / max(num_steps, 1)}
