"""Cache-free causal attention with upstream's splash attention kernel
(`jax.experimental.pallas.ops.tpu.splash_attention`), for the families without ALiBi.

Splash has no bias operand, so BLOOM (ALiBi) and every cached call keep
models/kernels/flash_attention.py; OPT's and LLaMA's training and scoring forward and backward
run here. Splash's visibility is a static mask (here causal: key row <= query row) and segment
equality. That equals our rule (`attention.scores_and_visibility`: same non-zero segment, key
position <= query position) for every real token when each text is one run of its row with
positions rising along it, as packed and left-padded batches are. Padding (segment id 0) is
where they differ: our rule gives a pad query no key, splash lets it see the pad keys up to its
own row, so every row has at least its diagonal, its softmax is finite and no NaN reaches the
gradients; no real query ever sees a pad key under either rule.

Splash does not scale the scores: the queries are multiplied by 1/sqrt(D) before the kernel.
Shapes: q (B, H, L, D); k, v (B, K, L, D) with H = K * G (query head h reads key/value head
h // G, as in the model's layout); segment ids (B, L).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

from teacherlm_jax.models import attention

NUM_LANES = 128


def blocks(length: int, block_q: int, block_kv: int):
  """(padded length, block_q, block_kv): blocks clipped to the length and whole multiples of
  128 (splash's dK/dV kernel lays query blocks along lanes), the length a multiple of both."""
  whole = lambda n, multiple: -(-n // multiple) * multiple
  padded = whole(length, NUM_LANES)
  block_q = min(whole(block_q, NUM_LANES), padded)
  block_kv = min(whole(block_kv, NUM_LANES), padded)
  return whole(padded, math.lcm(block_q, block_kv)), block_q, block_kv


def splash_attention(q_BxHxLxD: jax.Array, k_BxKxLxD: jax.Array, v_BxKxLxD: jax.Array,
                     segment_ids_BxL: jax.Array, *, block_q: int = 512, block_kv: int = 512,
                     interpret: bool = False) -> jax.Array:
  """Each query to the keys of its own segment at the same or an earlier row -> (B, H, L, D)
  in q's dtype. L must be a multiple of both blocks (see `blocks`). Differentiable in q, k, v."""
  b, h, l, d = q_BxHxLxD.shape
  if l % block_q or l % block_kv or block_q % NUM_LANES or block_kv % NUM_LANES:
    raise ValueError(f"length {l} must be a multiple of block_q={block_q} and "
                     f"block_kv={block_kv}, each a multiple of {NUM_LANES}")
  sizes = splash.BlockSizes(
      block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv, block_q_dkv=block_q,
      block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv, block_q_dq=block_q,
      block_kv_dq=block_kv)
  mask = masks.MultiHeadMask([masks.CausalMask((l, l))] * h)
  # Both residuals (output and logsumexp) under the name remat='dots' saves, as with our kernel.
  kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  residual_checkpoint_name=attention.ATTENTION_OUTPUT,
                                  interpret=interpret)
  q = (q_BxHxLxD.astype(jnp.float32) / math.sqrt(d)).astype(q_BxHxLxD.dtype)
  ids = splash.SegmentIds(q=segment_ids_BxL, kv=segment_ids_BxL)
  return jax.vmap(kernel)(q, k_BxKxLxD, v_BxKxLxD, ids)
