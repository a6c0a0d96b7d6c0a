"""Presets have the published sizes; ModelConfig rejects impossible shapes."""
import jax
import numpy as np
import pytest
from flax import nnx

from teacherlm_jax.models import attention, hf, transformer
from teacherlm_jax.models import presets
from teacherlm_jax.models.config import ModelConfig

# Published parameter counts (HF model cards / papers), within 1%.
PUBLISHED = {
    "bloom-560m": 559e6, "bloom-1b1": 1.065e9, "bloom-3b": 3.003e9, "bloom-7b1": 7.069e9,
    "bloom-176b": 176.2e9, "opt-125m": 125e6, "opt-350m": 331e6, "opt-1.3b": 1.316e9,
    "opt-2.7b": 2.652e9, "opt-6.7b": 6.658e9, "opt-13b": 12.85e9, "llama-7b": 6.738e9,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_count_matches_published_size(name):
  count = presets.get(name).num_params()
  assert abs(count - PUBLISHED[name]) / PUBLISHED[name] < 0.01, (name, count)


@pytest.mark.parametrize("name", ["tiny-bloom", "tiny-opt", "tiny-llama", "opt-350m"])
def test_num_params_counts_the_module_tree(name):
  config = presets.get(name)
  abstract = nnx.eval_shape(lambda: transformer.DecoderLM(config, rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  assert sum(int(np.prod(x.shape)) for x in leaves) == config.num_params()


@pytest.mark.parametrize("name", ["tiny-bloom", "tiny-opt", "tiny-llama"])
def test_every_parameter_has_logical_axes_of_its_rank(name):
  config = presets.get(name)
  abstract = nnx.eval_shape(lambda: transformer.DecoderLM(config, rngs=nnx.Rngs(0)))
  for path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    assert len(variable.logical_axes) == len(variable.shape), path


@pytest.mark.parametrize("name", ["bloom-7b1", "opt-350m", "llama-7b"])
def test_hf_config_round_trip(name):
  config = presets.get(name)
  assert hf.config_from_hf(hf.config_to_hf(config)).replace() == config.replace(
      dtype="float32", param_dtype="float32")


def test_bad_shapes_are_rejected():
  with pytest.raises(ValueError, match="num_heads=6 must be a positive multiple of num_kv_heads=4"):
    ModelConfig(family="llama", vocab_size=10, hidden_size=48, num_layers=1, num_heads=6,
                num_kv_heads=4, mlp_dim=8)
  with pytest.raises(ValueError, match="family='gpt'"):
    ModelConfig(family="gpt", vocab_size=10, hidden_size=8, num_layers=1, num_heads=2, mlp_dim=8)
  with pytest.raises(ValueError, match="unknown model preset 'bloom-9b'"):
    presets.get("bloom-9b")


def test_alibi_slopes_for_non_power_of_two_heads_match_transformers():
  import torch
  from transformers.models.bloom.modeling_bloom import build_alibi_tensor
  for heads in (4, 6, 12, 112):
    mask = torch.ones(1, 3)
    alibi = build_alibi_tensor(mask, heads, torch.float32).reshape(heads, 3)
    np.testing.assert_allclose(attention.alibi_slopes(heads), alibi[:, 1].numpy(), rtol=1e-6)
