"""The 'pallas' attention kernel (TPU flash attention, run here in interpret mode) equals the
'xla' reference: outputs and q/k/v gradients for BLOOM (ALiBi, 5 heads), LLaMA (6 query heads
on 2 key/value heads) and OPT, on packed and left-padded batches and against a partly filled
cache; and the same kernels compile for TPU with the real compiler (Mosaic)."""
import functools
import os
import re

# Several engineers' test runs may load libtpu at once; it only compiles here, never runs.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from teacherlm_jax.models import attention_impl
from teacherlm_jax.models import transformer
from teacherlm_jax.models.config import ModelConfig
from teacherlm_jax.models.kernels import flash_attention
from teacherlm_jax.models.kernels import splash_attention

LENGTH = 256
HEAD_DIM = 32
# (family, query heads, key/value heads).
FAMILIES = {"bloom": ("bloom", 5, 5), "llama": ("llama", 6, 2), "opt": ("opt", 4, 4)}


def _config(name: str, impl: str, **changes) -> ModelConfig:
  family, heads, kv_heads = FAMILIES[name]
  fields = dict(family=family, vocab_size=64, hidden_size=heads * HEAD_DIM, num_layers=1,
                num_heads=heads, num_kv_heads=kv_heads, mlp_dim=64, use_bias=family != "llama",
                attention_impl=impl, attention_block_q=128, attention_block_kv=128)
  return ModelConfig(**{**fields, **changes})


@pytest.fixture(autouse=True)
def _interpret(monkeypatch, request):
  """The kernels on CPU: Pallas's interpreter runs the same kernel bodies on XLA:CPU. Returns
  the names of the kernels called, in order."""
  called = []
  if "compile_for_tpu" in request.node.name:
    return called
  for module, name in ((flash_attention, "flash_attention"),
                       (splash_attention, "splash_attention")):

    def interpreted(*args, _kernel=getattr(module, name), _name=name, **kwargs):
      called.append(_name)
      return _kernel(*args, interpret=True, **kwargs)

    monkeypatch.setattr(module, name, interpreted)
  return called


def _segment_ids() -> jax.Array:
  """Row 0 packs three texts whose boundaries fall inside the 128-row blocks, then padding;
  row 1 is left-padded past a whole block and a half."""
  segment_ids = np.ones((2, LENGTH), np.int32)
  segment_ids[0, 30:131], segment_ids[0, 131:250], segment_ids[0, 250:] = 2, 3, 0
  segment_ids[1, :190] = 0
  return jnp.asarray(segment_ids)


def _qkv(config: ModelConfig, rows: int, keys: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  kv_heads, groups = config.kv_heads, config.num_heads // config.kv_heads
  q = rng.normal(size=(2, kv_heads, groups, rows, HEAD_DIM))
  k, v = (rng.normal(size=(2, kv_heads, keys, HEAD_DIM)) for _ in range(2))
  return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_cache_free_pallas_matches_xla_outputs_and_gradients(name, _interpret):
  """BLOOM on our kernel, OPT and LLaMA on upstream's splash attention."""
  segment_ids = _segment_ids()
  positions = transformer.positions_from_segments(segment_ids)
  q, k, v = _qkv(_config(name, "xla"), LENGTH, LENGTH)
  results = {}
  for impl in ("xla", "pallas"):
    config = _config(name, impl)
    out, vjp = jax.vjp(lambda q, k, v: attention_impl.cache_free(config, q, k, v, segment_ids,
                                                                 positions), q, k, v)
    # Pad queries: their outputs are never used and get no gradient (their keys differ: none
    # in ours and xla's rule, the earlier pads in splash's).
    text = np.asarray(segment_ids != 0)[:, None, None, :, None]
    cotangent = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
    results[impl] = (np.where(text, out, 0.0), *vjp(jnp.where(text, cotangent, 0.0)))
    if impl == "pallas":  # Nothing non-finite from pad rows, even with a cotangent on them.
      assert all(np.isfinite(x).all() for x in (out, *vjp(cotangent)))
  assert _interpret == ["flash_attention" if name == "bloom" else "splash_attention"]
  for what, got, want in zip(("output", "dq", "dk", "dv"), results["pallas"], results["xla"]):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5, err_msg=what)


@pytest.mark.parametrize("name", ["bloom", "llama"])
def test_pallas_runs_per_shard_on_a_sharded_mesh(name, _interpret):
  """Under a (data 2, fsdp 2, tensor 2) mesh the kernel (ours for BLOOM, splash for LLaMA) runs
  in a shard_map (rows over data x fsdp; LLaMA's 2 key/value heads over tensor, BLOOM's 5 heads
  whole with each shard's ALiBi slopes): outputs and gradients equal the unsharded xla path's."""
  from teacherlm_jax.runtime import partitioning
  segment_ids = jnp.concatenate([_segment_ids()] * 2)
  positions = transformer.positions_from_segments(segment_ids)
  q, k, v = (jnp.concatenate([x, x[::-1]]) for x in _qkv(_config(name, "xla"), LENGTH, LENGTH))
  text = np.asarray(segment_ids != 0)[:, None, None, :, None]

  def loss(config, q, k, v):
    out = attention_impl.cache_free(config, q, k, v, segment_ids, positions)
    return jnp.sum(jnp.where(text, out * jnp.cos(out), 0.0))

  want = jax.value_and_grad(functools.partial(loss, _config(name, "xla")), (0, 1, 2))(q, k, v)
  mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
  step = jax.jit(jax.value_and_grad(functools.partial(loss, _config(name, "pallas")),
                                    (0, 1, 2)))
  with jax.set_mesh(mesh):
    got = step(q, k, v)
    assert "sdy.manual_computation" in step.lower(q, k, v).as_text()  # The shard_map.
  assert set(_interpret) == {"flash_attention" if name == "bloom" else "splash_attention"}
  np.testing.assert_allclose(got[0], want[0], rtol=1e-4)
  for what, a, b in zip(("dq", "dk", "dv"), got[1], want[1]):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5, err_msg=what)


@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_cached_pallas_matches_xla_on_a_partly_filled_cache(name, rows):
  """Decoding (one new row) and a prefill chunk (8 rows) against a 256-slot cache: row 0 holds a
  left-padded prompt in its first 100 slots, row 1 two packed texts in 200; the other slots
  hold stale values, marked as padding."""
  slots = 256
  held = np.array([100, 200])
  key_segment_ids = np.zeros((2, slots), np.int32)
  key_segment_ids[0, 12:held[0] + rows] = 1
  key_segment_ids[1, :80], key_segment_ids[1, 80:held[1] + rows] = 1, 2
  key_segment_ids = jnp.asarray(key_segment_ids)
  key_positions = transformer.positions_from_segments(key_segment_ids)
  index = np.arange(rows)[None, :] + held[:, None]
  segment_ids = jnp.take_along_axis(key_segment_ids, index, axis=1)
  positions = jnp.take_along_axis(key_positions, index, axis=1)
  q, k, v = _qkv(_config(name, "xla"), rows, slots, seed=1)
  outputs = {impl: attention_impl.cached(_config(name, impl), q, k, v, segment_ids, positions,
                                         key_segment_ids, key_positions)
             for impl in ("xla", "pallas")}
  np.testing.assert_allclose(outputs["pallas"], outputs["xla"], rtol=1e-5, atol=1e-5)


def test_pallas_pads_lengths_that_are_not_whole_tiles(_interpret):
  """A 78-token forward (splash) and a 200-slot cache (ours; the slot engine sizes caches as
  prompt bucket + new tokens) are padded to the kernels' 128-key tiles with invisible keys."""
  segment_ids = _segment_ids()[:, 178:]
  positions = transformer.positions_from_segments(segment_ids)
  q, k, v = _qkv(_config("llama", "xla"), 78, 78)
  outputs = {impl: attention_impl.cache_free(_config("llama", impl), q, k, v, segment_ids,
                                             positions) for impl in ("xla", "pallas")}
  text = np.asarray(segment_ids != 0)[:, None, None, :, None]
  np.testing.assert_allclose(np.where(text, outputs["pallas"], 0),
                             np.where(text, outputs["xla"], 0), rtol=1e-5, atol=1e-5)
  key_segment_ids = jnp.asarray(np.repeat([[1] * 150 + [0] * 50], 2, axis=0))
  key_positions = transformer.positions_from_segments(key_segment_ids)
  q, k, v = _qkv(_config("bloom", "xla"), 1, 200)
  rows = jnp.ones((2, 1), jnp.int32)
  outputs = {impl: attention_impl.cached(_config("bloom", impl), q, k, v, rows, 149 * rows,
                                         key_segment_ids, key_positions)
             for impl in ("xla", "pallas")}
  np.testing.assert_allclose(outputs["pallas"], outputs["xla"], rtol=1e-5, atol=1e-5)
  assert _interpret == ["splash_attention", "flash_attention"]


@pytest.mark.parametrize("name", ["bloom", "llama"])
def test_model_with_pallas_attention_matches_xla_forward_and_decode_step(name):
  """The whole decoder dispatches on attention_impl: logits of a packed forward (LLaMA's through
  splash), and of a decode step after a prefill into the cache (both through ours)."""
  configs = {impl: _config(name, impl) for impl in ("xla", "pallas")}
  model_xla = transformer.DecoderLM(configs["xla"], rngs=transformer.nnx.Rngs(0))
  model_pallas = transformer.DecoderLM(configs["pallas"], rngs=transformer.nnx.Rngs(0))
  segment_ids = _segment_ids()
  tokens = jnp.asarray(np.random.default_rng(2).integers(3, 64, size=(2, LENGTH)))
  text = np.asarray(segment_ids != 0)[..., None]
  logits = {}
  for impl, model in (("xla", model_xla), ("pallas", model_pallas)):
    full, _ = model(tokens, segment_ids_BxL=segment_ids)
    cache = transformer.init_cache(configs[impl], 2, 256)
    prompt = jnp.asarray(np.ones((2, 16), np.int32)).at[0, :5].set(0)
    _, cache = model(tokens[:, :16], segment_ids_BxL=prompt, cache=cache)
    step, _ = model(tokens[:, 16:17], segment_ids_BxL=jnp.ones((2, 1), jnp.int32), cache=cache)
    logits[impl] = (np.where(text, full, 0.0), step)
  for got, want in zip(logits["pallas"], logits["xla"]):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_decoders_size_caches_in_whole_tiles_and_decode_as_xla():
  """Under 'pallas' a cache of prompt + new tokens is allocated in whole key tiles (no padded
  copy per step), and greedy decoding, static and slot engine, gives xla's tokens."""
  from teacherlm_jax.annotation import decoding
  prompts = [list(np.random.default_rng(i).integers(3, 64, size=n)) for i, n in
             enumerate((9, 30, 17))]
  sampling = decoding.SamplingConfig(max_new_tokens=12, temperature=0.0)
  tokens = {}
  for impl in ("xla", "pallas"):
    model = transformer.DecoderLM(_config("bloom", impl, attention_block_kv=256),
                                  rngs=transformer.nnx.Rngs(0))
    decoder = decoding.Decoder(model, eos_id=-1)
    engine = decoding.SlotEngine(decoder, sampling, num_slots=2, max_prompt_length=30)
    # Prompts bucket to 32 positions; 12 new tokens make 44.
    lengths = {name: decoder.abstract_cache(rows, 32 + 12)["segment_ids"].shape[1]
               for name, rows in (("static", 3), ("engine", engine.num_slots))}
    assert engine.length == 44
    if impl == "pallas":
      assert lengths == {"static": 128, "engine": 128}
    else:
      assert lengths == {"static": 44, "engine": 44}
    static = decoder.generate(prompts, sampling)
    slots = sorted(engine.run([decoding.Request(i, p) for i, p in enumerate(prompts)]),
                   key=lambda g: g.uid)
    tokens[impl] = [g.tokens.tolist() for g in static], [g.tokens.tolist() for g in slots]
  assert tokens["pallas"] == tokens["xla"]
  assert tokens["xla"][0] == tokens["xla"][1]


def _tpu_device(topology: str):
  from jax.experimental import topologies
  return topologies.get_topology_desc(topology_name=topology, platform="tpu").devices[0]


@pytest.mark.parametrize("topology", ["v5e:2x2", "v4:2x2x1"])
def test_kernels_compile_for_tpu(topology):
  """Mosaic compiles the training kernels (forward and backward: BLOOM's ALiBi in ours, LLaMA's
  GQA in splash) and the decode kernel (ours: LLaMA's grouped rows, BLOOM's per-head slopes),
  bf16 at head_dim 128."""
  device = _tpu_device(topology)
  sharding = jax.sharding.SingleDeviceSharding(device)
  spec = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  batch, length, slots = 2, 1024, 512
  for name in ("bloom", "llama"):
    config = _config(name, "pallas", hidden_size=FAMILIES[name][1] * 128, dtype="bfloat16",
                     attention_block_q=512, attention_block_kv=512)
    kv_heads, groups = config.kv_heads, config.num_heads // config.kv_heads

    def loss(q, k, v, segment_ids, positions):
      out = attention_impl.cache_free(config, q, k, v, segment_ids, positions)
      return jnp.sum(out.astype(jnp.float32))

    ids = spec((batch, length), jnp.int32)
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
        spec((batch, kv_heads, groups, length, 128)), spec((batch, kv_heads, length, 128)),
        spec((batch, kv_heads, length, 128)), ids, ids)
    kernels = set(re.findall(r"(splash_mha_\w+|alibi_flash_attention\w*)", lowered.as_text()))
    if name == "bloom":
      assert kernels == {"alibi_flash_attention_fwd", "alibi_flash_attention_dkv",
                         "alibi_flash_attention_dq"}, kernels
    else:
      assert kernels == {"splash_mha_fwd_segmented_residuals",
                         "splash_mha_dkv_segmented_no_residuals",
                         "splash_mha_dq_segmented_no_residuals"}, kernels
    lowered.compile()
    step = jax.jit(functools.partial(attention_impl.cached, config))
    rows, keys = spec((batch, 1), jnp.int32), spec((batch, slots), jnp.int32)
    step.lower(spec((batch, kv_heads, groups, 1, 128)), spec((batch, kv_heads, slots, 128)),
               spec((batch, kv_heads, slots, 128)), rows, rows, keys, keys).compile()


class _Device:
  def __init__(self, platform, device_kind):
    self.platform, self.device_kind = platform, device_kind


@pytest.mark.parametrize("requested,device,expected", [
    ("", _Device("tpu", "TPU v5 lite"), ("pallas", 512, 512)),
    ("", _Device("tpu", "TPU v6 lite"), ("pallas", 512, 1024)),
    ("", _Device("gpu", "NVIDIA H100 80GB HBM3"), ("cudnn", 512, 512)),
    ("", _Device("cpu", "cpu"), ("xla", 512, 512)),
    ("xla", _Device("tpu", "TPU v4"), ("xla", 512, 512)),
])
def test_launch_chooses_attention_per_platform_unless_told(requested, device, expected):
  from teacherlm_jax.runtime import kernels
  options = kernels.attention_options(requested, device)
  got = (options["attention_impl"], options["attention_block_q"], options["attention_block_kv"])
  assert got == expected
  assert _config("opt", "xla").replace(**options).attention_impl == expected[0]


def test_unknown_attention_impl_and_untiled_blocks_are_refused():
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    _config("opt", "flash")
  with pytest.raises(ValueError, match="multiple of 128"):
    _config("opt", "pallas", attention_block_kv=200)


def test_a_loaded_model_takes_the_launch_choice_with_its_parameters():
  from teacherlm_jax.models import reconfigure
  model = transformer.DecoderLM(_config("opt", "xla"), rngs=transformer.nnx.Rngs(0))
  served = reconfigure.with_config_fields(model, attention_impl="pallas")
  assert served.config.attention_impl == "pallas"
  assert served.layers.attention.config.attention_impl == "pallas"  # The stacked blocks.
  for got, want in zip(jax.tree.leaves(transformer.nnx.state(served)),
                       jax.tree.leaves(transformer.nnx.state(model))):
    assert got is want


@pytest.mark.parametrize("name", ["bloom", "llama"])
def test_cudnn_path_layouts_mask_and_bias_equal_xla(name):
  """The 'cudnn' path's glue (layouts, GQA, visibility mask, ALiBi bias), through
  jax.nn.dot_product_attention's XLA implementation: no GPU here to run cuDNN itself."""
  from teacherlm_jax.models.kernels import cudnn_attention
  config = _config(name, "xla")
  segment_ids = _segment_ids()
  positions = transformer.positions_from_segments(segment_ids)
  q, k, v = _qkv(config, LENGTH, LENGTH, seed=3)
  slopes = attention_impl._slopes(config)
  got = cudnn_attention.dot_product_attention(
      q, k, v, segment_ids, positions, segment_ids, positions, alibi_slopes=slopes,
      causal=True, implementation="xla")
  want = attention_impl.cache_free(config, q, k, v, segment_ids, positions)
  text = np.asarray(segment_ids != 0)[:, None, None, :, None]
  np.testing.assert_allclose(np.where(text, got, 0), np.where(text, want, 0), rtol=1e-5,
                             atol=1e-5)
