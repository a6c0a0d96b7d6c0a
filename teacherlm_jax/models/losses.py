"""The one loss of every stage: cross entropy over weighted target tokens, optional z-loss.

The train and eval steps compute the same sums from the hidden states in sequence chunks
(`head_loss.py`), never holding the whole logits; `loss_and_metrics` is the plain reference.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def loss_and_metrics(logits_BxLxV: jax.Array, targets_BxL: jax.Array, weights_BxL: jax.Array,
                     z_loss: float = 0.0):
  """Weighted mean token cross entropy (+ z_loss * log(Z)^2) and its sums.

  Returns (loss, sums) where sums = {'loss_sum', 'z_loss_sum', 'correct', 'weight'} so callers
  can average over many batches exactly.
  """
  weights = weights_BxL.astype(jnp.float32)
  terms = cross_entropy_terms(logits_BxLxV, targets_BxL, weights)
  return loss_from_sums(terms["nll_sum"] + z_loss * terms["z_sum"], terms["nll_sum"],
                        terms["z_sum"], terms["correct"], weights)


def loss_from_sums(objective_sum: jax.Array, nll_sum: jax.Array, z_sum: jax.Array,
                   correct: jax.Array, weights: jax.Array):
  """(loss, sums) of `loss_and_metrics` from the weighted sums: the loss is `objective_sum`
  (nll + z_loss * z, the sum a caller differentiates) over the weight, at least 1."""
  weight = jnp.sum(weights)
  loss = objective_sum / jnp.maximum(weight, 1.0)
  return loss, {"loss_sum": nll_sum, "z_loss_sum": z_sum, "correct": correct, "weight": weight}


def cross_entropy_terms(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> dict:
  """The pieces of the weighted cross entropy over the last (vocabulary) axis, in float32.

  'nll_sum', 'z_sum' (of log(Z)^2) and 'correct' are weighted sums over tokens; 'shifted'
  (exp(logits - max)), 'partition' (its sum), 'log_z' and 'is_target' are per token, for a
  caller that forms the gradient itself (models/head_loss.py).
  """
  logits = logits.astype(jnp.float32)
  max_logit = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
  shifted = jnp.exp(logits - max_logit[..., None])
  partition = jnp.sum(shifted, axis=-1)
  log_z = max_logit + jnp.log(partition)
  # The target logit as a masked sum, not a gather: it fuses into the same pass over the
  # vocabulary, and its gradient is an elementwise select instead of a scatter-add.
  vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  is_target = vocab_ids == targets[..., None].astype(jnp.int32)
  target_logit = jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1)
  return {"nll_sum": jnp.sum((log_z - target_logit) * weights),
          "z_sum": jnp.sum(jnp.square(log_z) * weights),
          # Correct when the target holds the maximum logit (argmax up to ties).
          "correct": jnp.sum((target_logit >= max_logit) * weights),
          "shifted": shifted, "partition": partition, "log_z": log_z, "is_target": is_target}
