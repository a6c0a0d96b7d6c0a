"""Flax NNX decoder LMs: BLOOM (ALiBi), OPT (learned positions), LLaMA-style (RoPE, GQA).

One `DecoderLM` covers the three families; the family only selects the embedding, position
scheme, norms and MLP. Every parameter carries `logical_axes` metadata that
`partitioning.py` maps to the mesh.

Masking is expressed with two integer arrays instead of a boolean attention mask:
  * `segment_ids_BxL`: 0 marks padding, equal non-zero ids mark one text (packed batches hold
    several texts per row; attention never crosses a segment boundary);
  * `positions_BxL`: the token's position inside its text (reset per segment, 0 for the first
    non-pad token of a left-padded row, which is what HF derives from `attention_mask`).
A key is visible to a query iff both are in the same non-zero segment and the key's position is
not after the query's. The same rule (`attention.scores_and_visibility`) serves full forwards,
packed training, and cached decoding, where the cache stores the segment ids and positions of
the keys it holds.

The KV cache is a plain pytree (`init_cache`) passed in and returned, so the decode loop can
jit, shard and donate it like any other state.
"""
from __future__ import annotations

import string
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
import numpy as np
from flax import nnx

from teacherlm_jax.models import attention
from teacherlm_jax.models import attention_impl
from teacherlm_jax.models import matmul
from teacherlm_jax.models.config import ModelConfig
from teacherlm_jax.runtime import partitioning

Cache = Dict[str, Any]

_default_kernel_init = nnx.initializers.normal(stddev=0.02)
# The checkpoint name of the Dense outputs, which remat='dots' saves (with attention's output
# and row statistics, see attention.py).
PROJECTION_OUTPUT = "projection_output"


def _param(rngs: nnx.Rngs, init, shape, axes, dtype) -> nnx.Param:
  return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=tuple(axes))


class Dense(nnx.Module):
  """y = x @ kernel (+ bias); kernel shape = in_shape + out_shape with logical axes."""

  def __init__(self, in_shape, out_shape, in_axes, out_axes, *, use_bias: bool,
               config: ModelConfig, rngs: nnx.Rngs):
    self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
    self.kernel = _param(rngs, _default_kernel_init, self.in_shape + self.out_shape,
                         tuple(in_axes) + tuple(out_axes), config.weight_dtype)
    self.bias = (_param(rngs, nnx.initializers.zeros, self.out_shape, out_axes, config.weight_dtype)
                 if use_bias else None)
    self.dtype = config.compute_dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    n_lead = x.ndim - len(self.in_shape)
    letters = string.ascii_letters
    lead, contracted = letters[:n_lead], letters[n_lead:x.ndim]
    out = letters[x.ndim:x.ndim + len(self.out_shape)]
    # Float32 accumulation (as the MXU does) both ways; XLA:CPU then runs bf16 dots on its
    # bf16 (AMX) kernels, 3x faster than a bf16-output dot, which it upcasts.
    y = matmul.einsum(f"{lead}{contracted},{contracted}{out}->{lead}{out}",
                      x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    # Named for remat='dots', which saves projection outputs (in the compute dtype: half the
    # residual memory of the float32 accumulator in bf16).
    return checkpoint_name(y.astype(self.dtype), PROJECTION_OUTPUT)


class LayerNorm(nnx.Module):
  """LayerNorm (with bias) or RMSNorm, statistics in float32."""

  def __init__(self, dim: int, *, rms: bool, eps: float, config: ModelConfig, rngs: nnx.Rngs):
    del rngs
    self.rms, self.eps, self.dtype = rms, eps, config.compute_dtype
    self.scale = nnx.Param(jnp.ones((dim,), config.weight_dtype), logical_axes=("norm",))
    self.bias = None if rms else nnx.Param(jnp.zeros((dim,), config.weight_dtype),
                                           logical_axes=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    if self.rms:
      y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
      # LLaMA casts back to the input dtype before the scale.
      return self.scale[...].astype(self.dtype) * y.astype(self.dtype)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


def rope_tables(positions_BxL: jax.Array, dim: int, theta: float) -> Tuple[jax.Array, jax.Array]:
  """cos and sin of the rotary angles of `positions_BxL`, each [B, L, 1, dim] float32.

  Computed once per forward and shared by the layers. Computed inside each layer instead,
  XLA:CPU fused the cos and sin into every consumer of the rotated q and k, once per element
  of every head, forward and backward: the LLaMA-style 58M float32 train step's non-matmul
  ops took 1.20 s of op time against 0.97 s with shared tables (the step 1.01-1.04x faster in
  float32, 1.04-1.05x in bf16 in a same-process A/B).
  """
  inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
  angles = positions_BxL.astype(jnp.float32)[..., None] * inv_freq  # B x L x D/2
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  return jnp.cos(angles), jnp.sin(angles)


def rope(x_BxLxHxD: jax.Array, tables: Tuple[jax.Array, jax.Array]) -> jax.Array:
  """Rotary embedding with HF LLaMA's rotate-half convention, computed in float32; `tables`
  from `rope_tables`."""
  cos, sin = tables
  x = x_BxLxHxD.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return (x * cos + rotated * sin).astype(x_BxLxHxD.dtype)


def _write_cache(cache: jax.Array, new: jax.Array, index_B: jax.Array, length_axis: int = 1):
  """Writes each row's new entries at that row's own index along `length_axis`."""
  def update(c, x, i):
    starts = [0] * c.ndim
    starts[length_axis - 1] = i  # Per row: the batch axis is mapped away.
    return jax.lax.dynamic_update_slice(c, x.astype(c.dtype), tuple(starts))
  return jax.vmap(update)(cache, new, index_B)


class Attention(nnx.Module):
  """Multi-head / grouped-query attention with ALiBi, RoPE or no in-attention positions."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    d, h, k, hd = config.hidden_size, config.num_heads, config.kv_heads, config.dim_per_head
    if config.family == "bloom":
      # Fused QKV as in BLOOM checkpoints: per head, [q, k, v] rows of head_dim each.
      self.qkv = Dense((d,), (h, 3, hd), ("embed",), ("heads", "qkv", "head_dim"),
                       use_bias=config.use_bias, config=config, rngs=rngs)
    else:
      self.q = Dense((d,), (h, hd), ("embed",), ("heads", "head_dim"), use_bias=config.use_bias,
                     config=config, rngs=rngs)
      self.k = Dense((d,), (k, hd), ("embed",), ("kv_heads", "head_dim"),
                     use_bias=config.use_bias, config=config, rngs=rngs)
      self.v = Dense((d,), (k, hd), ("embed",), ("kv_heads", "head_dim"),
                     use_bias=config.use_bias, config=config, rngs=rngs)
    self.out = Dense((h, hd), (d,), ("heads", "head_dim"), ("embed",), use_bias=config.use_bias,
                     config=config, rngs=rngs)

  def __call__(self, x_BxLxD, segment_ids_BxL, positions_BxL, layer_cache: Optional[Cache],
               key_segment_ids_BxS, key_positions_BxS, cache_index_B, rope_tables_BxL=None):
    """`rope_tables_BxL`: `rope_tables(positions_BxL, ...)`, for the LLaMA family."""
    cfg = self.config
    # The dtype of attention's products (float32 for a bf16 model on CPU, see
    # matmul.batched_operand_dtype), cast to once, where q, k and v leave their projections.
    # Cast after BLOOM's fused qkv is split, or per query block below, each piece's gradient
    # was rounded to bf16 before the pieces' sum, and XLA:CPU fused that chain of pads, adds
    # and roundings into loops up to 4.5x slower than the same sums in float32 (the bf16
    # BLOOM-42M train step: 2.70 -> 2.43 s in single-variant profiles, 1.03-1.06x in a
    # same-process A/B; same first loss).
    dtype = matmul.batched_operand_dtype(cfg.compute_dtype, jax.default_backend())
    if cfg.family == "bloom":
      qkv = self.qkv(x_BxLxD).astype(dtype)
      q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
    else:
      q, k, v = (proj(x_BxLxD).astype(dtype) for proj in (self.q, self.k, self.v))
    if cfg.family == "llama":
      q = rope(q, rope_tables_BxL)
      k = rope(k, rope_tables_BxL)
    q = partitioning.constrain(q, ("activation_batch", "activation_length", "activation_heads", None))

    # Keys and values are attended in B x K x S x D (heads-major) layout, the cache's own:
    # the attention dots then batch over (B, K) without transposing the whole cache each step.
    new_cache = None
    if layer_cache is not None:
      keys = _write_cache(layer_cache["key"], k.transpose(0, 2, 1, 3), cache_index_B, 2)
      values = _write_cache(layer_cache["value"], v.transpose(0, 2, 1, 3), cache_index_B, 2)
      new_cache = {"key": keys, "value": values}
      # Attend in the cache's dtype (q is small): a float32 cache for a bf16 model (the CPU
      # default, see decoding.Decoder) is then read as it is, not rounded and re-widened.
      k, v = keys, values
    else:
      k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    b, l, h, hd = q.shape
    kv_heads, groups = cfg.kv_heads, h // cfg.kv_heads
    # (B, K, G, L, D): each key/value head's query groups, folded into rows by attention.py.
    q = q.astype(k.dtype).reshape(b, l, kv_heads, groups, hd).transpose(0, 2, 3, 1, 4)
    # By cfg.attention_impl: the 'xla' reference, or the platform's kernel.
    if layer_cache is not None:
      attended = attention_impl.cached(cfg, q, k, v, segment_ids_BxL, positions_BxL,
                                       key_segment_ids_BxS, key_positions_BxS)
    else:  # A cache-free forward: causal.
      attended = attention_impl.cache_free(cfg, q, k, v, segment_ids_BxL, positions_BxL)
    attended = attended.transpose(0, 3, 1, 2, 4).astype(cfg.compute_dtype).reshape(b, l, h, hd)
    return self.out(attended), new_cache


class MLP(nnx.Module):

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.family = config.family
    d, f = config.hidden_size, config.mlp_dim
    dense = lambda i, o, ia, oa: Dense((i,), (o,), (ia,), (oa,), use_bias=config.use_bias,
                                       config=config, rngs=rngs)
    self.up = dense(d, f, "embed", "mlp")
    if config.family == "llama":
      self.gate = dense(d, f, "embed", "mlp")
    self.down = dense(f, d, "mlp", "embed")

  def __call__(self, x_BxLxD):
    if self.family == "llama":
      h = jax.nn.silu(self.gate(x_BxLxD)) * self.up(x_BxLxD)
    elif self.family == "bloom":
      h = jax.nn.gelu(self.up(x_BxLxD), approximate=True)
    else:
      h = jax.nn.relu(self.up(x_BxLxD))
    h = partitioning.constrain(h, ("activation_batch", "activation_length", "activation_mlp"))
    return self.down(h)


class Block(nnx.Module):
  """Pre-LN decoder block (post-LN for OPT with do_layer_norm_before=False)."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    norm = lambda: LayerNorm(config.hidden_size, rms=config.family == "llama",
                             eps=config.norm_eps, config=config, rngs=rngs)
    self.pre_ln = config.family != "opt" or config.do_layer_norm_before
    self.attention_norm = norm()
    self.attention = Attention(config, rngs=rngs)
    self.mlp_norm = norm()
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x, segment_ids, positions, layer_cache, key_segment_ids, key_positions,
               cache_index, rope_tables=None):
    residual = x
    h = self.attention_norm(x) if self.pre_ln else x
    h, new_cache = self.attention(h, segment_ids, positions, layer_cache, key_segment_ids,
                                  key_positions, cache_index, rope_tables)
    x = residual + h
    if not self.pre_ln:
      x = self.attention_norm(x)
    residual = x
    h = self.mlp_norm(x) if self.pre_ln else x
    x = residual + self.mlp(h)
    if not self.pre_ln:
      x = self.mlp_norm(x)
    x = partitioning.constrain(x, ("activation_batch", "activation_length", "activation_embed"))
    return x, new_cache


def positions_from_segments(segment_ids_BxL: jax.Array) -> jax.Array:
  """Position of each token inside its segment (0 at each segment start; pads count too)."""
  length = segment_ids_BxL.shape[1]
  index = jnp.arange(length, dtype=jnp.int32)[None, :]
  previous = jnp.pad(segment_ids_BxL[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  starts = jnp.where(segment_ids_BxL != previous, index, 0)
  return index - jax.lax.cummax(starts, axis=1)


class DecoderLM(nnx.Module):
  """Decoder-only LM for the BLOOM, OPT and LLaMA families."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype = config.weight_dtype
    self.token_embedding = _param(rngs, _default_kernel_init, (config.vocab_size, config.embed_dim),
                                  ("vocab", "embed"), dtype)
    if config.family == "bloom":
      self.embedding_norm = LayerNorm(config.hidden_size, rms=False, eps=config.norm_eps,
                                      config=config, rngs=rngs)
    if config.family == "opt":
      # OPT offsets learned positions by 2 (rows 0 and 1 are legacy padding slots).
      self.position_embedding = _param(
          rngs, _default_kernel_init, (config.max_position_embeddings + 2, config.hidden_size),
          ("positions", "embed"), dtype)
      if config.embed_dim != config.hidden_size:
        self.project_in = Dense((config.embed_dim,), (config.hidden_size,), ("norm",), ("embed",),
                                use_bias=False, config=config, rngs=rngs)
        self.project_out = Dense((config.hidden_size,), (config.embed_dim,), ("embed",),
                                 ("norm",), use_bias=False, config=config, rngs=rngs)
    self.layers = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
    if config.has_final_norm:
      self.final_norm = LayerNorm(config.hidden_size, rms=config.family == "llama",
                                  eps=config.norm_eps, config=config, rngs=rngs)
    if not config.tie_word_embeddings:
      self.lm_head = _param(rngs, _default_kernel_init, (config.embed_dim, config.vocab_size),
                            ("embed", "vocab"), dtype)

  def embed(self, tokens_BxL: jax.Array, positions_BxL: jax.Array) -> jax.Array:
    cfg = self.config
    x = jnp.take(self.token_embedding[...], tokens_BxL, axis=0).astype(cfg.compute_dtype)
    if cfg.family == "bloom":
      x = self.embedding_norm(x)
    elif cfg.family == "opt":
      if cfg.embed_dim != cfg.hidden_size:
        x = self.project_in(x)
      table = self.position_embedding[...]
      x = x + jnp.take(table, positions_BxL + 2, axis=0, mode="clip").astype(cfg.compute_dtype)
    return partitioning.constrain(x, ("activation_batch", "activation_length", "activation_embed"))

  def head_operands(self, x_BxLxD: jax.Array) -> Tuple[jax.Array, jax.Array, bool]:
    """(the head's inputs, its weights, vocab_major): final norm (and OPT's projection)
    applied, both in the compute dtype; the weights are the [vocab, embed] embedding table
    when tied (vocab_major), else the [embed, vocab] lm_head."""
    cfg = self.config
    if cfg.has_final_norm:
      x_BxLxD = self.final_norm(x_BxLxD)
    if cfg.family == "opt" and cfg.embed_dim != cfg.hidden_size:
      x_BxLxD = self.project_out(x_BxLxD)
    head = self.token_embedding if cfg.tie_word_embeddings else self.lm_head
    return (x_BxLxD.astype(cfg.compute_dtype), head[...].astype(cfg.compute_dtype),
            cfg.tie_word_embeddings)

  def logits(self, x_BxLxD: jax.Array) -> jax.Array:
    x_BxLxD, head, vocab_major = self.head_operands(x_BxLxD)
    if vocab_major:
      if x_BxLxD.shape[0] * x_BxLxD.shape[1] == 1:
        # One row (batch-1 decoding): with the table as the left operand XLA:CPU runs a
        # matrix-vector product; the other order it rewrote into a multiply-reduce loop with
        # the final norm fused in, 1.4x slower on the largest read of the step.
        logits = jnp.moveaxis(matmul.einsum("vd,bld->vbl", head, x_BxLxD), 0, -1)
      else:
        logits = matmul.einsum("bld,vd->blv", x_BxLxD, head)
    else:
      logits = matmul.einsum("bld,dv->blv", x_BxLxD, head)
    return partitioning.constrain(logits, ("activation_batch", "activation_length",
                                           "activation_vocab"))

  def _scan_blocks(self, x_BxLxD: jax.Array, segment_ids_BxL: jax.Array,
                   positions_BxL: jax.Array, rope_tables_BxL) -> jax.Array:
    """All blocks of a cache-free forward as one `lax.scan` over their stacked parameters.

    The parameter tree keeps one entry per layer (checkpoints, HF conversion and sharding rules
    see no change); the blocks' weights are stacked here, inside the traced step. Scanning
    gives one compiled block instead of num_layers copies, and its backward pass carries the
    residual stream's gradient from layer to layer as one buffer: unrolled, XLA:CPU fuses that
    growing sum of per-layer terms into every consumer and recomputes it (quadratic in depth,
    ~20% of a BLOOM-42M float32 train step).

    Why not store the weights stacked (no per-step stacking copy): the cached decode step then
    has to slice each layer's weights inside its loop (XLA:CPU copies them: 0.77x the speed of
    per-layer weights, batch 32) or scan the layers together with a stacked cache (0.37x).
    """
    graphdef, first_state = nnx.split(self.layers[0])
    states = [first_state] + [nnx.split(block)[1] for block in self.layers[1:]]
    stacked_state = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)

    def body(x, state):
      block = nnx.merge(graphdef, state)
      x, _ = block(x, segment_ids_BxL, positions_BxL, None, segment_ids_BxL, positions_BxL,
                   None, rope_tables_BxL)
      return x, None

    if self.config.remat != "none":
      policy = (jax.checkpoint_policies.save_only_these_names(
                    PROJECTION_OUTPUT, attention.ATTENTION_OUTPUT, attention.ATTENTION_ROW_STATS)
                if self.config.remat == "dots" else None)
      body = jax.checkpoint(body, policy=policy)
    x_BxLxD, _ = jax.lax.scan(body, x_BxLxD, stacked_state)
    return x_BxLxD

  def __call__(self, tokens_BxL: jax.Array, *, segment_ids_BxL: Optional[jax.Array] = None,
               positions_BxL: Optional[jax.Array] = None, cache: Optional[Cache] = None,
               return_hidden: bool = False) -> Tuple[jax.Array, Optional[Cache]]:
    """Runs the decoder.

    Args:
      tokens_BxL: int token ids.
      segment_ids_BxL: 0 for padding, >0 per packed text; default all ones.
      positions_BxL: positions inside each segment; default derived from segment_ids_BxL.
      cache: from `init_cache`; when given, the L new tokens are written at each row's
        `cache["index"]` and attend to everything the cache holds.
      return_hidden: return final hidden states instead of logits.

    Returns:
      (logits_BxLxV in float32 (or hidden states), updated cache or None).
    """
    if segment_ids_BxL is None:
      segment_ids_BxL = jnp.ones(tokens_BxL.shape, jnp.int32)
    segment_ids_BxL = segment_ids_BxL.astype(jnp.int32)
    if positions_BxL is None:
      positions_BxL = positions_from_segments(segment_ids_BxL)
      if cache is not None:
        # Continue each row's text after the tokens its cache already holds.
        held_B = jnp.sum(cache["segment_ids"] != 0, axis=1, dtype=jnp.int32)
        positions_BxL = positions_BxL + held_B[:, None]
    positions_BxL = positions_BxL.astype(jnp.int32)

    if cache is not None:
      index_B = cache["index"]
      key_segment_ids = _write_cache(cache["segment_ids"], segment_ids_BxL, index_B)
      key_positions = _write_cache(cache["positions"], positions_BxL, index_B)
    else:
      index_B, key_segment_ids, key_positions = None, segment_ids_BxL, positions_BxL

    x = self.embed(tokens_BxL, positions_BxL)
    cfg = self.config
    tables = (rope_tables(positions_BxL, cfg.dim_per_head, cfg.rope_theta)
              if cfg.family == "llama" else None)
    new_cache = None
    if cache is None:
      x = self._scan_blocks(x, segment_ids_BxL, positions_BxL, tables)
    else:
      new_layer_caches = []
      for block, layer_cache in zip(self.layers, cache["layers"]):
        x, new_layer_cache = block(x, segment_ids_BxL, positions_BxL, layer_cache,
                                   key_segment_ids, key_positions, index_B, tables)
        new_layer_caches.append(new_layer_cache)
    out = x if return_hidden else self.logits(x)

    if cache is not None:
      new_cache = {"layers": tuple(new_layer_caches), "segment_ids": key_segment_ids,
                   "positions": key_positions, "index": index_B + tokens_BxL.shape[1]}
    return out, new_cache


CACHE_AXES = {
    "key": ("cache_batch", "cache_kv_heads", "cache_length", "cache_head_dim"),
    "value": ("cache_batch", "cache_kv_heads", "cache_length", "cache_head_dim"),
    "segment_ids": ("cache_batch", "cache_length"),
    "positions": ("cache_batch", "cache_length"),
    "index": ("cache_batch",),
}


def init_cache(config: ModelConfig, batch_size: int, max_length: int,
               dtype: Optional[jnp.dtype] = None) -> Cache:
  """An empty KV cache: `max_length` slots per row, all marked as padding (segment 0).

  Keys and values are B x K x S x D (heads-major), the layout attention reads them in.
  """
  dtype = dtype or config.compute_dtype
  shape = (batch_size, config.kv_heads, max_length, config.dim_per_head)
  layer = lambda: {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}
  return {
      "layers": tuple(layer() for _ in range(config.num_layers)),
      "segment_ids": jnp.zeros((batch_size, max_length), jnp.int32),
      "positions": jnp.zeros((batch_size, max_length), jnp.int32),
      "index": jnp.zeros((batch_size,), jnp.int32),
  }


def cache_logical_axes(cache: Cache) -> Cache:
  """The logical axis names of every cache leaf (same tree structure as `cache`)."""
  return {
      "layers": tuple({"key": CACHE_AXES["key"], "value": CACHE_AXES["value"]}
                      for _ in cache["layers"]),
      "segment_ids": CACHE_AXES["segment_ids"],
      "positions": CACHE_AXES["positions"],
      "index": CACHE_AXES["index"],
  }
