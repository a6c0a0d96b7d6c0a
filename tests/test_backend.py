"""The backend: XLA:CPU's compiler options chosen once, outside the model; and the model core
that knows nothing of the platform (the same jaxpr dtypes on CPU and for a TPU topology)."""
import os
import pathlib
import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import topologies

from teacherlm_jax.annotation import decoding
from teacherlm_jax.models import presets
from teacherlm_jax.models import transformer
from teacherlm_jax.runtime import backend
from teacherlm_jax.runtime import partitioning
from teacherlm_jax.runtime import program
from teacherlm_jax.training import optimizer
from teacherlm_jax.training import train
from teacherlm_jax.training import train_config

MODELS_DIR = pathlib.Path(__file__).resolve().parents[1] / "teacherlm_jax" / "models"
_CPUINFO = ("processor\t: 0\nvendor_id\t: {vendor}\nmodel name\t: x\n"
            "flags\t\t: fpu sse2 avx2 {extra}\n")


def test_the_models_never_ask_for_the_backend():
  for path in MODELS_DIR.glob("*.py"):
    for word in ("default_backend", "cpuinfo", "onednn", "xla_cpu", ".platform"):
      assert word not in path.read_text(), f"{path.name} mentions {word!r}"


def test_onednn_dots_only_on_intel_cpus_with_avx512_and_amx():
  supported = lambda vendor, flags: backend.onednn_dots_supported(
      _CPUINFO.format(vendor=vendor, extra=flags))
  assert supported("GenuineIntel", "avx512f avx512bw amx_bf16 amx_tile")
  assert not supported("GenuineIntel", "avx512f avx512bw")  # Before Sapphire Rapids.
  assert not supported("GenuineIntel", "avx512fp16 amx_tile")  # Flags match whole words.
  assert not supported("AuthenticAMD", "avx512f amx_tile")
  assert not backend.onednn_dots_supported("")  # No vendor or flags line: not assumed.
  assert backend.Backend("cpu").compiler_options(backend.TRAIN) == {}


def test_only_cpu_gets_compiler_options():
  cpu = backend.Backend("cpu", onednn_dots=True)
  assert cpu.compiler_options(backend.TRAIN, jnp.float32)["xla_cpu_use_onednn"]
  assert "xla_cpu_experimental_ynn_fusion_type" not in cpu.compiler_options(
      backend.TRAIN, jnp.bfloat16)  # YNNPACK keeps the bf16 dots.
  assert cpu.compiler_options(backend.DECODE, jnp.float32) == {}
  assert cpu.compiler_options(backend.INIT) == {"xla_backend_optimization_level": 0}
  tpu = backend.Backend.for_platform("tpu")
  for kind in backend.PROGRAMS:
    assert tpu.compiler_options(kind, jnp.bfloat16) == {}
  with pytest.raises(ValueError, match="program 'serve'"):
    tpu.compiler_options("serve")


def test_training_options_route_float32_cpu_dots_through_onednn(onednn_dots):
  # A jaxlib that drops the flags or its oneDNN fusions fails here rather than silently
  # losing them.
  x, w = jnp.ones((64, 32), jnp.float32), jnp.ones((32, 16), jnp.float32)
  options = backend.Backend.current().compiler_options(backend.TRAIN, jnp.float32)
  compiled = jax.jit(lambda x, w: jnp.tanh(x @ w), compiler_options=options).lower(x, w).compile()
  assert "onednn_fusion" in compiled.as_text()
  np.testing.assert_allclose(compiled(x, w), np.tanh(np.ones((64, 16)) * 32), rtol=1e-6)
  # A dot scaled by a broadcast operand: what oneDNN's DOT fusion type miscomputes.
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((128, 1000), np.float32), rng.standard_normal((1000, 64), np.float32)
  scaled = {"times a constant": lambda a, b: 0.125 * (a @ b),
            "over a constant": lambda a, b: (a @ b) / np.float32(8.0),
            "times a runtime scalar": lambda a, b: jnp.sum(a[0, :1]) * (a @ b),
            "times a row": lambda a, b: (a @ b) * b[0]}
  for name, fn in scaled.items():
    np.testing.assert_allclose(jax.jit(fn, compiler_options=options)(a, b), fn(a, b),
                               rtol=1e-4, atol=1e-3, err_msg=name)


def test_bfloat16_training_options_give_onednn_only_the_float32_dots(onednn_dots):
  rng = np.random.default_rng(1)
  x, w = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for shape in ((64, 32), (32, 16)))
  q, k = (jnp.asarray(rng.standard_normal((4, 64, 16)), jnp.float32) for _ in range(2))

  def fn(x, w, q, k):  # A matmul on bf16 operands and a batched one on float32 operands.
    return (jnp.dot(x, w, preferred_element_type=jnp.float32),
            jnp.einsum("bqd,bkd->bqk", q, k))

  options = backend.Backend.current().compiler_options(backend.TRAIN, jnp.bfloat16)
  compiled = jax.jit(fn, compiler_options=options).lower(x, w, q, k).compile()
  fusions = re.findall(r"(onednn_fusion|ynn_fusion)[.\d]* = f32\[([\d,]+)\]", compiled.as_text())
  assert ("onednn_fusion", "4,64,64") in fusions and ("ynn_fusion", "64,16") in fusions
  for got, want in zip(compiled(x, w, q, k), jax.jit(fn)(x, w, q, k)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ---- the same numerics on every platform -----------------------------------------------------


def _tpu_mesh():
  # Other processes on this host may hold libtpu: a topology needs no chip of its own.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
  return partitioning.make_mesh(data=1, fsdp=2, tensor=2, devices=devices)


def _abstract_model(config):
  return nnx.eval_shape(lambda: transformer.DecoderLM(config, rngs=nnx.Rngs(0)))


def _train_step_jaxpr(config, mesh):
  runtime = program.Program(mesh)
  tx, _ = optimizer.make_optimizer(train_config.OptimizerConfig())
  graphdef, params = runtime.split(_abstract_model(config))
  state_sh = batch_sh = None
  if mesh is not None:
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    state_sh = {"params": param_sh, "step": runtime.replicated,
                "opt_state": optimizer.state_shardings(tx, params, param_sh, runtime.replicated)}
    batch_sh = {key: partitioning.batch_sharding(mesh, 2) for key in train.BATCH_KEYS}
  step = train.make_train_step(runtime, graphdef, tx, 0.0, state_sh, batch_sh, 64,
                               dtype=config.compute_dtype)
  state = {"params": params, "opt_state": jax.eval_shape(tx.init, params),
           "step": jax.ShapeDtypeStruct((), jnp.int32)}
  batch = {key: jax.ShapeDtypeStruct((4, 16), jnp.float32 if key == "loss_weights" else jnp.int32)
           for key in train.BATCH_KEYS}
  return step.trace(state, batch).jaxpr


def _decode_step_jaxpr(config, mesh):
  decoder = decoding.Decoder(_abstract_model(config), mesh=mesh, eos_id=-1)
  cache = decoder.abstract_cache(4, 32)
  dstate = decoder.abstract_decode_state(4, 8)
  sampling = decoding.SamplingConfig(max_new_tokens=8, temperature=0.7, top_k=5)
  return decoder.steps_fn.trace(decoder.params, cache, dstate, np.int32(0), np.int32(8),
                                np.int32(5), sampling=sampling).jaxpr


# Placement only: present on a mesh, absent without one.
_PLACEMENT = {"sharding_constraint", "reshard", "mesh_cast"}
# Their outputs are their carries or their body's: a mesh's placements can change how many
# (a loop-invariant value JAX hoists out of an unconstrained loop); the body's equations are
# compared instead.
_CONTROL = {"while", "scan", "cond", "jit", "pjit", "closed_call", "remat", "checkpoint",
            "custom_vjp_call", "custom_jvp_call", "custom_vjp_call_jaxpr"}


def _output_dtypes(jaxpr):
  """(primitive, dtypes of its outputs) of every equation in order, sub-jaxprs included;
  placements left out, control flow by name only."""
  found = []
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name in _PLACEMENT:
      continue
    dtypes = () if name in _CONTROL else tuple(
        str(v.aval.dtype) for v in eqn.outvars if hasattr(v.aval, "dtype"))
    found.append((name, dtypes))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found += _output_dtypes(sub)
  return found


@pytest.mark.parametrize("trace", [_train_step_jaxpr, _decode_step_jaxpr],
                         ids=["train_step", "decode_step"])
@pytest.mark.parametrize("name", ["tiny-bloom", "tiny-llama"])
def test_a_bf16_config_traces_to_the_same_dtypes_on_cpu_and_for_tpu(name, trace):
  config = presets.get(name, dtype="bfloat16")
  on_cpu = _output_dtypes(trace(config, None))
  for_tpu = _output_dtypes(trace(config, _tpu_mesh()))
  assert len(on_cpu) == len(for_tpu)
  assert on_cpu == for_tpu
  assert ("dot_general", ("bfloat16",)) not in on_cpu  # Every product accumulates in float32...
  bf16_operands = [e for e in on_cpu if e == ("convert_element_type", ("bfloat16",))]
  assert bf16_operands  # ...of bf16 operands.
