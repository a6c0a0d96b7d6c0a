"""The models the side-by-side benchmarks run: one `transformers` config per family.

Full size is the 30-100M-parameter class the training target names (d=512, 8 layers, 8 heads,
vocab 32,000: BLOOM 42M, OPT 43M, LLaMA-style 58M with its untied head); `quick` is a smoke
size. Ours imports the same config (`hf.config_from_hf`), so both sides run one architecture.
"""
from __future__ import annotations

# (hidden, layers, heads, vocab) of the benchmark model, of --quick runs, and of the ~1B model
# the accelerator rows run (`--device --training_size=1b`: BLOOM 1.3B, LLaMA-style 1.4B).
SIZES = {"full": (512, 8, 8, 32000), "quick": (256, 4, 4, 8192), "1b": (2048, 24, 16, 32000)}
FAMILIES = ("bloom", "opt", "llama")


def hf_config(family: str, size: str = "full"):
  """The `transformers` config of the benchmark's `family` model (dropout off: ours has none)."""
  import transformers
  hidden, layers, heads, vocab = SIZES[size]
  if family == "bloom":
    return transformers.BloomConfig(hidden_size=hidden, n_layer=layers, n_head=heads,
                                    vocab_size=vocab, pad_token_id=3, eos_token_id=2)
  if family == "opt":
    return transformers.OPTConfig(hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=heads, ffn_dim=4 * hidden,
                                  vocab_size=vocab, word_embed_proj_dim=hidden,
                                  max_position_embeddings=2048, dropout=0.0,
                                  attention_dropout=0.0, pad_token_id=1)
  if family == "llama":
    # LLaMA's MLP width rule (2/3 of 4d, rounded up to a multiple of 64): 1408 at d=512.
    return transformers.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers,
                                    num_attention_heads=heads, num_key_value_heads=heads,
                                    intermediate_size=-(-8 * hidden // 3 // 64) * 64,
                                    vocab_size=vocab, max_position_embeddings=2048,
                                    tie_word_embeddings=False)
  raise ValueError(f"benchmark family {family!r}: expected one of {FAMILIES}")
