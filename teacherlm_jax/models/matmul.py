"""The one matmul the models use: operands in the compute dtype, float32 accumulation, both
ways.

`einsum(spec, a, b)` returns float32, as the MXU accumulates on TPU. Its gradient keeps the
same contract: the incoming float32 cotangent is rounded to the operands' dtype and the two
backward matmuls again take compute-dtype operands and accumulate in float32. Plain autodiff
would not: JAX transposes a `preferred_element_type=float32` dot into a float32 x bf16 dot,
promotes the bf16 operand, and so runs every backward matmul of a bf16 model in float32
(on XLA:CPU that was 80% of the bf16 train step's matmul time). Rounding the cotangent to
bf16 is what mixed precision does everywhere (torch autocast, T5X); for float32 models the
rounding is the identity and this is exactly autodiff's gradient.
"""
from __future__ import annotations

import collections
import functools
import re
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


def _parse(spec: str):
  inputs, out = spec.replace(" ", "").split("->")
  a_axes, b_axes = inputs.split(",")
  counts = collections.Counter(a_axes + b_axes + out)
  if any(count < 2 for count in counts.values()):
    # Every axis is contracted (a, b), batched (a, b, out) or kept (one operand and out):
    # then each gradient is itself an einsum of the other two, with no sum to undo.
    raise ValueError(f"matmul.einsum({spec!r}): each axis must appear in at least two of the "
                     "operands and the output (a matmul with batch axes)")
  return a_axes, b_axes, out


def batched_operand_dtype(dtype, platform: str) -> jnp.dtype:
  """The dtype a batched product (attention) takes its `dtype` operands in on `platform`.

  XLA:CPU runs a bf16 x bf16 -> f32 dot only through YNNPACK; a batched product in an operand
  layout YNNPACK rejects (attention with some remat policies and shapes) falls back to the
  generic DotThunk, which fails with "Unsupported element type ... BF16 x BF16 = F32". The
  batched products are the small ones: on CPU they take float32 operands. (The decoder keeps
  a bf16 model's KV cache in this dtype, so that it is not widened at every step.)
  """
  if platform == "cpu":
    return jnp.promote_types(dtype, jnp.float32)
  return jnp.dtype(dtype)


# XLA:CPU debug options that give dots to oneDNN (the library PyTorch's CPU matmuls use) rather
# than YNNPACK, which otherwise claims every dot fusion. Each dot alone (INDIVIDUAL_DOT):
# oneDNN's DOT fusion type also folds a following multiply or divide by a broadcast operand into
# the GEMM, and this jaxlib computes that wrongly (`0.125 * (a @ b)` off by ~1e4, `scores /
# sqrt(d)` alike; the chunked loss's gradient scaling hit it).
# A bf16 step: oneDNN takes only the float32 dots (attention's batched products, see
# `batched_operand_dtype`) and YNNPACK keeps its default fusions, among them the bf16 x bf16 ->
# float32 dots, which its AMX kernels run faster than oneDNN.
_ONEDNN_FLOAT32_DOTS = {"xla_cpu_use_onednn": True,
                        "xla_cpu_experimental_onednn_fusion_type":
                            "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
# A float32 step: every dot through oneDNN; YNNPACK keeps only the reductions.
_ONEDNN_DOTS = {**_ONEDNN_FLOAT32_DOTS,
                "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def onednn_dots_supported(cpuinfo: Optional[str] = None) -> bool:
  """Whether XLA:CPU's oneDNN dot fusions are used on this host (or the `cpuinfo` text given).

  Only on Intel CPUs with AVX-512 and AMX (Sapphire Rapids and newer), the kind they were
  measured and tested on: which library is faster depends on the CPU, and on one CI host (its
  CPU not reported) XLA aborted the whole process, with no message, compiling a oneDNN dot
  fusion; upstream reports oneDNN fusion failures on AMD EPYC Milan (openxla/xla#32521).
  Elsewhere the step keeps XLA's default YNNPACK dots. False without /proc/cpuinfo (not Linux).
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


def large_matmul_compiler_options(dtype, platform: str) -> dict:
  """`jax.jit(compiler_options=...)` for a step of large `dtype` matmuls (training) on `platform`.

  On CPU, float32 dots of thousands of rows run faster through oneDNN: the BLOOM-42M float32
  train step took 1.06-1.15x less time in three same-process A/Bs, losses equal to 1e-6 (with
  the DOT fusion type; each dot alone measured within noise of it, 443 vs 471 tokens/s). A
  bf16 step keeps its bf16 dots on YNNPACK (oneDNN's path there ran the step at 0.65x of
  YNNPACK's AMX kernels) and gives oneDNN attention's float32 batched products, which YNNPACK
  ran at 36-54 GFLOP/s (18% of the step) and oneDNN at 90-190: the step 1.06-1.15x faster in
  four same-process A/Bs. Not for decode steps (32-row products: the LM head 4x slower
  through oneDNN), nor on a host where `onednn_dots_supported()` is False.
  """
  if platform != "cpu" or not onednn_dots_supported():
    return {}
  if jnp.dtype(dtype) == jnp.float32:
    return dict(_ONEDNN_DOTS)
  if jnp.dtype(dtype) == jnp.bfloat16:
    return dict(_ONEDNN_FLOAT32_DOTS)
  return {}


def einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """jnp.einsum(spec, a, b) accumulated and returned in float32; see the module doc.

  `jax.checkpoint` policies do not see the dot inside (it is a custom VJP): a caller whose
  output a remat policy should save names it with `jax.ad_checkpoint.checkpoint_name`.
  """
  a_axes, b_axes, out_axes = _parse(spec)
  batched = bool(set(a_axes) & set(b_axes) & set(out_axes))
  if batched:
    platform = jax.default_backend()
    a = a.astype(batched_operand_dtype(a.dtype, platform))
    b = b.astype(batched_operand_dtype(b.dtype, platform))
  return _einsum(spec, a, b)


def product(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """jnp.einsum(spec, a, b) accumulated in float32; float32 operands as one 2-D dot where the
  axes allow it.

  A weight gradient contracts the token axes (b, l), the leading axes of both operands. As an
  einsum, XLA:CPU first copies one operand transposed into a fresh buffer (the [2048, 32000]
  logits gradient, or a [2048, 2048] MLP activation fused with its GELU gradient: a quarter of
  the profiled BLOOM-42M float32 train step); as a 2-D dot over the flattened token axis, the
  GEMM (oneDNN) reads the operand transposed in place. Not for bf16 operands: XLA:CPU's bf16
  GEMMs (YNNPACK) do not take a transposed operand, and the step ran at 0.89x. Applies when
  each operand is its contracted axes followed or preceded by its kept axes and the output is
  the kept axes of one operand then the other's.
  """
  a_axes, b_axes, out_axes = _parse(spec)
  contracted = "".join(axis for axis in a_axes if axis in b_axes and axis not in out_axes)
  a_kept = "".join(axis for axis in a_axes if axis not in contracted)
  b_kept = "".join(axis for axis in b_axes if axis not in contracted)
  blocked = lambda axes, kept: axes in (contracted + kept, kept + contracted)
  if (a.dtype != jnp.float32 or b.dtype != jnp.float32
      or out_axes not in (a_kept + b_kept, b_kept + a_kept) or set(a_kept) & set(b_kept)
      or not blocked(a_axes, a_kept) or not blocked(b_axes, b_kept)):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
  if out_axes == b_kept + a_kept:  # Swap the operands rather than transpose the product.
    a, b, a_axes, b_axes, a_kept, b_kept = b, a, b_axes, a_axes, b_kept, a_kept

  def as_matrix(x, axes, kept):
    """x as [contracted, kept] or [kept, contracted]; and which of its axes is contracted."""
    sizes = dict(zip(axes, x.shape))
    size = lambda names: int(np.prod([sizes[name] for name in names]))
    if axes.startswith(contracted):
      return x.reshape(size(contracted), size(kept)), 0
    return x.reshape(size(kept), size(contracted)), 1

  a_matrix, a_contracted = as_matrix(a, a_axes, a_kept)
  b_matrix, b_contracted = as_matrix(b, b_axes, b_kept)
  matrix = jax.lax.dot_general(a_matrix, b_matrix, (((a_contracted,), (b_contracted,)), ((), ())),
                               preferred_element_type=jnp.float32)
  sizes = dict(zip(a_axes, a.shape)) | dict(zip(b_axes, b.shape))
  return matrix.reshape([sizes[axis] for axis in out_axes])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _forward(spec, a, b):
  return _einsum(spec, a, b), (a, b)


def _backward(spec, residuals, out_grad):
  a, b = residuals
  a_axes, b_axes, out_axes = _parse(spec)
  grad = out_grad.astype(jnp.promote_types(a.dtype, b.dtype))
  a_grad = product(f"{out_axes},{b_axes}->{a_axes}", grad, b)
  b_grad = product(f"{a_axes},{out_axes}->{b_axes}", a, grad)
  return a_grad.astype(a.dtype), b_grad.astype(b.dtype)


_einsum.defvjp(_forward, _backward)
