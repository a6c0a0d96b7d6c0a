"""The attention implementation a `ModelConfig` names ('xla', 'pallas' or 'cudnn'), for a
cache-free forward and for a cached one (prefill and decoding), in the model's layouts.

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


def _slopes(config: ModelConfig) -> Optional[Tuple[float, ...]]:
  if config.family != "bloom":
    return None
  return tuple(float(x) for x in attention.alibi_slopes(config.num_heads))


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
  out_BxHxLxD = flash_attention.flash_attention(
      q_BxKxGxLxD.reshape(b, kv_heads * groups, l, d), k_BxKxLxD, v_BxKxLxD, segment_ids_BxL,
      positions_BxL, segment_ids_BxL, positions_BxL, alibi_slopes=_slopes(config), causal=True,
      block_q=config.attention_block_q, block_kv=config.attention_block_kv)
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
  out = flash_attention.flash_attention(
      q_rows, k_BxKxSxD, v_BxKxSxD, row_segment_ids, row_positions, key_segment_ids_BxS,
      key_positions_BxS, alibi_slopes=_slopes(config), causal=False,
      block_q=config.attention_block_q, block_kv=config.attention_block_kv)
  return out.reshape(b, kv_heads, groups, l, d)
