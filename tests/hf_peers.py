"""Random HF `transformers` models (the PyTorch peers our tests compare against)."""
import pathlib

import numpy as np

FAMILY_CONFIGS = {
    # Odd shapes on purpose: 6 heads (ALiBi for a non-power-of-two head count), vocab 101.
    "bloom": dict(vocab_size=101, hidden_size=48, n_layer=2, n_head=6),
    "opt": dict(vocab_size=101, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                ffn_dim=72, max_position_embeddings=64, pad_token_id=1, bos_token_id=2,
                eos_token_id=2),
    # OPT-350m-like: post-LN, word_embed_proj_dim != hidden_size, no final LayerNorm.
    "opt_post_ln": dict(vocab_size=103, hidden_size=48, num_hidden_layers=2,
                        num_attention_heads=6, ffn_dim=96, max_position_embeddings=64,
                        do_layer_norm_before=False, word_embed_proj_dim=32, pad_token_id=1,
                        bos_token_id=2, eos_token_id=2),
    "llama": dict(vocab_size=101, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, intermediate_size=80, max_position_embeddings=64,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, pad_token_id=0),
}


def make_hf_model(family: str, directory: pathlib.Path, seed: int = 0, **overrides):
  """Builds a randomly initialised HF causal LM, perturbs every parameter (so biases and norm
  scales are not their trivial init), saves it to `directory`, and returns the torch model."""
  import torch
  import transformers

  kind = family.split("_")[0]
  config_cls, model_cls = {
      "bloom": (transformers.BloomConfig, transformers.BloomForCausalLM),
      "opt": (transformers.OPTConfig, transformers.OPTForCausalLM),
      "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
  }[kind]
  torch.manual_seed(seed)
  config = config_cls(**{**FAMILY_CONFIGS[family], **overrides})
  config._attn_implementation = "eager"
  model = model_cls(config).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith("embed_positions.weight") or "embeddings" in name or "embed_tokens" in name:
        param.normal_(0.0, 0.5)
      elif param.ndim == 1:
        param.add_(torch.randn_like(param) * 0.1)
      else:
        param.normal_(0.0, 0.1)
  model.save_pretrained(str(directory))
  return model


def left_padded_batch(vocab_size: int, lengths, pad_id: int, seed: int = 0):
  """(tokens BxL, attention_mask BxL) with rows of `lengths` real tokens, left-padded."""
  rng = np.random.default_rng(seed)
  width = max(lengths)
  tokens = np.full((len(lengths), width), pad_id, np.int64)
  mask = np.zeros((len(lengths), width), np.int64)
  for row, n in enumerate(lengths):
    tokens[row, width - n:] = rng.integers(3, vocab_size, size=n)
    mask[row, width - n:] = 1
  return tokens, mask


def hf_logits(model, tokens, mask):
  """Float32 logits of the torch model with explicit positions for left padding."""
  import torch
  position_ids = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
  kwargs = dict(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask))
  if model.config.model_type == "llama":
    kwargs["position_ids"] = torch.tensor(position_ids)
  with torch.no_grad():
    return model(**kwargs).logits.float().numpy()
