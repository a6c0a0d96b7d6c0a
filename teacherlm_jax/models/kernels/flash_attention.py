"""Flash attention for TPU (Pallas, Mosaic) with BLOOM's ALiBi computed in the kernel and the
model's visibility rule from segment ids and positions.

A rewrite of upstream `jax.experimental.pallas.ops.tpu.flash_attention` (its forward, dK/dV and
dQ kernels and their online softmax), changed where our models need it:
  * ALiBi: each block's bias, slope[h] * key_position (HF BLOOM's form), is computed from the
    head's slope (in SMEM) and the keys' positions, instead of reading a materialised
    [B, H, L, S] bias `ab` from HBM, forward and backward;
  * masking: our rule (`attention.scores_and_visibility`): a key is visible in the query's own
    non-zero segment at the same or an earlier position, and, with `causal`, at the same or an
    earlier row; upstream has segment equality and causality by row only;
  * grouped-query attention: query head h reads key/value head h // G in the index maps (no
    repeated K/V in HBM); the key/value gradients are summed over each head's G query heads;
  * one key block per grid step (upstream's block_k_major == block_k, block_b == 1), and one
    logsumexp per row as the saved statistic instead of the maximum and the sum.

Shapes: q (B, H, L, D); k, v (B, K, S, D) with H = K * G; segment ids and positions (B, L) for
the queries and (B, S) for the keys.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from teacherlm_jax.models import attention

NUM_LANES = 128
NUM_SUBLANES = 8
# Finite, as upstream: a fully masked block then gives exp(0) terms instead of NaNs.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_TRANS_B = (((1,), (1,)), ((), ()))


def _lanes(x_Nx128: jax.Array, width: int) -> jax.Array:
  """A lane-replicated [N, 128] row statistic widened (or cut) to [N, width]."""
  if width <= NUM_LANES:
    return x_Nx128[:, :width]
  return jnp.tile(x_Nx128, (1, width // NUM_LANES))


def _last_kv_block(q_block, block_q, block_kv):
  """The last key block a causal query block sees (its diagonal)."""
  # lax.div, not //: the indices are non-negative, and Mosaic's floor division needs the
  # chip generation (sign) at lowering time.
  return jax.lax.div((q_block + 1) * block_q - 1, block_kv)


def _first_q_block(kv_block, block_q, block_kv):
  """The first query block a causal key block is seen by."""
  return jax.lax.div(kv_block * block_kv, block_q)


def _scores(q_ref, k_ref, slopes_ref, q_ids_ref, q_pos_ref, kv_ids_ref, kv_pos_ref, head,
            q_block, kv_block, *, causal, alibi, sm_scale):
  """Masked float32 scores of one (query block, key block) pair and where keys are visible.

  The grid indices come in as arguments: they are read at the kernel's top level, where the
  interpreter (tests on CPU) substitutes them, not inside `pl.when`.
  """
  block_q, block_kv = q_ref.shape[0], k_ref.shape[0]
  s = jax.lax.dot_general(q_ref[...], k_ref[...], _TRANS_B,
                          preferred_element_type=jnp.float32) * sm_scale
  kv_pos = kv_pos_ref[:1, :]  # [1, block_kv]
  if alibi:
    s = s + slopes_ref[head] * kv_pos.astype(jnp.float32)
  repeats = block_kv // NUM_LANES
  q_ids = jnp.tile(q_ids_ref[...], (1, repeats))
  q_pos = jnp.tile(q_pos_ref[...], (1, repeats))
  kv_ids = kv_ids_ref[:1, :]
  visible = (q_ids == kv_ids) & (kv_ids != 0) & (kv_pos <= q_pos)
  if causal:
    rows = jax.lax.broadcasted_iota(jnp.int32, (block_q, block_kv), 0) + q_block * block_q
    cols = jax.lax.broadcasted_iota(jnp.int32, (block_q, block_kv), 1) + kv_block * block_kv
    visible = visible & (cols <= rows)
  return jnp.where(visible, s, MASK_VALUE), visible


def _forward_kernel(slopes_ref, q_ref, k_ref, v_ref, q_ids_ref, q_pos_ref, kv_ids_ref,
                    kv_pos_ref, o_ref, lse_ref, m_scratch, l_scratch, acc_scratch, *, causal,
                    alibi, sm_scale):
  head, q_block, kv_block = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  block_q, block_kv, head_dim = q_ref.shape[0], k_ref.shape[0], q_ref.shape[1]

  @pl.when(kv_block == 0)
  def _start_row_block():
    m_scratch[...] = jnp.full(m_scratch.shape, -jnp.inf, jnp.float32)
    l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)
    acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

  run = kv_block <= _last_kv_block(q_block, block_q, block_kv) if causal else True

  @pl.when(run)
  def _accumulate():
    s, _ = _scores(q_ref, k_ref, slopes_ref, q_ids_ref, q_pos_ref, kv_ids_ref, kv_pos_ref,
                   head, q_block, kv_block, causal=causal, alibi=alibi, sm_scale=sm_scale)
    m_prev, l_prev = m_scratch[...], l_scratch[...]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [block_q, 128]
    p = jnp.exp(s - _lanes(m_next, block_kv))
    alpha = jnp.exp(m_prev - m_next)
    l_scratch[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    m_scratch[...] = m_next
    v = v_ref[...]
    acc_scratch[...] = (acc_scratch[...] * _lanes(alpha, head_dim)
                        + jax.lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32))

  @pl.when(kv_block == pl.num_programs(3) - 1)
  def _store():
    l = l_scratch[...]
    o_ref[...] = (acc_scratch[...] / _lanes(l, head_dim)).astype(o_ref.dtype)
    lse_ref[...] = m_scratch[...] + jnp.log(l)


def _dkv_kernel(slopes_ref, q_ref, k_ref, v_ref, q_ids_ref, q_pos_ref, kv_ids_ref, kv_pos_ref,
                lse_ref, di_ref, do_ref, dk_ref, dv_ref, dk_scratch, dv_scratch, *, causal,
                alibi, sm_scale):
  head, kv_block, q_block = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  block_q, block_kv = q_ref.shape[0], k_ref.shape[0]

  @pl.when(q_block == 0)
  def _start_key_block():
    dk_scratch[...] = jnp.zeros(dk_scratch.shape, jnp.float32)
    dv_scratch[...] = jnp.zeros(dv_scratch.shape, jnp.float32)

  run = q_block >= _first_q_block(kv_block, block_q, block_kv) if causal else True

  @pl.when(run)
  def _accumulate():
    s, visible = _scores(q_ref, k_ref, slopes_ref, q_ids_ref, q_pos_ref, kv_ids_ref, kv_pos_ref,
                         head, q_block, kv_block, causal=causal, alibi=alibi, sm_scale=sm_scale)
    p = jnp.where(visible, jnp.exp(s - _lanes(lse_ref[...], block_kv)), 0.0)
    do, v, q = do_ref[...], v_ref[...], q_ref[...]
    dv_scratch[...] += jax.lax.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dp = jax.lax.dot_general(do, v, _TRANS_B, preferred_element_type=jnp.float32)
    ds = p * (dp - _lanes(di_ref[...], block_kv)) * sm_scale
    dk_scratch[...] += jax.lax.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)

  @pl.when(q_block == pl.num_programs(3) - 1)
  def _store():
    dk_ref[...] = dk_scratch[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_scratch[...].astype(dv_ref.dtype)


def _dq_kernel(slopes_ref, q_ref, k_ref, v_ref, q_ids_ref, q_pos_ref, kv_ids_ref, kv_pos_ref,
               lse_ref, di_ref, do_ref, dq_ref, dq_scratch, *, causal, alibi, sm_scale):
  head, q_block, kv_block = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  block_q, block_kv = q_ref.shape[0], k_ref.shape[0]

  @pl.when(kv_block == 0)
  def _start_row_block():
    dq_scratch[...] = jnp.zeros(dq_scratch.shape, jnp.float32)

  run = kv_block <= _last_kv_block(q_block, block_q, block_kv) if causal else True

  @pl.when(run)
  def _accumulate():
    s, visible = _scores(q_ref, k_ref, slopes_ref, q_ids_ref, q_pos_ref, kv_ids_ref, kv_pos_ref,
                         head, q_block, kv_block, causal=causal, alibi=alibi, sm_scale=sm_scale)
    p = jnp.where(visible, jnp.exp(s - _lanes(lse_ref[...], block_kv)), 0.0)
    do, v, k = do_ref[...], v_ref[...], k_ref[...]
    dp = jax.lax.dot_general(do, v, _TRANS_B, preferred_element_type=jnp.float32)
    ds = p * (dp - _lanes(di_ref[...], block_kv)) * sm_scale
    dq_scratch[...] += jax.lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  @pl.when(kv_block == pl.num_programs(3) - 1)
  def _store():
    dq_ref[...] = dq_scratch[...].astype(dq_ref.dtype)


def _row_layouts(q_ids, q_pos, kv_ids, kv_pos):
  """Query ids/positions broadcast along lanes [B, L, 128]; key ones along sublanes [B, 8, S]:
  the layouts in which a block compares them without a transpose (as upstream)."""
  b, l = q_ids.shape
  s = kv_ids.shape[1]
  rows = lambda x: jax.lax.broadcast_in_dim(x.astype(jnp.int32), (b, l, NUM_LANES), (0, 1))
  cols = lambda x: jax.lax.broadcast_in_dim(x.astype(jnp.int32), (b, NUM_SUBLANES, s), (0, 2))
  return rows(q_ids), rows(q_pos), cols(kv_ids), cols(kv_pos)


def _specs(block_q, block_kv, head_dim, groups, q_index, kv_index):
  """BlockSpecs of (slopes, q, k, v, q_ids, q_pos, kv_ids, kv_pos) for a grid (b, h, x, y) whose
  query and key block indices are `q_index(x, y)` and `kv_index(x, y)`."""
  q_map = lambda b, h, x, y: (b, h, q_index(x, y), 0)
  kv_map = lambda b, h, x, y: (b, jax.lax.div(h, groups), kv_index(x, y), 0)
  rows_map = lambda b, h, x, y: (b, q_index(x, y), 0)
  cols_map = lambda b, h, x, y: (b, 0, kv_index(x, y))
  rows = pl.BlockSpec((None, block_q, NUM_LANES), rows_map)
  cols = pl.BlockSpec((None, NUM_SUBLANES, block_kv), cols_map)
  return [pl.BlockSpec(memory_space=pltpu.SMEM),
          pl.BlockSpec((None, None, block_q, head_dim), q_map),
          pl.BlockSpec((None, None, block_kv, head_dim), kv_map),
          pl.BlockSpec((None, None, block_kv, head_dim), kv_map),
          rows, rows, cols, cols]


def _row_stat_spec(block_q, q_index):
  return pl.BlockSpec((None, None, block_q, NUM_LANES), lambda b, h, x, y: (b, h, q_index(x, y), 0))


def _visited(l, s, block_q, block_kv, causal) -> float:
  """The fraction of (query block, key block) pairs a kernel runs (the rest are skipped)."""
  if not causal:
    return 1.0
  pairs = sum(min(s // block_kv, ((i + 1) * block_q - 1) // block_kv + 1)
              for i in range(l // block_q))
  return pairs / ((l // block_q) * (s // block_kv))


def _cost(q, k, *, visited, matmuls, once, per_q_block, per_kv_block, block_q, block_kv):
  """What XLA's cost analysis and scheduler see of a kernel: `matmuls` [L, S, D] products,
  one exp per score, the bytes of the arrays read or written once (`once`), and of those
  re-read once per visited query block (`per_q_block`) or key block (`per_kv_block`)."""
  b, h, l, d = q.shape
  s = k.shape[2]
  size = lambda xs: sum(x.size * x.dtype.itemsize for x in xs)
  scores = b * h * l * s * visited
  bytes_accessed = (size(once) + size(per_q_block) * (l // block_q) * visited
                    + size(per_kv_block) * (s // block_kv) * visited)
  return pl.CostEstimate(flops=int(2 * matmuls * scores * d), transcendentals=int(scores),
                         bytes_accessed=int(bytes_accessed))


def _params(*semantics):
  return pltpu.CompilerParams(dimension_semantics=semantics)


def _forward(q, k, v, rows_and_cols, slopes, causal, block_q, block_kv, interpret):
  b, h, l, d = q.shape
  s = k.shape[2]
  groups = h // k.shape[1]
  if causal:
    # A skipped key block repeats the last one the query block sees: no new copy from HBM.
    kv_index = lambda x, y: jnp.minimum(y, _last_kv_block(x, block_q, block_kv))
  else:
    kv_index = lambda x, y: y
  in_specs = _specs(block_q, block_kv, d, groups, lambda x, y: x, kv_index)
  kernel = functools.partial(_forward_kernel, causal=causal, alibi=slopes is not None,
                             sm_scale=1.0 / float(np.sqrt(d)))
  out, lse = pl.pallas_call(
      kernel,
      grid=(b, h, l // block_q, s // block_kv),
      in_specs=in_specs,
      out_specs=[in_specs[1], _row_stat_spec(block_q, lambda x, y: x)],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, l, NUM_LANES), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((block_q, NUM_LANES), jnp.float32),
                      pltpu.VMEM((block_q, NUM_LANES), jnp.float32),
                      pltpu.VMEM((block_q, d), jnp.float32)],
      compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
      cost_estimate=_cost(q, k, visited=_visited(l, s, block_q, block_kv, causal), matmuls=2,
                          once=(q, q, *rows_and_cols[:2]), per_q_block=(k, v, *rows_and_cols[2:]),
                          per_kv_block=(), block_q=block_q, block_kv=block_kv),
      interpret=interpret,
      name="alibi_flash_attention_fwd",
  )(_slopes_array(slopes, h), q, k, v, *rows_and_cols)
  return out, lse[..., 0]


def _backward(q, k, v, rows_and_cols, slopes, causal, block_q, block_kv, interpret, out, lse,
              d_out):
  b, h, l, d = q.shape
  kv_heads, s = k.shape[1], k.shape[2]
  groups = h // kv_heads
  di = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1)
  lanes = lambda x: jax.lax.broadcast_in_dim(x, (b, h, l, NUM_LANES), (0, 1, 2))
  operands = (_slopes_array(slopes, h), q, k, v, *rows_and_cols, lanes(lse), lanes(di), d_out)
  common = dict(causal=causal, alibi=slopes is not None, sm_scale=1.0 / float(np.sqrt(d)))
  visited = _visited(l, s, block_q, block_kv, causal)
  stats = operands[-3:-1]
  # Per query head; summed over each key/value head's group below (in float32 when G > 1).
  grad_dtype = k.dtype if groups == 1 else jnp.float32

  # dK, dV: grid (b, h, key block x, query block y).
  q_index = ((lambda x, y: jnp.maximum(y, _first_q_block(x, block_q, block_kv))) if causal
             else (lambda x, y: y))
  kv_index = lambda x, y: x
  specs = _specs(block_q, block_kv, d, groups, q_index, kv_index)
  stat = _row_stat_spec(block_q, q_index)
  per_head_kv = pl.BlockSpec((None, None, block_kv, d), lambda b_, h_, x, y: (b_, h_, x, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, **common),
      grid=(b, h, s // block_kv, l // block_q),
      in_specs=specs + [stat, stat, specs[1]],
      out_specs=[per_head_kv, per_head_kv],
      out_shape=[jax.ShapeDtypeStruct((b, h, s, d), grad_dtype)] * 2,
      scratch_shapes=[pltpu.VMEM((block_kv, d), jnp.float32)] * 2,
      compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
      cost_estimate=_cost(q, k, visited=visited, matmuls=4, once=(k, v, k, v),
                          per_kv_block=(q, d_out, *stats, *rows_and_cols[:2]), per_q_block=(),
                          block_q=block_q, block_kv=block_kv),
      interpret=interpret,
      name="alibi_flash_attention_dkv",
  )(*operands)
  if groups > 1:
    dk = dk.reshape(b, kv_heads, groups, s, d).sum(axis=2).astype(k.dtype)
    dv = dv.reshape(b, kv_heads, groups, s, d).sum(axis=2).astype(v.dtype)

  # dQ: grid (b, h, query block x, key block y).
  kv_index = ((lambda x, y: jnp.minimum(y, _last_kv_block(x, block_q, block_kv))) if causal
              else (lambda x, y: y))
  specs = _specs(block_q, block_kv, d, groups, lambda x, y: x, kv_index)
  stat = _row_stat_spec(block_q, lambda x, y: x)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, **common),
      grid=(b, h, l // block_q, s // block_kv),
      in_specs=specs + [stat, stat, specs[1]],
      out_specs=specs[1],
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      scratch_shapes=[pltpu.VMEM((block_q, d), jnp.float32)],
      compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
      cost_estimate=_cost(q, k, visited=visited, matmuls=3, once=(q, d_out, q, *stats),
                          per_q_block=(k, v, *rows_and_cols[2:]), per_kv_block=(),
                          block_q=block_q, block_kv=block_kv),
      interpret=interpret,
      name="alibi_flash_attention_dq",
  )(*operands)
  return dq, dk, dv


def _slopes_array(slopes_H: Optional[jax.Array], num_heads: int) -> jax.Array:
  return slopes_H if slopes_H is not None else jnp.zeros(num_heads, jnp.float32)


# The slopes are an operand, not a static argument: under a shard_map over heads each shard
# reads its own heads' slopes (no cotangent flows to them).
@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def _flash(q, k, v, q_ids, q_pos, kv_ids, kv_pos, slopes, causal, block_q, block_kv,
           interpret):
  rows_and_cols = _row_layouts(q_ids, q_pos, kv_ids, kv_pos)
  return _forward(q, k, v, rows_and_cols, slopes, causal, block_q, block_kv, interpret)[0]


def _flash_fwd(q, k, v, q_ids, q_pos, kv_ids, kv_pos, slopes, causal, block_q, block_kv,
               interpret):
  rows_and_cols = _row_layouts(q_ids, q_pos, kv_ids, kv_pos)
  out, lse = _forward(q, k, v, rows_and_cols, slopes, causal, block_q, block_kv, interpret)
  # Named as the 'xla' path's residuals, so that remat='dots' saves them and its backward pass
  # does not rerun the forward kernel.
  out = checkpoint_name(out, attention.ATTENTION_OUTPUT)
  lse = checkpoint_name(lse, attention.ATTENTION_ROW_STATS)
  return out, (q, k, v, q_ids, q_pos, kv_ids, kv_pos, slopes, out, lse)


def _flash_bwd(causal, block_q, block_kv, interpret, residuals, d_out):
  q, k, v, q_ids, q_pos, kv_ids, kv_pos, slopes, out, lse = residuals
  rows_and_cols = _row_layouts(q_ids, q_pos, kv_ids, kv_pos)
  dq, dk, dv = _backward(q, k, v, rows_and_cols, slopes, causal, block_q, block_kv, interpret,
                         out, lse, d_out)
  return dq, dk, dv, None, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _block(requested: int, length: int, name: str, multiple: int) -> int:
  """`requested` rows per block, or the whole axis when it is shorter."""
  block = min(requested, length)
  if length % block or (block % multiple and block != length):
    raise ValueError(f"{name}={block} must divide the length {length} and be a multiple of "
                     f"{multiple} (or the whole length)")
  return block


def flash_attention(q_BxHxLxD: jax.Array, k_BxKxSxD: jax.Array, v_BxKxSxD: jax.Array,
                    q_segment_ids_BxL: jax.Array, q_positions_BxL: jax.Array,
                    kv_segment_ids_BxS: jax.Array, kv_positions_BxS: jax.Array, *,
                    alibi_slopes: Optional[Union[Sequence[float], jax.Array]] = None,
                    causal: bool = True,
                    block_q: int = 512, block_kv: int = 512,
                    interpret: bool = False) -> jax.Array:
  """Attention of each query to the keys it sees -> (B, H, L, D) in q's dtype.

  `alibi_slopes`: one per query head (BLOOM; numbers or an array), None for none. `causal`: the queries are rows
  0..L-1 of the keys' sequence (a cache-free forward), which also lets whole blocks above the
  diagonal be skipped. A block is `block_q` query rows by `block_kv` keys (`block_kv` a
  multiple of 128; each clipped to its axis's length). Differentiable in q, k and v.
  """
  b, h, l, d = q_BxHxLxD.shape
  kv_heads, s = k_BxKxSxD.shape[1], k_BxKxSxD.shape[2]
  if h % kv_heads:
    raise ValueError(f"query heads {h} must be a multiple of key/value heads {kv_heads}")
  if causal and l != s:
    raise ValueError(f"causal attention needs as many queries as keys, got {l} and {s}")
  block_q = _block(block_q, l, "block_q", NUM_SUBLANES)
  block_kv = _block(block_kv, s, "block_kv", NUM_LANES)
  if block_kv % NUM_LANES:
    raise ValueError(f"block_kv={block_kv}: the keys' length must be a multiple of {NUM_LANES}")
  slopes = None if alibi_slopes is None else jnp.asarray(alibi_slopes, jnp.float32)
  if slopes is not None and slopes.shape != (h,):
    raise ValueError(f"{slopes.shape[0]} ALiBi slopes for {h} query heads")
  return _flash(q_BxHxLxD, k_BxKxSxD, v_BxKxSxD, q_segment_ids_BxL, q_positions_BxL,
                kv_segment_ids_BxS, kv_positions_BxS, slopes, causal, block_q, block_kv,
                interpret)
