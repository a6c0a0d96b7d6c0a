"""The LM head and its cross entropy in sequence chunks, the logits never whole.

`head_loss(x, head, targets, weights)` equals `losses.loss_and_metrics(x @ head, ...)`'s sums
without the [batch, length, vocab] float32 logits: a `lax.scan` over chunks of the sequence
computes each chunk's logits, its log-partition, target logit and argmax hit, and drops them.
For BLOOM's 250,880-token vocabulary the whole logits of one 8 x 2048 batch take 16 GiB in
float32, with as much again for their gradient; a chunk of 1024 tokens takes 1 GiB.

Under `jax.grad` the chunk's gradient is formed in the same pass (as Liger's fused linear cross
entropy does): d logits = (softmax - onehot) * weight is built from the chunk's logits while
they are still in cache, multiplied into the hidden states' gradient and accumulated into the
head's, so the three head matmuls of a train step (logits, d hidden, d head) run once each and
nothing is recomputed. The backward pass only scales the stored gradients by the incoming
cotangent. Without `jax.grad` (evaluation) the gradient matmuls are not run.
"""
from __future__ import annotations

import functools
from typing import Dict, Tuple

import jax
import jax.numpy as jnp

from teacherlm_jax.models import losses
from teacherlm_jax.models import matmul
from teacherlm_jax.runtime import partitioning

# A chunk is the longest run of positions (a divisor of the length) whose batch x positions x
# vocab float32 logits fit `chunk_bytes` on one device (the logits are split over the mesh's
# batch and vocabulary axes), but never fewer than `min_chunk_tokens` tokens a device: each
# chunk's three matmuls read the whole head and read and write its float32 gradient, ~16 bytes
# per (bf16) weight for 6 x tokens FLOPs, so a chunk of T tokens does 0.375 T FLOPs a byte. Below
# the chip's ridge (TPU v4 ~230, v5e ~240, v5p ~170, H100 ~300 FLOPs/byte) the head is
# memory-bound: 1024 tokens is above all of them. With BLOOM's 250,880-token vocabulary the
# byte budget alone gave 32 tokens a chunk (batch 8); on a 2-core CPU the head and loss of an
# 8 x 256 batch (d 512, float32) then took 36.9 s against 9.7 s at 1024 tokens (torch: 10.1 s;
# 512 tokens measured as fast as 1024 there).
# The floor costs memory: 1024 x 250,880 float32 logits are 1 GiB a device (less with the
# vocabulary split over 'tensor'); lower it where that does not fit.
DEFAULT_CHUNK_BYTES = 32 * 2 ** 20
MIN_CHUNK_TOKENS = 1024
_LOGITS_AXES = ("activation_batch", "activation_length", "activation_vocab")
_TOKEN_AXES = ("activation_batch", "activation_length")


def chunk_length(batch: int, length: int, vocab: int, chunk_bytes: int,
                 min_tokens: int = 0) -> int:
  """The longest divisor of `length` whose batch x chunk x vocab float32 logits fit
  `chunk_bytes` on one device, or the shortest with at least `min_tokens` (batch x chunk)
  tokens on one device if that is longer; devices as the active mesh splits the logits."""
  # Both budgets as totals over the whole (global) array.
  chunk_bytes *= partitioning.shard_count(_LOGITS_AXES)
  min_tokens *= partitioning.shard_count(_TOKEN_AXES)
  divisors = [c for c in range(1, length + 1) if length % c == 0]
  fits = max(1, chunk_bytes // (4 * batch * vocab))
  by_bytes = max(c for c in divisors if c <= fits)
  by_tokens = min(c for c in divisors if c * batch >= min_tokens or c == length)
  return max(by_bytes, by_tokens)


def head_loss(x_BxLxD: jax.Array, head: jax.Array, targets_BxL: jax.Array,
              weights_BxL: jax.Array, *, vocab_major: bool, z_loss: float = 0.0,
              chunk_bytes: int = DEFAULT_CHUNK_BYTES, min_chunk_tokens: int = MIN_CHUNK_TOKENS
              ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Weighted mean token cross entropy of `x @ head` (+ z_loss * log(Z)^2), and its sums.

  Args:
    x_BxLxD: the head's inputs (final norm applied) in the compute dtype.
    head: [vocab, embed] when `vocab_major` (a tied embedding table), else [embed, vocab].
    targets_BxL, weights_BxL: target ids and loss weights.
    vocab_major: the layout of `head`.
    z_loss: weight of log(Z)^2.
    chunk_bytes: the most float32 logits one chunk holds on one device...
    min_chunk_tokens: ...unless that is fewer tokens a device than this (see above).

  Returns:
    (loss, sums) as `losses.loss_and_metrics`: sums = {'loss_sum', 'z_loss_sum', 'correct',
    'weight'}. Only `loss` carries a gradient.
  """
  b, l, _ = x_BxLxD.shape
  vocab = head.shape[0 if vocab_major else 1]
  chunk = chunk_length(b, l, vocab, chunk_bytes, min_chunk_tokens)
  weights = weights_BxL.astype(jnp.float32)
  chunk_sums = _chunked(vocab_major, float(z_loss), chunk, x_BxLxD, head,
                        targets_BxL.astype(jnp.int32), weights)
  loss, sums = losses.loss_from_sums(*chunk_sums, weights)
  return loss, jax.tree.map(jax.lax.stop_gradient, sums)


def _by_chunk(array_BxL, chunk: int) -> jax.Array:
  """[B, L, ...] -> [L / chunk, B, chunk, ...]: scanned over the first axis."""
  b, l = array_BxL.shape[:2]
  return jnp.moveaxis(array_BxL.reshape((b, l // chunk, chunk) + array_BxL.shape[2:]), 1, 0)


def _chunk_sums(vocab_major, z_loss, x_BxCxD, head, targets_BxC, weights_BxC, grads: bool):
  """One chunk's (objective, nll, z, correct) sums, and d logits when `grads`."""
  spec = "bcd,vd->bcv" if vocab_major else "bcd,dv->bcv"
  logits = jnp.einsum(spec, x_BxCxD, head, preferred_element_type=jnp.float32)
  logits = partitioning.constrain(logits, _LOGITS_AXES)
  terms = losses.cross_entropy_terms(logits, targets_BxC, weights_BxC)
  sums = (terms["nll_sum"] + z_loss * terms["z_sum"], terms["nll_sum"], terms["z_sum"],
          terms["correct"])
  if not grads:
    return sums, None
  # d(nll + z_loss * log_z^2) / d logits = softmax * (1 + 2 z_loss log_z) - onehot, weighted.
  softmax = terms["shifted"] / terms["partition"][..., None]
  scale = (weights_BxC * (1.0 + 2.0 * z_loss * terms["log_z"]))[..., None]
  d_logits = softmax * scale - jnp.where(terms["is_target"], weights_BxC[..., None], 0.0)
  return sums, d_logits.astype(x_BxCxD.dtype)


def _scan(vocab_major, z_loss, chunk, x_BxLxD, head, targets_BxL, weights_BxL, grads: bool):
  xs = tuple(_by_chunk(a, chunk) for a in (x_BxLxD, targets_BxL, weights_BxL))
  head_spec = "vd" if vocab_major else "dv"

  def body(carry, chunk_inputs):
    x_BxCxD, targets_BxC, weights_BxC = chunk_inputs
    sums, d_logits = _chunk_sums(vocab_major, z_loss, x_BxCxD, head, targets_BxC, weights_BxC,
                                 grads)
    carry = dict(carry, sums=tuple(a + s for a, s in zip(carry["sums"], sums)))
    if not grads:
      return carry, None
    d_head = matmul.product(f"bcd,bcv->{head_spec}", x_BxCxD, d_logits)
    carry["d_head"] = carry["d_head"] + d_head
    return carry, matmul.product(f"bcv,{head_spec}->bcd", d_logits, head).astype(x_BxCxD.dtype)

  init = {"sums": (jnp.zeros((), jnp.float32),) * 4}
  if grads:
    init["d_head"] = jnp.zeros(head.shape, jnp.float32)
  carry, d_x = jax.lax.scan(body, init, xs)
  if not grads:
    return carry["sums"], None
  d_x_BxLxD = jnp.moveaxis(d_x, 0, 1).reshape(x_BxLxD.shape)
  return carry["sums"], (d_x_BxLxD, carry["d_head"].astype(head.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _chunked(vocab_major, z_loss, chunk, x_BxLxD, head, targets_BxL, weights_BxL):
  return _scan(vocab_major, z_loss, chunk, x_BxLxD, head, targets_BxL, weights_BxL,
               grads=False)[0]


def _chunked_forward(vocab_major, z_loss, chunk, x_BxLxD, head, targets_BxL, weights_BxL):
  sums, grads = _scan(vocab_major, z_loss, chunk, x_BxLxD, head, targets_BxL, weights_BxL,
                      grads=True)
  return sums, (grads, weights_BxL)


def _chunked_backward(vocab_major, z_loss, chunk, residuals, cotangents):
  """Only the objective (first output) is differentiable; the metric sums' cotangents are
  zero (head_loss stops their gradient)."""
  del vocab_major, z_loss, chunk
  (d_x, d_head), weights_BxL = residuals
  scale = cotangents[0]
  return ((scale * d_x).astype(d_x.dtype), (scale * d_head).astype(d_head.dtype),
          None, jnp.zeros_like(weights_BxL))  # No gradient for the targets and weights.


_chunked.defvjp(_chunked_forward, _chunked_backward)
