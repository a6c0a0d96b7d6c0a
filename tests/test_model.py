"""Model options: rematerialisation keeps gradients and saves what its policy says; bfloat16
compute stays close to float32, runs on CPU under every remat policy, does every weight matmul,
backward included, on bf16 operands, and gives gradients that do not depend on attention's
query blocks."""
import functools
import re
import time

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from teacherlm_jax.models import attention
from teacherlm_jax.models import config as config_lib
from teacherlm_jax.models import matmul
from teacherlm_jax.models import presets
from teacherlm_jax.models import transformer
from teacherlm_jax.runtime import backend


def _loss_and_grads(config, tokens, compiler_options=None):
  model = transformer.DecoderLM(config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)

  def loss_fn(p):
    logits, _ = nnx.merge(graphdef, p)(tokens[:, :-1])
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

  return jax.jit(jax.value_and_grad(loss_fn), compiler_options=compiler_options)(params)


@pytest.mark.parametrize("remat", ["full", "dots", "save_projections", "save_attention"])
def test_remat_gives_the_same_gradients(remat):
  config = presets.get("tiny-llama")
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 12)))
  loss, grads = _loss_and_grads(config, tokens)
  loss_remat, grads_remat = _loss_and_grads(config.replace(remat=remat), tokens)
  np.testing.assert_allclose(loss_remat, loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads_remat), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("name", ["tiny-bloom", "tiny-opt", "tiny-llama"])
def test_bfloat16_compute_tracks_float32(name):
  config = presets.get(name)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, (2, 10)))
  model = transformer.DecoderLM(config, rngs=nnx.Rngs(0))
  logits32, _ = model(tokens)
  model16 = transformer.DecoderLM(config.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
  logits16, _ = model16(tokens)
  assert logits16.dtype == jnp.float32
  # bf16 has 8 mantissa bits: logits agree to ~1e-2 of their scale, and the argmax mostly.
  scale = float(jnp.abs(logits32).max())
  assert float(jnp.abs(logits16 - logits32).max()) < 0.05 * scale


@pytest.mark.parametrize("name", ["tiny-bloom", "tiny-opt", "tiny-llama"])
def test_bfloat16_gradients_do_not_depend_on_query_blocks(name, monkeypatch):
  """A bf16 model's gradients come out the same whether attention runs its queries in one
  block or in eight: the blocks' key and value gradients are summed in the products' float32
  (on CPU), and rounded to bf16 once. (Cast per block, each block's share was rounded first:
  10-17% of the gradient elements then moved, by up to 2.5e-3 of the largest.)"""
  config = presets.get(name).replace(dtype="bfloat16")
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 33)))
  grads = []
  for min_rows, blocks in [(4, 8), (10 ** 6, 1)]:
    monkeypatch.setattr(attention, "MIN_QUERY_BLOCK_ROWS", min_rows)
    assert attention.causal_query_blocks(32) == blocks
    _, block_grads = _loss_and_grads(config, tokens)
    grads.append(np.concatenate([np.ravel(g) for g in jax.tree.leaves(block_grads)]))
  blocked, single = grads
  assert np.mean(blocked != single) < 0.01  # Float32 rounding flips ~1e-4 of them.
  np.testing.assert_allclose(blocked, single, atol=2e-3 * np.abs(single).max())


def _dot_operand_dtypes(jaxpr):
  """[(lhs dtype, rhs dtype, has batch dims)] of every dot_general, sub-jaxprs included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (_, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
      found.append((eqn.invars[0].aval.dtype, eqn.invars[1].aval.dtype, bool(lhs_batch)))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found += _dot_operand_dtypes(sub)
  return found


def _train_jaxpr(config, tokens):
  model = transformer.DecoderLM(config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)

  def loss_fn(p):
    logits, _ = nnx.merge(graphdef, p)(tokens[:, :-1])
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

  return jax.make_jaxpr(jax.grad(loss_fn))(params).jaxpr


@pytest.mark.parametrize("spec,a_shape,b_shape", [
    ("abc,cd->abd", (2, 3, 5), (5, 7)),  # Dense.
    ("blkgd,bksd->bkgls", (2, 3, 2, 2, 4), (2, 2, 6, 4)),  # Attention scores.
    ("bkgls,bksd->blkgd", (2, 2, 2, 3, 6), (2, 2, 6, 4)),  # Attention mixing.
])
def test_matmul_einsum_gradient_is_autodiffs_in_float32(spec, a_shape, b_shape):
  rng = np.random.default_rng(0)
  a, b = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in (a_shape, b_shape))
  out_weights = jnp.asarray(rng.normal(size=jnp.einsum(spec, a, b).shape), jnp.float32)
  ours = jax.grad(lambda a, b: jnp.sum(matmul.einsum(spec, a, b) * out_weights), (0, 1))(a, b)
  autodiff = jax.grad(lambda a, b: jnp.sum(jnp.einsum(spec, a, b) * out_weights), (0, 1))(a, b)
  for got, want in zip(ours, autodiff):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="at least two"):
    matmul.einsum("ab,bc->c", a[0], b)  # 'a' is summed inside one operand: not a matmul.


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("spec,a_shape,b_shape", [
    ("bld,blf->df", (2, 3, 4), (2, 3, 5)), ("bld,blf->fd", (2, 3, 4), (2, 3, 5)),
    ("blf,df->bld", (2, 3, 5), (4, 5)), ("abcd,cde->abe", (2, 3, 4, 5), (4, 5, 6)),
    ("lbd,blf->df", (3, 2, 4), (2, 3, 5)), ("blkgd,bksd->bkgls", (2, 3, 2, 1, 4), (2, 2, 5, 4))])
def test_matmul_product_is_the_float32_einsum(spec, a_shape, b_shape, dtype):
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal(a_shape), dtype)
  b = jnp.asarray(rng.standard_normal(b_shape), dtype)
  got = matmul.product(spec, a, b)
  assert got.dtype == jnp.float32
  want = np.einsum(spec, np.asarray(a, np.float32), np.asarray(b, np.float32))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_float32_weight_gradient_copies_no_activation():
  # The weight gradient contracts the token axes; as a 2-D dot the GEMM reads the activation
  # transposed in place, where einsum made XLA copy it transposed first (a quarter of the
  # profiled float32 train step on CPU).
  x, w = jnp.ones((4, 64, 32), jnp.float32), jnp.ones((32, 48), jnp.float32)
  loss = lambda x, w: jnp.sum(jnp.tanh(matmul.einsum("bld,df->blf", x, w)))
  hlo = jax.jit(jax.grad(loss, (0, 1))).lower(x, w).compile().as_text()
  moves = re.findall(r"= \S+ (transpose|copy)\(", hlo)
  assert not moves, moves
  einsum_hlo = jax.jit(lambda x, g: jnp.einsum("bld,blf->df", x, g)).lower(
      x, jnp.ones((4, 64, 48))).compile().as_text()
  assert re.findall(r"= \S+ (transpose|copy)\(", einsum_hlo)  # What product() avoids.


@pytest.mark.parametrize("name", ["tiny-bloom", "tiny-llama"])
def test_bfloat16_training_runs_every_weight_matmul_on_bfloat16_operands(name):
  # Plain autodiff of a float32-accumulating dot promotes the bf16 operand in the backward
  # pass: the backward matmuls would run in float32 (2-3x slower on CPU and TPU alike).
  config = presets.get(name, dtype="bfloat16")
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, config.vocab_size, (2, 9)))
  dots = _dot_operand_dtypes(_train_jaxpr(config, tokens))
  # Forward and both backward products of the scanned block's 6 or more matmuls + LM head.
  assert len(dots) >= 3 * (6 + 1)
  bf16 = jnp.dtype(jnp.bfloat16)
  assert {(lhs, rhs) for lhs, rhs, batched in dots if not batched} == {(bf16, bf16)}
  # Attention's products too: the config fixes the numerics, on every platform.
  assert {(lhs, rhs) for lhs, rhs, batched in dots if batched} == {(bf16, bf16)}


def _flat(grads) -> np.ndarray:
  return np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)]).astype(np.float32)


def _gradient_tokens(config):
  return jnp.asarray(np.random.default_rng(4).integers(0, config.vocab_size, (2, 17)))


@functools.lru_cache(maxsize=None)
def _float32_gradients(name):
  config = presets.get(name)
  _, grads = _loss_and_grads(config, _gradient_tokens(config))  # Same for every remat policy.
  return _flat(grads)


@pytest.mark.parametrize("remat", ["none", "dots", "full"])
@pytest.mark.parametrize("name", ["tiny-bloom", "tiny-opt", "tiny-llama"])
def test_bfloat16_gradients_run_and_track_float32(name, remat):
  # Runs, not just traces, and under the train step's compiler options: XLA:CPU rejected
  # some bf16 batched dots at run time.
  config = presets.get(name, remat=remat, dtype="bfloat16")
  options = backend.Backend.current().compiler_options(backend.TRAIN, config.dtype)
  _, grads16 = _loss_and_grads(config, _gradient_tokens(config), options or None)
  flat32 = _float32_gradients(name)
  flat16 = _flat(grads16)
  assert np.all(np.isfinite(flat16))
  cosine = flat16 @ flat32 / (np.linalg.norm(flat16) * np.linalg.norm(flat32))
  assert cosine > 0.99


def test_dots_remat_recomputes_no_weight_matmul():
  config = presets.get("tiny-bloom")
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, config.vocab_size, (2, 9)))
  count = {}
  for remat in ("none", "dots", "full"):
    dots = _dot_operand_dtypes(_train_jaxpr(config.replace(remat=remat), tokens))
    count[remat] = (sum(not batched for *_, batched in dots), sum(batched for *_, batched in dots))
  # 'dots' saves the projections' outputs and attention's output and row statistics, so it
  # reruns no product (attention's backward recomputes its scores under every policy); 'full'
  # recomputes the whole block.
  assert count["dots"][0] == count["none"][0] < count["full"][0]
  assert count["none"][1] == count["dots"][1] < count["full"][1]


def test_every_remat_name_has_a_policy():
  assert set(transformer.REMAT_POLICIES) == set(config_lib.REMAT_POLICIES)


def test_layers_are_stored_stacked_with_a_layers_axis():
  config = presets.get("tiny-opt", num_layers=3)
  abstract = nnx.eval_shape(lambda: transformer.DecoderLM(config, rngs=nnx.Rngs(0)))
  for path, variable in nnx.to_flat_state(nnx.state(abstract.layers, nnx.Param)):
    assert variable.shape[0] == 3 and variable.logical_axes[0] == "layers", path
  cache = jax.eval_shape(lambda: transformer.init_cache(config, 2, 8))
  assert cache["layers"]["key"].shape[0] == 3  # The KV cache is stacked the same way.
  # Each layer is initialised from its own key.
  kernels = transformer.DecoderLM(config, rngs=nnx.Rngs(0)).layers.mlp.up.kernel[...]
  assert not np.allclose(kernels[0], kernels[1])


def _train_compile_seconds(config) -> float:
  """Seconds to lower and compile the gradient of a forward over 2 x 16 tokens."""
  abstract = nnx.eval_shape(lambda: transformer.DecoderLM(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  tokens = jnp.zeros((2, 16), jnp.int32)

  def loss_fn(params):
    logits, _ = nnx.merge(graphdef, params)(tokens)
    return jnp.mean(logits)

  start = time.perf_counter()
  jax.jit(jax.grad(loss_fn)).lower(nnx.to_pure_dict(state)).compile()
  return time.perf_counter() - start


def test_compile_time_stays_flat_in_depth():
  # The blocks are one scanned body: 70 layers compile the same program as 2.
  config = presets.get("tiny-bloom", remat="dots")
  _train_compile_seconds(config.replace(num_layers=3))  # Warms up JAX and XLA.
  shallow = _train_compile_seconds(config.replace(num_layers=2))
  deep = _train_compile_seconds(config.replace(num_layers=70))
  print(f"lower+compile: 2 layers {shallow:.2f} s, 70 layers {deep:.2f} s")
  assert deep < 3 * shallow, (shallow, deep)
