"""The attention implementation a `ModelConfig` names ('xla', 'pallas' or 'cudnn'), for a
cache-free forward and for a cached one (prefill and decoding), in the model's layouts.

'pallas' runs upstream's splash attention (models/kernels/splash_attention.py) for the
cache-free forward and backward of OPT and LLaMA, and our kernel (models/kernels/
flash_attention.py) for BLOOM's (ALiBi: splash takes no bias) and for every cached call (cache
slots are visible by their stored segment ids and positions, not by a static row mask).

Shapes: queries (B, K, G, L, D), keys and values (B, K, S, D), as in models/attention.py. The
choice is a config value set at launch (runtime/kernels.py); nothing here reads the backend.
"""
from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from teacherlm_jax.models import attention
from teacherlm_jax.models.config import ModelConfig
from teacherlm_jax.models.kernels import cudnn_attention
from teacherlm_jax.models.kernels import flash_attention
from teacherlm_jax.models.kernels import splash_attention
from teacherlm_jax.runtime import partitioning


def _slopes(config: ModelConfig) -> Optional[Tuple[float, ...]]:
  if config.family != "bloom":
    return None
  return tuple(float(x) for x in attention.alibi_slopes(config.num_heads))


def _padded(x: jax.Array, axis: int, multiple: int) -> jax.Array:
  """`x` with zeros appended along `axis` up to a multiple of `multiple` (segment id 0 marks
  the added keys as padding, never visible; the added query rows are cut off afterwards)."""
  extra = -x.shape[axis] % multiple
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)


def _kernel_lengths(config: ModelConfig, rows: int, keys: int) -> Tuple[int, int]:
  """What the kernel's tiles need: query rows a multiple of block_q when longer than it, keys
  a multiple of 128 and of block_kv when longer than it."""
  row_multiple = config.attention_block_q if rows > config.attention_block_q else 1
  key_multiple = (config.attention_block_kv if keys > config.attention_block_kv
                  else flash_attention.NUM_LANES)
  return row_multiple, key_multiple


def cache_length(config: ModelConfig, length: int) -> int:
  """The KV cache length to allocate for `length` positions: whole kernel tiles for 'pallas'
  (the kernel would otherwise copy a padded cache at every decode step), `length` elsewhere.
  The extra positions are never written, so their segment id 0 keeps them invisible."""
  if config.attention_impl != "pallas":
    return length
  _, key_multiple = _kernel_lengths(config, 1, length)
  return -(-length // key_multiple) * key_multiple


def _flash(config: ModelConfig, q_BxHxLxD, k_BxKxSxD, v_BxKxSxD, q_segment_ids_BxL,
           q_positions_BxL, kv_segment_ids_BxS, kv_positions_BxS, causal: bool) -> jax.Array:
  """The Pallas kernel on any lengths: padded to its tiles, the padding cut off after."""
  rows, keys = q_BxHxLxD.shape[2], k_BxKxSxD.shape[2]
  row_multiple, key_multiple = _kernel_lengths(config, rows, keys)
  if causal:  # Queries and keys are one sequence.
    row_multiple = key_multiple = max(row_multiple, key_multiple)
  slopes = _slopes(config)
  rows_BxL = (_padded(q_segment_ids_BxL, 1, row_multiple),
              _padded(q_positions_BxL, 1, row_multiple),
              _padded(kv_segment_ids_BxS, 1, key_multiple),
              _padded(kv_positions_BxS, 1, key_multiple))

  def kernel(q, k, v, q_ids, q_pos, kv_ids, kv_pos, slopes_H):
    return flash_attention.flash_attention(
        q, k, v, q_ids, q_pos, kv_ids, kv_pos, alibi_slopes=slopes_H, causal=causal,
        block_q=config.attention_block_q, block_kv=config.attention_block_kv)

  out = _per_shard(kernel, _padded(q_BxHxLxD, 2, row_multiple),
                   _padded(k_BxKxSxD, 2, key_multiple), _padded(v_BxKxSxD, 2, key_multiple),
                   rows_BxL, None if slopes is None else jnp.asarray(slopes, jnp.float32))
  return out[:, :, :rows]


def _splash(config: ModelConfig, q_BxHxLxD, k_BxKxLxD, v_BxKxLxD,
            segment_ids_BxL) -> jax.Array:
  """Upstream's splash attention on any length: padded to its tiles, the padding cut off
  after (the added tokens have segment id 0, so no real query sees them)."""
  length = q_BxHxLxD.shape[2]
  padded, block_q, block_kv = splash_attention.blocks(length, config.attention_block_q,
                                                      config.attention_block_kv)
  pad = lambda x, axis: _padded(x, axis, padded)

  def kernel(q, k, v, segment_ids, _):
    return splash_attention.splash_attention(q, k, v, segment_ids, block_q=block_q,
                                             block_kv=block_kv)

  out = _per_shard(kernel, pad(q_BxHxLxD, 2), pad(k_BxKxLxD, 2), pad(v_BxKxLxD, 2),
                   (pad(segment_ids_BxL, 1),))
  return out[:, :, :length]


def _per_shard(kernel, q, k, v, rows_BxL, slopes_H=None):
  """`kernel(q, k, v, *rows_BxL, slopes_H)` on each device's part of the context mesh (a
  Mosaic kernel cannot be partitioned by XLA): rows split as the activations' batch, heads as
  theirs when every shard gets whole key/value groups, lengths whole. Without a mesh,
  `kernel` itself."""
  operands = (q, k, v, *rows_BxL, slopes_H)
  mesh = partitioning.context_mesh()
  if mesh is None or mesh.size == 1:
    return kernel(*operands)
  batch, = partitioning.logical_to_spec(("activation_batch",), mesh=mesh)
  if batch is not None and q.shape[0] % partitioning.shard_count(("activation_batch",)):
    batch = None
  heads, = partitioning.logical_to_spec(("activation_heads",), mesh=mesh)
  if heads is not None and k.shape[1] % partitioning.shard_count(("activation_heads",)):
    heads = None  # Uneven groups: every shard computes all heads of its rows.
  P = jax.sharding.PartitionSpec
  specs = ((P(batch, heads),) * 3 + (P(batch),) * len(rows_BxL)
           + (None if slopes_H is None else P(heads),))
  return jax.shard_map(kernel, mesh=mesh, in_specs=specs, out_specs=P(batch, heads),
                       check_vma=False)(*operands)


def cache_free(config: ModelConfig, q_BxKxGxLxD: jax.Array, k_BxKxLxD: jax.Array,
               v_BxKxLxD: jax.Array, segment_ids_BxL: jax.Array,
               positions_BxL: jax.Array) -> jax.Array:
  """Each token to its own text's earlier tokens -> (B, K, G, L, D)."""
  alibi = config.family == "bloom"
  if config.attention_impl == "xla":
    return attention.causal_attention(q_BxKxGxLxD, k_BxKxLxD, v_BxKxLxD, segment_ids_BxL,
                                      positions_BxL, alibi, jnp.dtype(config.compute_dtype))
  if config.attention_impl == "cudnn":
    out = cudnn_attention.dot_product_attention(
        q_BxKxGxLxD, k_BxKxLxD, v_BxKxLxD, segment_ids_BxL, positions_BxL, segment_ids_BxL,
        positions_BxL, alibi_slopes=_slopes(config), causal=True)
    return checkpoint_name(out, attention.ATTENTION_OUTPUT)
  b, kv_heads, groups, l, d = q_BxKxGxLxD.shape
  q_BxHxLxD = q_BxKxGxLxD.reshape(b, kv_heads * groups, l, d)
  if alibi:
    out_BxHxLxD = _flash(config, q_BxHxLxD, k_BxKxLxD, v_BxKxLxD, segment_ids_BxL,
                         positions_BxL, segment_ids_BxL, positions_BxL, causal=True)
  else:  # Causal by row equals our rule by position here (kernels/splash_attention.py).
    out_BxHxLxD = _splash(config, q_BxHxLxD, k_BxKxLxD, v_BxKxLxD, segment_ids_BxL)
  return out_BxHxLxD.reshape(b, kv_heads, groups, l, d)


def cached(config: ModelConfig, q_BxKxGxLxD: jax.Array, k_BxKxSxD: jax.Array,
           v_BxKxSxD: jax.Array, segment_ids_BxL: jax.Array, positions_BxL: jax.Array,
           key_segment_ids_BxS: jax.Array, key_positions_BxS: jax.Array) -> jax.Array:
  """New tokens to every key the cache holds (visibility by segment and position alone)."""
  alibi = config.family == "bloom"
  if config.attention_impl == "xla":
    return attention.attend(q_BxKxGxLxD, k_BxKxSxD, v_BxKxSxD, segment_ids_BxL, positions_BxL,
                            key_segment_ids_BxS, key_positions_BxS, alibi)
  if config.attention_impl == "cudnn":
    return cudnn_attention.dot_product_attention(
        q_BxKxGxLxD, k_BxKxSxD, v_BxKxSxD, segment_ids_BxL, positions_BxL, key_segment_ids_BxS,
        key_positions_BxS, alibi_slopes=_slopes(config), causal=False)
  b, kv_heads, groups, l, d = q_BxKxGxLxD.shape
  if alibi:  # One slope per query head: one kernel head per query head.
    q_rows = q_BxKxGxLxD.reshape(b, kv_heads * groups, l, d)
    row_segment_ids, row_positions = segment_ids_BxL, positions_BxL
  else:
    # A key/value head's G query heads as G * L rows of one kernel head: each cache block is
    # read once for the whole group (the decode step is bound by reading the cache).
    q_rows = q_BxKxGxLxD.reshape(b, kv_heads, groups * l, d)
    row_segment_ids = jnp.tile(segment_ids_BxL, (1, groups))
    row_positions = jnp.tile(positions_BxL, (1, groups))
  # Decoders size their caches by `cache_length`, so `_padded` copies nothing here.
  out = _flash(config, q_rows, k_BxKxSxD, v_BxKxSxD, row_segment_ids, row_positions,
               key_segment_ids_BxS, key_positions_BxS, causal=False)
  return out.reshape(b, kv_heads, groups, l, d)
