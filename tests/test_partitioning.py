"""Sharded abstract init, activation constraints from the mesh JAX provides, batch placement
and mesh errors on 8 simulated CPU devices."""
import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from teacherlm_jax.models import presets
from teacherlm_jax.models import transformer
from teacherlm_jax.runtime import backend
from teacherlm_jax.runtime import partitioning
from teacherlm_jax.runtime import program


def _model_fn():
  return transformer.DecoderLM(presets.get("tiny-llama"), rngs=nnx.Rngs(0))


def test_sharded_init_creates_params_in_their_shards_with_the_same_values():
  runtime = program.Program(partitioning.make_mesh(data=1, fsdp=4, tensor=2))
  _, shapes = runtime.split(nnx.eval_shape(_model_fn))
  shardings = jax.tree.map(lambda x: x.sharding, shapes)
  params = runtime.jit(lambda: nnx.to_pure_dict(nnx.split(_model_fn())[1]),
                       program=backend.INIT, out_shardings=shardings)()
  # ('layers', 'embed', 'mlp') -> (None, 'fsdp', 'tensor'): every device holds every layer.
  up = params["layers"]["mlp"]["up"]["kernel"]
  assert up.sharding.spec == P(None, "fsdp", "tensor")
  assert {s.data.shape for s in up.addressable_shards} == {(2, 64 // 4, 172 // 2)}
  assert params["token_embedding"].sharding.spec == P("tensor", "fsdp")
  assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == jax.tree.map(
      lambda x: (x.shape, x.dtype), shapes)
  # Same values as an ordinary unsharded init with the same seed (up to the last ulp: XLA
  # evaluates the normal sampling's erf_inv with different fusions).
  reference = nnx.to_pure_dict(nnx.state(_model_fn(), nnx.Param))
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-9)


def test_constrain_reads_the_mesh_jax_provides():
  mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
  constrained = lambda x: partitioning.constrain(x, ("activation_batch", "activation_mlp"))
  x = np.ones((8, 4), np.float32)
  assert jax.jit(constrained)(x).sharding.num_devices == 1  # No mesh: the identity.
  with jax.set_mesh(mesh):
    assert jax.jit(constrained)(x).sharding.spec == P(("data", "fsdp"), "tensor")
    assert partitioning.shard_count(("activation_batch", "activation_mlp")) == 8
  assert partitioning.shard_count(("activation_batch",)) == 1


def test_shard_batch_places_rows_on_the_batch_axes():
  mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
  assert partitioning.process_batch_rows(mesh, 8) == (0, 8)  # One process holds every row.
  tokens = np.arange(8 * 5, dtype=np.int32).reshape(8, 5)
  batch = partitioning.shard_batch({"tokens": tokens}, mesh, 8)
  assert batch["tokens"].sharding.spec == P(("data", "fsdp"), None)
  np.testing.assert_array_equal(np.asarray(batch["tokens"]), tokens)
  assert {s.data.shape for s in batch["tokens"].addressable_shards} == {(2, 5)}


def test_batch_that_does_not_divide_the_data_axes_is_refused():
  mesh = partitioning.make_mesh(data=4, fsdp=2, tensor=1)
  partitioning.check_batch_divides(16, mesh)
  with pytest.raises(ValueError, match=r"batch_size=12 .*data=4\*fsdp=2 = 8 shards.*multiple of 8"):
    partitioning.check_batch_divides(12, mesh)


def test_mesh_that_does_not_divide_the_devices_is_refused():
  with pytest.raises(ValueError, match="cannot fill 8 devices"):
    partitioning.make_mesh(data=3, fsdp=-1)
  with pytest.raises(ValueError, match="data\\*fsdp\\*tensor equal the device count"):
    partitioning.make_mesh(data=2, fsdp=2, tensor=1)
