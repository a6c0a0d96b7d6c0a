"""Model options: rematerialisation keeps gradients; bfloat16 compute stays close to float32."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import models
from teacherlm_jax.models import transformer


def _loss_and_grads(config, tokens):
  model = transformer.DecoderLM(config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)

  def loss_fn(p):
    logits, _ = nnx.merge(graphdef, p)(tokens[:, :-1])
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

  return jax.jit(jax.value_and_grad(loss_fn))(params)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_the_same_gradients(remat):
  config = models.get("tiny-llama")
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 12)))
  loss, grads = _loss_and_grads(config, tokens)
  loss_remat, grads_remat = _loss_and_grads(config.replace(remat=remat), tokens)
  np.testing.assert_allclose(loss_remat, loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads_remat), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("name", ["tiny-bloom", "tiny-opt", "tiny-llama"])
def test_bfloat16_compute_tracks_float32(name):
  config = models.get(name)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, (2, 10)))
  model = transformer.DecoderLM(config, rngs=nnx.Rngs(0))
  logits32, _ = model(tokens)
  model16 = transformer.DecoderLM(config.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
  logits16, _ = model16(tokens)
  assert logits16.dtype == jnp.float32
  # bf16 has 8 mantissa bits: logits agree to ~1e-2 of their scale, and the argmax mostly.
  scale = float(jnp.abs(logits32).max())
  assert float(jnp.abs(logits16 - logits32).max()) < 0.05 * scale
