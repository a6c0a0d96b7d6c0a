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

The blocks are stored stacked: one `Block` whose parameters carry a leading `layers` axis
(logical name 'layers'), run by one `lax.scan` in training, prefill, decoding and scoring, so a
step compiles one block whatever the depth. The KV cache is stacked the same way and is a plain
pytree (`init_cache`) passed in and returned, so the decode loop can jit, shard and donate it
like any other state.

The model is the same math on every platform: the config fixes the parameter, compute and
cache dtypes, and nothing here asks which backend runs it (`runtime/backend.py` sets how XLA
compiles it).
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
# The logical name of the stacked blocks' leading axis (parameters and KV cache).
LAYERS_AXIS = "layers"
CACHE_LAYERS_AXIS = "cache_layers"

# `ModelConfig.remat` -> the `jax.checkpoint` policy of each scanned block (None: no remat).
# Named policies save only the named values (`jax.checkpoint_policies.save_only_these_names`).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.save_only_these_names(
        PROJECTION_OUTPUT, attention.ATTENTION_OUTPUT, attention.ATTENTION_ROW_STATS),
    "save_projections": jax.checkpoint_policies.save_only_these_names(PROJECTION_OUTPUT),
    "save_attention": jax.checkpoint_policies.save_only_these_names(
        attention.ATTENTION_OUTPUT, attention.ATTENTION_ROW_STATS),
}


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
    # Compute-dtype operands, float32 accumulation (as the MXU does), both ways.
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

  Computed once per forward and shared by the layers, so that no layer recomputes the cos
  and sin inside the consumers of its rotated q and k.
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
    # Attention's products take the compute dtype, as every matmul (the config's numerics).
    dtype = cfg.compute_dtype
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
      # Attend in the cache's dtype (q is small): a cache wider than the compute dtype
      # (`ModelConfig.cache_dtype`) is then read as it is, not rounded and re-widened.
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
    self.layers = _stacked_blocks(config, rngs)
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
      logits = matmul.einsum("bld,vd->blv", x_BxLxD, head)
    else:
      logits = matmul.einsum("bld,dv->blv", x_BxLxD, head)
    return partitioning.constrain(logits, ("activation_batch", "activation_length",
                                           "activation_vocab"))

  def _scan_blocks(self, x_BxLxD: jax.Array, segment_ids_BxL: jax.Array,
                   positions_BxL: jax.Array, layer_caches: Optional[Cache], key_segment_ids_BxS,
                   key_positions_BxS, cache_index_B, rope_tables_BxL):
    """All blocks as one `lax.scan` over their stacked parameters (and stacked KV cache).

    Returns (x_BxLxD, the updated stacked layer caches or None). A cache-free forward (the
    train step) rematerialises each block by `ModelConfig.remat`'s policy.
    """
    graphdef, stacked_state = nnx.split(self.layers)

    def body(x, layer):
      state, layer_cache = layer
      block = nnx.merge(graphdef, state)
      return block(x, segment_ids_BxL, positions_BxL, layer_cache, key_segment_ids_BxS,
                   key_positions_BxS, cache_index_B, rope_tables_BxL)

    if layer_caches is None and self.config.remat != "none":
      body = jax.checkpoint(body, policy=REMAT_POLICIES[self.config.remat])
      # Kernels cast once for all layers (as Dense would per use): the scan then stacks their
      # gradients in the compute dtype, not float32; the same numbers (Dense rounds both).
      stacked_state = _kernels_in(stacked_state, self.config.compute_dtype)
    return jax.lax.scan(body, x_BxLxD, (stacked_state, layer_caches))

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
    x, new_layer_caches = self._scan_blocks(
        x, segment_ids_BxL, positions_BxL, None if cache is None else cache["layers"],
        key_segment_ids, key_positions, index_B, tables)
    out = x if return_hidden else self.logits(x)

    new_cache = None
    if cache is not None:
      new_cache = {"layers": new_layer_caches, "segment_ids": key_segment_ids,
                   "positions": key_positions, "index": index_B + tokens_BxL.shape[1]}
    return out, new_cache


def _kernels_in(state, dtype):
  """`state` with every Dense kernel cast to `dtype`, the dtype Dense computes in."""
  is_kernel = lambda path: any(getattr(key, "key", None) == "kernel" for key in path)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x.astype(dtype) if is_kernel(path) else x, state)


def _stacked_blocks(config: ModelConfig, rngs: nnx.Rngs) -> Block:
  """`config.num_layers` blocks as one `Block` whose parameters have a leading layers axis,
  each layer initialised from its own split of `rngs` (one traced block, not num_layers)."""
  @nnx.split_rngs(splits=config.num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(layer_rngs: nnx.Rngs) -> Block:
    return Block(config, rngs=layer_rngs)

  blocks = create(rngs)
  for _, node in nnx.iter_graph(blocks):
    if isinstance(node, nnx.Variable):
      axes = (LAYERS_AXIS,) + tuple(node.get_metadata()["logical_axes"])
      node.set_metadata("logical_axes", axes)
  return blocks


CACHE_AXES = {
    "key": (CACHE_LAYERS_AXIS, "cache_batch", "cache_kv_heads", "cache_length", "cache_head_dim"),
    "value": (CACHE_LAYERS_AXIS, "cache_batch", "cache_kv_heads", "cache_length",
              "cache_head_dim"),
    "segment_ids": ("cache_batch", "cache_length"),
    "positions": ("cache_batch", "cache_length"),
    "index": ("cache_batch",),
}


def init_cache(config: ModelConfig, batch_size: int, max_length: int,
               dtype: Optional[jnp.dtype] = None) -> Cache:
  """An empty KV cache: `max_length` slots per row, all marked as padding (segment 0).

  Keys and values are N x B x K x S x D: stacked over the N layers like the blocks, each
  layer's B x K x S x D (heads-major), the layout attention reads them in. `dtype`: default
  the config's cache dtype.
  """
  dtype = dtype or config.kv_cache_dtype
  shape = (config.num_layers, batch_size, config.kv_heads, max_length, config.dim_per_head)
  return {
      "layers": {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)},
      "segment_ids": jnp.zeros((batch_size, max_length), jnp.int32),
      "positions": jnp.zeros((batch_size, max_length), jnp.int32),
      "index": jnp.zeros((batch_size,), jnp.int32),
  }


def cache_logical_axes(cache: Cache) -> Cache:
  """The logical axis names of every cache leaf (same tree structure as `cache`)."""
  del cache  # Every cache has the same structure.
  return {
      "layers": {"key": CACHE_AXES["key"], "value": CACHE_AXES["value"]},
      "segment_ids": CACHE_AXES["segment_ids"],
      "positions": CACHE_AXES["positions"],
      "index": CACHE_AXES["index"],
  }


def map_cache_rows(fn, cache: Cache, *others: Cache) -> Cache:
  """`fn(leaf, *other_leaves, batch_axis)` over every cache leaf: the leaves hold their rows on
  different axes (1 for the stacked keys and values, 0 for the rest)."""
  axes = cache_logical_axes(cache)
  return jax.tree.map(lambda leaf, *rest: fn(leaf, *rest[:-1], rest[-1].index("cache_batch")),
                      cache, *others, axes)
