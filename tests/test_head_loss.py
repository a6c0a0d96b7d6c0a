"""The chunked LM head + cross entropy against the whole-logits loss it replaces."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from teacherlm_jax.models import head_loss
from teacherlm_jax.models import losses
from teacherlm_jax.runtime import backend
from teacherlm_jax.runtime import partitioning

B, L, D, V = 2, 12, 8, 50


def _inputs(dtype=jnp.float32):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((B, L, D)), dtype)
  table = jnp.asarray(rng.standard_normal((V, D)), dtype)
  targets = jnp.asarray(rng.integers(0, V, (B, L)))
  weights = jnp.asarray((rng.random((B, L)) > 0.3).astype(np.float32))
  return x, table, targets, weights


@pytest.mark.parametrize("vocab_major", [True, False])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_chunked_loss_sums_and_gradients_equal_the_whole_logits(vocab_major, z_loss):
  x, table, targets, weights = _inputs()
  head = table if vocab_major else table.T
  spec = "bld,vd->blv" if vocab_major else "bld,dv->blv"

  def whole(x, head):
    logits = jnp.einsum(spec, x, head, preferred_element_type=jnp.float32)
    return losses.loss_and_metrics(logits, targets, weights, z_loss)

  def chunked(x, head):  # Three positions (6 tokens) a chunk: four chunks.
    return head_loss.head_loss(x, head, targets, weights, vocab_major=vocab_major,
                               z_loss=z_loss, chunk_bytes=3 * B * V * 4, min_chunk_tokens=1)

  (loss, sums), grads = jax.value_and_grad(whole, (0, 1), has_aux=True)(x, head)
  (chunked_loss, chunked_sums), chunked_grads = jax.value_and_grad(chunked, (0, 1),
                                                                   has_aux=True)(x, head)
  forward_loss, forward_sums = jax.jit(chunked)(x, head)  # Not differentiated.
  np.testing.assert_allclose(chunked_loss, loss, rtol=1e-6)
  np.testing.assert_allclose(forward_loss, loss, rtol=1e-6)
  for name in sums:
    np.testing.assert_allclose(chunked_sums[name], sums[name], rtol=1e-5)
    np.testing.assert_allclose(forward_sums[name], sums[name], rtol=1e-5)
  for got, want in zip(chunked_grads, grads):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_bfloat16_operands_give_bfloat16_gradients_near_float32():
  x, table, targets, weights = _inputs(jnp.bfloat16)
  loss = lambda x, head: head_loss.head_loss(x, head, targets, weights, vocab_major=True)[0]
  grads = jax.grad(loss, (0, 1))(x, table)
  assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16]
  exact = jax.grad(loss, (0, 1))(x.astype(jnp.float32), table.astype(jnp.float32))
  for got, want in zip(grads, exact):
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0.05, atol=2e-3)


def test_chunk_length_is_the_longest_divisor_that_fits():
  # BLOOM-42M in the benchmark: vocab 32,000, batch 8, 32 MiB -> 32 positions.
  assert head_loss.chunk_length(8, 256, 32000, 32 * 2 ** 20) == 32
  assert head_loss.chunk_length(2, 12, 50, 5 * 2 * 50 * 4) == 4  # 5 fit; 4 divides 12.
  assert head_loss.chunk_length(8, 7, 250880, 1) == 1  # Never less than one position.


def test_chunk_length_keeps_enough_tokens_for_the_head_matmuls():
  mib32 = 32 * 2 ** 20
  # BLOOM's vocabulary: 32 MiB would hold 4 positions (32 tokens); the floor takes 128.
  assert head_loss.chunk_length(8, 256, 250880, mib32, 1024) == 128
  assert head_loss.chunk_length(8, 256, 250880, mib32, head_loss.MIN_CHUNK_TOKENS) == 128
  assert head_loss.chunk_length(8, 2048, 8192, mib32, 1024) == 128  # The bytes allow more.
  assert head_loss.chunk_length(2, 12, 50, 1, 5) == 3  # The shortest divisor with >= 5 tokens.
  assert head_loss.chunk_length(8, 7, 250880, 1, 10 ** 6) == 7  # At most the whole length.
  # On a mesh both budgets count one device's part: 4 batch shards (data x fsdp) leave 2 of
  # 8 rows a device, so 1024 tokens a device take 512 positions (128 on one device); with
  # tensor=2 too, a device holds 1/8 of the logits, and 32 MiB 8x the positions.
  assert head_loss.chunk_length(8, 1024, 250880, mib32, 1024) == 128
  assert head_loss.chunk_length(8, 1024, 250880, mib32, 0) == 4
  with jax.set_mesh(partitioning.make_mesh(data=2, fsdp=2, tensor=2)):
    assert head_loss.chunk_length(8, 1024, 250880, mib32, 1024) == 512
    assert head_loss.chunk_length(8, 1024, 250880, mib32, 0) == 32


def test_the_train_step_never_holds_the_whole_logits():
  # The point of chunking: the compiled gradient's scratch memory stays below one copy of the
  # [batch, length, vocab] float32 logits, which the whole-logits loss needs several of.
  b, l, d, v = 4, 64, 16, 8192
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((b, l, d)), jnp.float32)
  table = jnp.asarray(rng.standard_normal((v, d)), jnp.float32) * 0.1
  targets = jnp.asarray(rng.integers(0, v, (b, l)))
  weights = jnp.ones((b, l), jnp.float32)
  logits_bytes = b * l * v * 4

  def scratch(loss_fn):
    grad = jax.jit(jax.grad(loss_fn, (0, 1)))
    return grad.lower(x, table).compile().memory_analysis().temp_size_in_bytes

  chunked = scratch(lambda x, t: head_loss.head_loss(
      x, t, targets, weights, vocab_major=True, chunk_bytes=logits_bytes // 16,
      min_chunk_tokens=1)[0])
  whole = scratch(lambda x, t: losses.loss_and_metrics(
      jnp.einsum("bld,vd->blv", x, t), targets, weights)[0])
  assert whole >= logits_bytes
  assert chunked < logits_bytes / 2


def test_gradients_hold_under_the_train_steps_compiler_options(onednn_dots):
  # The train step compiles with the backend's training options (oneDNN dots on this CPU);
  # with oneDNN's DOT fusion type the gradient scaling in this loss's backward was folded into
  # the GEMM and came out wrong (one chunk: d hidden off by 0.17), and the tiny teacher stopped
  # learning.
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((4, 32, 64)), jnp.float32)
  table = jnp.asarray(rng.standard_normal((1000, 64)), jnp.float32) * 0.1
  targets, weights = jnp.asarray(rng.integers(0, 1000, (4, 32))), jnp.ones((4, 32), jnp.float32)
  loss = lambda x, t: head_loss.head_loss(x, t, targets, weights, vocab_major=True)[0]
  options = backend.Backend.current().compiler_options(backend.TRAIN, jnp.float32)
  got = jax.jit(jax.grad(loss, (0, 1)), compiler_options=options or None)(x, table)
  want = jax.jit(jax.grad(loss, (0, 1)))(x, table)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_chunks_are_sized_per_device_on_a_mesh():
  # The logits are split over the mesh's batch (data, fsdp) and vocabulary (tensor) axes, so
  # the chunk budget counts one device's part: 8 devices hold 8x the positions a chunk.
  mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
  with jax.set_mesh(mesh):
    assert partitioning.shard_count(head_loss._LOGITS_AXES) == 8
  assert partitioning.shard_count(head_loss._LOGITS_AXES) == 1  # No mesh set.
  x, table, targets, weights = _inputs()
  loss = lambda x, t: head_loss.head_loss(x, t, targets, weights, vocab_major=True,
                                          chunk_bytes=B * V * 4,  # One position a device.
                                          min_chunk_tokens=1)[0]
  want = jax.value_and_grad(loss, (0, 1))(x, table)
  with jax.set_mesh(mesh):
    got = jax.jit(jax.value_and_grad(loss, (0, 1)))(x, table)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  for g, w in zip(got[1], want[1]):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
