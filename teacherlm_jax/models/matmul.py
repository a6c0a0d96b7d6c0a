"""The one matmul the models use: operands in the compute dtype, float32 accumulation, both
ways.

`einsum(spec, a, b)` returns float32, as the MXU accumulates on TPU. Its gradient keeps the
same contract: the incoming float32 cotangent is rounded to the operands' dtype and the two
backward matmuls again take compute-dtype operands and accumulate in float32. Plain autodiff
would not: JAX transposes a `preferred_element_type=float32` dot into a float32 x bf16 dot,
promotes the bf16 operand, and so runs every backward matmul of a bf16 model in float32.
Rounding the cotangent to bf16 is what mixed precision does everywhere (torch autocast, T5X);
for float32 models the rounding is the identity and this is exactly autodiff's gradient.
"""
from __future__ import annotations

import collections
import functools

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


def einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """jnp.einsum(spec, a, b) accumulated and returned in float32; see the module doc.

  `jax.checkpoint` policies do not see the dot inside (it is a custom VJP): a caller whose
  output a remat policy should save names it with `jax.ad_checkpoint.checkpoint_name`.
  """
  _parse(spec)
  return _einsum(spec, a, b)


def product(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """jnp.einsum(spec, a, b) accumulated in float32; float32 operands as one 2-D dot where the
  axes allow it.

  A weight gradient contracts the token axes (b, l), the leading axes of both operands. As one
  2-D dot over the flattened token axis the GEMM reads the operand transposed in place, where
  an einsum can first copy it transposed. The same math and dtypes on every platform; not for
  bf16 operands, whose GEMMs do not all take a transposed operand. Applies when each operand is
  its contracted axes followed or preceded by its kept axes and the output is the kept axes of
  one operand then the other's.
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
