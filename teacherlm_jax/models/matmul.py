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

import jax
import jax.numpy as jnp


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


# XLA:CPU debug options: dots through oneDNN (the library PyTorch's CPU matmuls use) rather
# than YNNPACK, which otherwise claims every dot fusion; YNNPACK keeps the reductions.
_ONEDNN_DOTS = {"xla_cpu_use_onednn": True,
                "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT",
                "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def large_matmul_compiler_options(dtype, platform: str) -> dict:
  """`jax.jit(compiler_options=...)` for a step of large `dtype` matmuls (training) on `platform`.

  On CPU, float32 dots of thousands of rows run faster through oneDNN: the BLOOM-42M float32
  train step took 1.06-1.15x less time in three same-process A/Bs, losses equal to 1e-6. Not
  for bf16 (oneDNN's path there ran the step at 0.65x of YNNPACK's AMX kernels) nor for decode
  steps (32-row products: the LM head 4x slower through oneDNN).
  """
  if platform == "cpu" and jnp.dtype(dtype) == jnp.float32:
    return dict(_ONEDNN_DOTS)
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _forward(spec, a, b):
  return _einsum(spec, a, b), (a, b)


def _backward(spec, residuals, out_grad):
  a, b = residuals
  a_axes, b_axes, out_axes = _parse(spec)
  grad = out_grad.astype(jnp.promote_types(a.dtype, b.dtype))
  a_grad = jnp.einsum(f"{out_axes},{b_axes}->{a_axes}", grad, b,
                      preferred_element_type=jnp.float32)
  b_grad = jnp.einsum(f"{a_axes},{out_axes}->{b_axes}", a, grad,
                      preferred_element_type=jnp.float32)
  return a_grad.astype(a.dtype), b_grad.astype(b.dtype)


_einsum.defvjp(_forward, _backward)
