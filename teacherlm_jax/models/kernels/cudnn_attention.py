"""Attention through `jax.nn.dot_product_attention` (cuDNN's fused kernel on NVIDIA GPUs).

cuDNN takes no segment ids or positions: our visibility rule goes in as a boolean mask
[B, 1, L, S], and BLOOM's ALiBi as a bias [B, H, L, S] (only for ALiBi models), both
materialised; `causal` also tells cuDNN it may skip the blocks above the diagonal.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp


def dot_product_attention(q_BxKxGxLxD: jax.Array, k_BxKxSxD: jax.Array, v_BxKxSxD: jax.Array,
                          q_segment_ids_BxL: jax.Array, q_positions_BxL: jax.Array,
                          kv_segment_ids_BxS: jax.Array, kv_positions_BxS: jax.Array, *,
                          alibi_slopes: Optional[Sequence[float]], causal: bool,
                          implementation: str = "cudnn") -> jax.Array:
  """Attention of each query to the keys it sees -> (B, K, G, L, D).

  `implementation` is jax.nn.dot_product_attention's: 'cudnn' on GPU; 'xla' checks this
  function's layouts, mask and bias on CPU.
  """
  b, kv_heads, groups, l, d = q_BxKxGxLxD.shape
  s = k_BxKxSxD.shape[2]
  h = kv_heads * groups
  # jax.nn wants (B, T, N, H); query head n reads key/value head n // G, as ours.
  q_BxLxHxD = q_BxKxGxLxD.reshape(b, h, l, d).transpose(0, 2, 1, 3)
  k_BxSxKxD = k_BxKxSxD.transpose(0, 2, 1, 3)
  v_BxSxKxD = v_BxKxSxD.transpose(0, 2, 1, 3)
  visible_BxLxS = ((q_segment_ids_BxL[:, :, None] == kv_segment_ids_BxS[:, None, :])
                   & (kv_segment_ids_BxS[:, None, :] != 0)
                   & (kv_positions_BxS[:, None, :] <= q_positions_BxL[:, :, None]))
  bias = None
  if alibi_slopes is not None:
    slopes_H = jnp.asarray(alibi_slopes, jnp.float32)
    bias = slopes_H[None, :, None, None] * kv_positions_BxS[:, None, None, :].astype(jnp.float32)
    bias = jnp.broadcast_to(bias, (b, h, l, s)).astype(q_BxLxHxD.dtype)
  out_BxLxHxD = jax.nn.dot_product_attention(
      q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, bias=bias, mask=visible_BxLxS[:, None],
      is_causal=causal, implementation=implementation)
  return out_BxLxHxD.transpose(0, 2, 1, 3).reshape(b, kv_heads, groups, l, d)
