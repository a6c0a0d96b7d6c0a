"""Model presets with the published shapes (sizes checked by tests/test_config.py).

`get(name)` returns a `ModelConfig`; `PRESETS` lists every name. The 'tiny-*' presets are for
tests and the embedded CPU pipeline.
"""
from teacherlm_jax.models.config import ModelConfig

_BLOOM = dict(family="bloom", vocab_size=250880, norm_eps=1e-5, pad_token_id=3, bos_token_id=1,
              eos_token_id=2, tie_word_embeddings=True, use_bias=True)
_OPT = dict(family="opt", vocab_size=50272, max_position_embeddings=2048, norm_eps=1e-5,
            pad_token_id=1, bos_token_id=2, eos_token_id=2, tie_word_embeddings=True, use_bias=True)
_LLAMA = dict(family="llama", vocab_size=32000, norm_eps=1e-5, use_bias=False,
              tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _bloom(d, layers, heads):
  return ModelConfig(hidden_size=d, num_layers=layers, num_heads=heads, mlp_dim=4 * d, **_BLOOM)


def _opt(d, layers, heads, **kw):
  return ModelConfig(hidden_size=d, num_layers=layers, num_heads=heads, mlp_dim=4 * d, **_OPT, **kw)


PRESETS = {
    # BLOOM family: TeacherLM's teacher is bloom-7b1-shaped ("TeacherLM-7.1B").
    "bloom-560m": _bloom(1024, 24, 16),
    "bloom-1b1": _bloom(1536, 24, 16),
    "bloom-1b7": _bloom(2048, 24, 16),
    "bloom-3b": _bloom(2560, 30, 32),
    "bloom-7b1": _bloom(4096, 30, 32),
    "bloom-176b": _bloom(14336, 70, 112),
    # OPT family (students in the paper).
    "opt-125m": _opt(768, 12, 12),
    "opt-350m": _opt(1024, 24, 16, word_embed_proj_dim=512, do_layer_norm_before=False),
    "opt-1.3b": _opt(2048, 24, 32),
    "opt-2.7b": _opt(2560, 32, 32),
    "opt-6.7b": _opt(4096, 32, 32),
    "opt-13b": _opt(5120, 40, 40),
    # LLaMA-style (modern students).
    "llama-7b": ModelConfig(hidden_size=4096, num_layers=32, num_heads=32, mlp_dim=11008,
                            max_position_embeddings=4096, **_LLAMA),
    # Tiny sizes for tests and the CPU pipeline.
    "tiny-bloom": ModelConfig(hidden_size=64, num_layers=2, num_heads=4, mlp_dim=256,
                              **{**_BLOOM, "vocab_size": 1000}),
    "tiny-opt": ModelConfig(hidden_size=64, num_layers=2, num_heads=4, mlp_dim=256,
                            **{**_OPT, "vocab_size": 1000, "max_position_embeddings": 512}),
    "tiny-llama": ModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                              mlp_dim=172, max_position_embeddings=512,
                              **{**_LLAMA, "vocab_size": 1000}),
    # ~50M parameters: the training benchmark's size.
    "small-bloom-50m": ModelConfig(hidden_size=512, num_layers=8, num_heads=8, mlp_dim=2048,
                                   **{**_BLOOM, "vocab_size": 32000}),
}


def get(name: str, **overrides) -> ModelConfig:
  """Returns the preset `name`, with dataclass fields replaced by `overrides`."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
  config = PRESETS[name]
  return config.replace(**overrides) if overrides else config
