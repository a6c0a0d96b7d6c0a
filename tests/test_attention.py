"""The blocked causal attention of a cache-free forward equals attention to the whole sequence
(`attention.attend`, differentiated by autodiff through its softmax): outputs and gradients,
with packed texts, padding rows, grouped queries and ALiBi."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from teacherlm_jax.models import attention
from teacherlm_jax.models import transformer


def _inputs(kv_heads, groups, dtype, seed=0):
  rng = np.random.default_rng(seed)
  b, l, hd = 3, 24, 8
  q = rng.normal(size=(b, kv_heads, groups, l, hd))
  k, v = (rng.normal(size=(b, kv_heads, l, hd)) for _ in range(2))
  # Row 0 one text; row 1 left padding (queries that see no key); row 2 three packed texts
  # whose boundaries fall inside the query blocks, then right padding.
  segment_ids = np.ones((b, l), np.int32)
  segment_ids[1, :7] = 0
  segment_ids[2, 5:13], segment_ids[2, 13:21], segment_ids[2, 21:] = 2, 3, 0
  segment_ids = jnp.asarray(segment_ids)
  cast = lambda x: jnp.asarray(x, dtype)
  return (cast(q), cast(k), cast(v), segment_ids,
          transformer.positions_from_segments(segment_ids),
          jnp.asarray(rng.normal(size=(b, kv_heads, groups, l, hd)), jnp.float32))


@pytest.mark.parametrize("kv_heads,groups,alibi", [(2, 1, True), (2, 1, False), (1, 3, False)])
def test_causal_attention_and_its_gradient_equal_attention_to_the_whole_sequence(
    kv_heads, groups, alibi, monkeypatch):
  monkeypatch.setattr(attention, "MIN_QUERY_BLOCK_ROWS", 6)
  assert attention.causal_query_blocks(24) == 4
  q, k, v, segment_ids, positions, d_out = _inputs(kv_heads, groups, jnp.float32)

  def causal(q, k, v):
    return attention.causal_attention(q, k, v, segment_ids, positions, alibi,
                                      jnp.dtype(jnp.float32))

  def whole(q, k, v):
    return attention.attend(q, k, v, segment_ids, positions, segment_ids, positions, alibi)

  ours, our_vjp = jax.vjp(causal, q, k, v)
  theirs, their_vjp = jax.vjp(whole, q, k, v)
  # A padding query sees no key; its output (the mean of some values) is never used, and
  # nothing downstream sends it a gradient.
  text = np.asarray(segment_ids != 0)[:, None, None, :, None]
  np.testing.assert_allclose(np.where(text, ours, 0), np.where(text, theirs, 0), rtol=1e-5,
                             atol=1e-6)
  d_out = jnp.where(text, d_out, 0)
  for name, got, want in zip("qkv", our_vjp(d_out), their_vjp(d_out)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"d{name}")


def test_bfloat16_operands_give_bfloat16_outputs_and_gradients_close_to_float32():
  q, k, v, segment_ids, positions, d_out = _inputs(2, 2, jnp.float32, seed=1)
  d_out = jnp.where((segment_ids != 0)[:, None, None, :, None], d_out, 0)
  results = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    inputs = [x.astype(dtype) for x in (q, k, v)]
    output, vjp = jax.vjp(
        lambda q, k, v: attention.causal_attention(q, k, v, segment_ids, positions, True,
                                                   jnp.dtype(dtype)), *inputs)
    results[dtype] = (output, *vjp(d_out.astype(dtype)))
  for got, want in zip(results[jnp.bfloat16], results[jnp.float32]):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want,
                               atol=0.03 * float(jnp.abs(want).max()))
