"""The padded lengths decoding and evaluation compile for."""
from teacherlm_jax.runtime import shapes


def test_bucket_length_is_the_next_power_of_two_at_least_the_minimum():
  assert [shapes.bucket_length(n) for n in (0, 1, 8, 9, 100, 600)] == [8, 8, 8, 16, 128, 1024]
  assert [shapes.bucket_length(n, minimum=1) for n in (1, 3, 5)] == [1, 4, 8]


def test_bucket_length_past_the_step_is_the_next_multiple_of_the_step():
  assert [shapes.bucket_length(n, step=256) for n in (3, 200, 256, 257, 600)] == [
      8, 256, 256, 512, 768]
  assert shapes.bucket_length(3, minimum=4, step=256) == 4
