"""Model options: rematerialisation keeps gradients and saves what its policy says; bfloat16
compute stays close to float32, runs on CPU under every remat policy, does every weight matmul,
backward included, on bf16 operands, and gives gradients that do not depend on attention's
query blocks."""
import functools
import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from teacherlm_jax.models import attention
from teacherlm_jax.models import matmul
from teacherlm_jax.models import presets
from teacherlm_jax.models import transformer


def _loss_and_grads(config, tokens, compiler_options=None):
  model = transformer.DecoderLM(config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)

  def loss_fn(p):
    logits, _ = nnx.merge(graphdef, p)(tokens[:, :-1])
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

  return jax.jit(jax.value_and_grad(loss_fn), compiler_options=compiler_options)(params)


@pytest.mark.parametrize("remat", ["full", "dots"])
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


_CPUINFO = "processor\t: 0\nvendor_id\t: {vendor}\nmodel name\t: x\nflags\t\t: fpu sse2 avx2 {extra}\n"


def test_onednn_dots_only_on_intel_cpus_with_avx512_and_amx():
  supported = lambda vendor, flags: matmul.onednn_dots_supported(
      _CPUINFO.format(vendor=vendor, extra=flags))
  assert supported("GenuineIntel", "avx512f avx512bw amx_bf16 amx_tile")
  assert not supported("GenuineIntel", "avx512f avx512bw")  # Before Sapphire Rapids.
  assert not supported("GenuineIntel", "avx512fp16 amx_tile")  # Flags match whole words.
  assert not supported("AuthenticAMD", "avx512f amx_tile")
  assert not matmul.onednn_dots_supported("")  # No vendor or flags line: not assumed.
  if not matmul.onednn_dots_supported():
    assert matmul.large_matmul_compiler_options(jnp.float32, "cpu") == {}


def test_large_matmul_options_route_float32_cpu_dots_through_onednn(onednn_dots):
  # The trainer compiles its step with these options; a jaxlib that drops the flags or its
  # oneDNN fusions fails here rather than silently losing the speed-up.
  x, w = jnp.ones((64, 32), jnp.float32), jnp.ones((32, 16), jnp.float32)
  options = matmul.large_matmul_compiler_options(jnp.float32, "cpu")
  compiled = jax.jit(lambda x, w: jnp.tanh(x @ w), compiler_options=options).lower(x, w).compile()
  assert "onednn_fusion" in compiled.as_text()
  np.testing.assert_allclose(compiled(x, w), np.tanh(np.ones((64, 16)) * 32), rtol=1e-6)
  # A dot scaled by a broadcast operand: what oneDNN's DOT fusion type miscomputes (~1e4 off).
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((128, 1000), np.float32), rng.standard_normal((1000, 64), np.float32)
  scaled = {"times a constant": lambda a, b: 0.125 * (a @ b),
            "over a constant": lambda a, b: (a @ b) / np.float32(8.0),
            "times a runtime scalar": lambda a, b: jnp.sum(a[0, :1]) * (a @ b),
            "times a row": lambda a, b: (a @ b) * b[0]}
  for name, fn in scaled.items():
    np.testing.assert_allclose(jax.jit(fn, compiler_options=options)(a, b), fn(a, b),
                               rtol=1e-4, atol=1e-3, err_msg=name)
  assert matmul.large_matmul_compiler_options(jnp.float32, "tpu") == {}
  assert matmul.large_matmul_compiler_options(jnp.bfloat16, "tpu") == {}


def test_bfloat16_step_options_give_onednn_only_the_float32_dots(onednn_dots):
  rng = np.random.default_rng(1)
  x, w = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for shape in ((64, 32), (32, 16)))
  q, k = (jnp.asarray(rng.standard_normal((4, 64, 16)), jnp.float32) for _ in range(2))

  def fn(x, w, q, k):  # A weight matmul on bf16 operands and an attention-like batched one.
    return (jnp.dot(x, w, preferred_element_type=jnp.float32),
            jnp.einsum("bqd,bkd->bqk", q, k))

  options = matmul.large_matmul_compiler_options(jnp.bfloat16, "cpu")
  compiled = jax.jit(fn, compiler_options=options).lower(x, w, q, k).compile()
  fusions = re.findall(r"(onednn_fusion|ynn_fusion)[.\d]* = f32\[([\d,]+)\]", compiled.as_text())
  assert ("onednn_fusion", "4,64,64") in fusions and ("ynn_fusion", "64,16") in fusions
  for got, want in zip(compiled(x, w, q, k), jax.jit(fn)(x, w, q, k)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


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
  # Attention's products take float32 operands on CPU only.
  attention = matmul.batched_operand_dtype(bf16, jax.default_backend())
  assert attention == (jnp.float32 if jax.default_backend() == "cpu" else bf16)
  assert {(lhs, rhs) for lhs, rhs, batched in dots if batched} == {(attention, attention)}


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
  options = matmul.large_matmul_compiler_options(config.dtype, jax.default_backend())
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
