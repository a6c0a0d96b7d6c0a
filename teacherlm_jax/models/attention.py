"""Attention's scores, its visibility rule, and the blocked causal attention of a cache-free
forward, with a gradient that recomputes each block's probabilities from two saved row
statistics.

Shapes: queries (B, K, G, L, D), K key/value heads of G query heads each (G = 1 for multi-head
attention); keys and values (B, K, S, D). Each key/value head's query groups are folded into
the query rows for the products: both are then plain matmuls batched over (B, K) with operands
in row-major order, which no backend has to transpose around the softmax.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from teacherlm_jax.models import matmul

# The checkpoint name of attention's output (its probabilities-times-values product; not the
# scores, which grow with length squared), which remat='dots' saves, and of the two per-row
# softmax statistics its gradient recomputes the probabilities from.
ATTENTION_OUTPUT = "attention_output"
ATTENTION_ROW_STATS = "attention_row_stats"
# A cache-free forward splits attention's queries into blocks of at least this many rows.
MIN_QUERY_BLOCK_ROWS = 64


def causal_query_blocks(length: int) -> int:
  """How many blocks of query rows a cache-free forward of `length` tokens attends in.

  There a key after the query is never visible, so each block of queries attends only to
  the keys up to its own last row: n blocks compute (n + 1) / 2n of the [L, S] scores and
  their softmax, 62.5% with 4. Blocks of fewer than MIN_QUERY_BLOCK_ROWS rows would make the
  batched products too small to run well; more than 16 blocks gain little and cost more
  products.
  """
  for blocks in (16, 8, 4, 2):
    if length % blocks == 0 and length // blocks >= MIN_QUERY_BLOCK_ROWS:
      return blocks
  return 1


def alibi_slopes(num_heads: int) -> np.ndarray:
  """BLOOM's ALiBi slopes, including head counts that are not powers of two."""
  closest = 2 ** math.floor(math.log2(num_heads))
  base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
  slopes = [base ** p for p in range(1, closest + 1)]
  if closest != num_heads:
    extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
    remaining = min(closest, num_heads - closest)
    slopes += [extra_base ** p for p in range(1, 1 + 2 * remaining, 2)]
  return np.asarray(slopes, np.float32)


def scores_and_visibility(q_BxKxGxLxD, k_BxKxSxD, segment_ids_BxL, positions_BxL,
                          key_segment_ids_BxS, key_positions_BxS, alibi: bool,
                          first_row: Optional[int]) -> Tuple[jax.Array, jax.Array]:
  """Float32 scores (B, K, G, L, S), ALiBi included, and which keys each query sees (B, L, S).

  A key is visible to a query of its own segment at the same or an earlier position; with
  `first_row` (a cache-free forward, the queries being rows first_row.. of the sequence and
  the keys its first S tokens) also only at the same or an earlier row.
  """
  b, kv_heads, groups, l, hd = q_BxKxGxLxD.shape
  s = k_BxKxSxD.shape[2]
  scores = matmul.einsum("bkmd,bksd->bkms", q_BxKxGxLxD.reshape(b, kv_heads, groups * l, hd),
                         k_BxKxSxD)
  scores = scores.reshape(b, kv_heads, groups, l, s) / np.float32(math.sqrt(hd))
  if alibi:
    # HF adds slope * key_position (its `alibi`), equal to a relative bias up to a per-query
    # constant that softmax ignores; we keep HF's form for bit-level parity.
    slopes = jnp.asarray(alibi_slopes(kv_heads * groups)).reshape(kv_heads, groups)
    scores = scores + slopes[None, :, :, None, None] * key_positions_BxS[:, None, None, None, :]
  visible = ((segment_ids_BxL[:, :, None] == key_segment_ids_BxS[:, None, :])
             & (key_segment_ids_BxS[:, None, :] != 0)
             & (key_positions_BxS[:, None, :] <= positions_BxL[:, :, None]))
  if first_row is not None:
    visible &= (np.arange(s)[None, :] <= first_row + np.arange(l)[:, None])[None]
  return scores, visible


def _masked(scores, visible_BxLxS):
  return jnp.where(visible_BxLxS[:, None, None], scores, jnp.finfo(jnp.float32).min)


def _mix(probs_BxKxGxLxS, v_BxKxSxD) -> jax.Array:
  b, kv_heads, groups, l, s = probs_BxKxGxLxS.shape
  mixed = matmul.einsum("bkms,bksd->bkmd",
                        probs_BxKxGxLxS.astype(v_BxKxSxD.dtype).reshape(b, kv_heads, groups * l, s),
                        v_BxKxSxD)
  return mixed.reshape(b, kv_heads, groups, l, v_BxKxSxD.shape[-1])


def attend(q_BxKxGxLxD, k_BxKxSxD, v_BxKxSxD, segment_ids_BxL, positions_BxL,
           key_segment_ids_BxS, key_positions_BxS, alibi: bool) -> jax.Array:
  """Attention of queries to every key and value given (a cached forward) -> (B, K, G, L, D)."""
  scores, visible = scores_and_visibility(q_BxKxGxLxD, k_BxKxSxD, segment_ids_BxL,
                                          positions_BxL, key_segment_ids_BxS, key_positions_BxS,
                                          alibi, first_row=None)
  return _mix(jax.nn.softmax(_masked(scores, visible), axis=-1), v_BxKxSxD)


def _query_blocks(length: int):
  rows = length // causal_query_blocks(length)
  return [(start, start + rows) for start in range(0, length, rows)]


def _block_scores(q, k, segment_ids, positions, alibi, start, end):
  """Scores and visibility of query rows start..end-1 against keys 0..end-1."""
  return scores_and_visibility(q[:, :, :, start:end], k[:, :, :end], segment_ids[:, start:end],
                               positions[:, start:end], segment_ids[:, :end],
                               positions[:, :end], alibi, first_row=start)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def causal_attention(q_BxKxGxLxD, k_BxKxLxD, v_BxKxLxD, segment_ids_BxL, positions_BxL,
                     alibi: bool, output_dtype) -> jax.Array:
  """Attention of a cache-free forward, each token to its own text's earlier tokens.

  Keys after a query are never visible there, so the queries go in blocks
  (`causal_query_blocks`), each attending only to the keys up to its own last row. Equal to
  `attend` with the sequence as its own keys. The gradient saves the output and two numbers
  per row (the scores' maximum and the softmax's denominator), recomputes each block's
  probabilities from them in one pass and takes softmax's row sums from the output,
  sum_s p * dp = sum_d o * do (an [L, D] product, not an [L, S] one): three fewer passes over
  each block's scores than autodiff through the softmax, which recomputes the maximum and the
  denominator and sums p * dp over the scores.

  Returns (B, K, G, L, D) in `output_dtype`, the model's compute dtype: the output is also
  what the gradient saves (a bf16 model keeps it in bf16, as remat='dots' saved it before),
  and the row sums are taken in float32 from it.
  """
  return _causal_fwd(q_BxKxGxLxD, k_BxKxLxD, v_BxKxLxD, segment_ids_BxL, positions_BxL, alibi,
                     output_dtype)[0]


def _causal_fwd(q, k, v, segment_ids, positions, alibi, output_dtype):
  outputs, maxima, denominators = [], [], []
  for start, end in _query_blocks(q.shape[3]):
    scores, visible = _block_scores(q, k, segment_ids, positions, alibi, start, end)
    scores = _masked(scores, visible)
    maximum = jnp.max(scores, axis=-1, keepdims=True)
    unnormalized = jnp.exp(scores - maximum)
    denominator = jnp.sum(unnormalized, axis=-1, keepdims=True)
    outputs.append(_mix(unnormalized, v[:, :, :end]) / denominator)
    maxima.append(maximum)
    denominators.append(denominator)
  # Named so that remat='dots' saves them and its backward pass does not rerun this forward.
  output = checkpoint_name(jnp.concatenate(outputs, axis=3).astype(output_dtype),
                           ATTENTION_OUTPUT)
  row_stats = checkpoint_name((jnp.concatenate(maxima, axis=3),
                               jnp.concatenate(denominators, axis=3)), ATTENTION_ROW_STATS)
  return output, (q, k, v, segment_ids, positions, output, row_stats)


def _causal_bwd(alibi, output_dtype, residuals, d_output):
  q, k, v, segment_ids, positions, output, (maxima, denominators) = residuals
  b, kv_heads, groups, l, hd = q.shape
  # sum_s p * dp per row, with dp = d_output . v: the same as sum_d output * d_output.
  row_sums = jnp.sum(d_output.astype(jnp.float32) * output.astype(jnp.float32), axis=-1,
                     keepdims=True)
  # As matmul.einsum's gradient: the cotangents are rounded to the operands' dtype and the
  # products accumulate in float32, as do the key and value gradients across blocks.
  d_output = d_output.astype(v.dtype)
  dq_blocks = []
  dk = jnp.zeros(k.shape, jnp.float32)
  dv = jnp.zeros(v.shape, jnp.float32)
  for start, end in _query_blocks(l):
    rows = end - start
    scores, visible = _block_scores(q, k, segment_ids, positions, alibi, start, end)
    probs = (jnp.exp(_masked(scores, visible) - maxima[:, :, :, start:end])
             / denominators[:, :, :, start:end])
    d_out = d_output[:, :, :, start:end].reshape(b, kv_heads, groups * rows, hd)
    probs_rows = probs.astype(v.dtype).reshape(b, kv_heads, groups * rows, end)
    dv = dv.at[:, :, :end].add(matmul.einsum("bkms,bkmd->bksd", probs_rows, d_out))
    d_probs = matmul.einsum("bkmd,bksd->bkms", d_out, v[:, :, :end])
    d_probs = d_probs.reshape(b, kv_heads, groups, rows, end)
    # Softmax's gradient, through the scale, and none to the keys a query does not see.
    d_scores = jnp.where(visible[:, None, None],
                         probs * (d_probs - row_sums[:, :, :, start:end]), 0.0)
    d_scores = (d_scores / np.float32(math.sqrt(hd))).astype(q.dtype)
    d_scores = d_scores.reshape(b, kv_heads, groups * rows, end)
    dq_blocks.append(matmul.einsum("bkms,bksd->bkmd", d_scores, k[:, :, :end])
                     .reshape(b, kv_heads, groups, rows, hd))
    q_rows = q[:, :, :, start:end].reshape(b, kv_heads, groups * rows, hd)
    dk = dk.at[:, :, :end].add(matmul.einsum("bkms,bkmd->bksd", d_scores, q_rows))
  dq = jnp.concatenate(dq_blocks, axis=3)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


causal_attention.defvjp(_causal_fwd, _causal_bwd)

