"""One `ModelConfig` for every decoder family we support (BLOOM, OPT, LLaMA-style).

The config only describes shapes and numerics; presets with published sizes live in
`configs/models/*.json` (read by `models/presets.py`). Field names follow our modules, not HF; `models/hf.py` maps HF
`config.json` files onto this dataclass and back.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp

FAMILIES = ("bloom", "opt", "llama")
REMAT_POLICIES = ("none", "full", "dots", "save_projections", "save_attention")
# 'xla': the einsum reference (models/attention.py), every platform; 'pallas': the TPU flash
# kernel (models/kernels/flash_attention.py); 'cudnn': cuDNN's fused attention on NVIDIA GPUs.
ATTENTION_IMPLS = ("xla", "pallas", "cudnn")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and numerics of a decoder-only LM.

  Attributes:
    family: 'bloom' (ALiBi, fused QKV, GeLU, embedding LayerNorm), 'opt' (learned positions
      with offset 2, ReLU, pre- or post-LN), or 'llama' (RoPE, RMSNorm, SwiGLU, GQA).
    vocab_size: rows of the token embedding (and columns of the LM head).
    hidden_size: width of the residual stream.
    num_layers: number of decoder blocks.
    num_heads: query heads.
    num_kv_heads: key/value heads (grouped-query attention); None = num_heads.
    mlp_dim: hidden width of the feed-forward block.
    max_position_embeddings: rows of OPT's learned position table, RoPE's context length,
      and the default decoding context for ALiBi models.
    norm_eps: epsilon of LayerNorm / RMSNorm.
    do_layer_norm_before: OPT only: pre-LN (True) or post-LN (False, e.g. opt-350m).
    word_embed_proj_dim: OPT only: embedding width when it differs from hidden_size
      (project_in / project_out); None = hidden_size.
    use_bias: biases on projections (BLOOM/OPT True, LLaMA False).
    rope_theta: LLaMA only: RoPE base.
    tie_word_embeddings: LM head shares the token embedding.
    dtype: compute dtype ('float32' or 'bfloat16').
    param_dtype: storage dtype of parameters.
    cache_dtype: dtype of the KV cache; None = the compute dtype.
    remat: 'none', 'full' (recompute each block), 'dots' (save the projections' and
      attention's outputs, recompute the rest: norms, activations, attention scores), or a
      policy saving only some named values: 'save_projections', 'save_attention'.
    attention_impl: one of ATTENTION_IMPLS, chosen for the platform at launch
      (`runtime.kernels.attention_options`); the model never reads the backend.
    attention_block_q, attention_block_kv: the 'pallas' kernel's tile: query rows and keys
      per grid step (each clipped to its sequence's length), per TPU generation at launch.
  """
  family: str
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  num_kv_heads: Optional[int] = None
  head_dim: Optional[int] = None
  max_position_embeddings: int = 2048
  norm_eps: float = 1e-5
  do_layer_norm_before: bool = True
  word_embed_proj_dim: Optional[int] = None
  use_bias: bool = True
  rope_theta: float = 10000.0
  tie_word_embeddings: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"
  cache_dtype: Optional[str] = None
  remat: str = "none"
  attention_impl: str = "xla"
  attention_block_q: int = 512
  attention_block_kv: int = 512
  pad_token_id: int = 0
  bos_token_id: int = 1
  eos_token_id: int = 2

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"ModelConfig.family={self.family!r}: expected one of {FAMILIES}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"ModelConfig.remat={self.remat!r}: expected one of {REMAT_POLICIES}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"ModelConfig.attention_impl={self.attention_impl!r}: expected one of "
                       f"{ATTENTION_IMPLS}")
    if self.attention_block_kv % 128 or self.attention_block_q % 8:
      raise ValueError(f"attention blocks ({self.attention_block_q}, {self.attention_block_kv}):"
                       " query rows a multiple of 8, keys a multiple of 128 (the TPU tile)")
    if self.num_heads <= 0 or self.kv_heads <= 0 or self.num_heads % self.kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} must be a positive multiple of num_kv_heads={self.kv_heads}")
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise ValueError(
          f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
          "set head_dim explicitly")
    for name in ("dtype", "param_dtype") + (("cache_dtype",) if self.cache_dtype else ()):
      if getattr(self, name) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: expected float32/bfloat16")

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  @property
  def embed_dim(self) -> int:
    """Width of the token embedding table (OPT's word_embed_proj_dim)."""
    return self.word_embed_proj_dim or self.hidden_size

  @property
  def has_final_norm(self) -> bool:
    # OPT post-LN models (opt-350m) have no decoder-level final LayerNorm.
    return self.family != "opt" or self.do_layer_norm_before

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def kv_cache_dtype(self):
    return jnp.dtype(self.cache_dtype or self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    """Parameter count (embeddings counted once when tied), from shapes alone."""
    d, f, v = self.hidden_size, self.mlp_dim, self.vocab_size
    h, k, hd = self.num_heads, self.kv_heads, self.dim_per_head
    b = 1 if self.use_bias else 0
    attn = d * h * hd + 2 * d * k * hd + h * hd * d + b * (h * hd + 2 * k * hd + d)
    if self.family == "llama":
      mlp = 3 * d * f
      norms = 2 * d
    else:
      mlp = 2 * d * f + b * (f + d)
      norms = 4 * d
    total = self.num_layers * (attn + mlp + norms)
    total += v * self.embed_dim
    if not self.tie_word_embeddings:
      total += v * self.embed_dim
    if self.family == "bloom":
      total += 2 * d  # embedding LayerNorm
    if self.family == "opt":
      total += (self.max_position_embeddings + 2) * d
      if self.embed_dim != d:
        total += 2 * d * self.embed_dim
    if self.has_final_norm:
      total += d if self.family == "llama" else 2 * d
    return total
