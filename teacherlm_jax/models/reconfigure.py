"""A loaded model under other launch-time ModelConfig fields (attention kernel, its blocks):
a checkpoint saved by a run on one platform, served on another."""
from __future__ import annotations

from flax import nnx

from teacherlm_jax.models.transformer import DecoderLM


def with_config_fields(model: DecoderLM, **fields) -> DecoderLM:
  """`model` (its parameters, not copied) with `fields` of its config replaced."""
  config = model.config.replace(**fields)
  if config == model.config:
    return model
  rebuilt = nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))
  nnx.update(rebuilt, nnx.state(model))
  return rebuilt
