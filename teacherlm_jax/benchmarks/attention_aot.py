"""Ahead-of-time compiles of a train step for a TPU topology, once per attention
implementation: the HBM a chip needs and the bytes XLA's cost analysis says the step moves.

What is compiled: the gradient of the LM loss with respect to every parameter (no optimizer
update) of a model of the preset's shapes with `layers` of its blocks (scanned) and a small
vocabulary, on one chip, with abstract parameters (nothing is materialised). The Pallas
kernels' bytes are their `CostEstimate`s (models/kernels/flash_attention.py), which count the
key/value re-reads per query block.
"""
from __future__ import annotations

import time
from typing import Dict, List

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from teacherlm_jax.models import attention_impl as attention_impl_lib
from teacherlm_jax.models import presets
from teacherlm_jax.models import transformer
from teacherlm_jax.runtime import kernels

GiB = 1024**3


def compile_train_step(model: str, attention_impl: str, topology: str, *, layers: int,
                       batch: int, length: int, vocab_size: int = 1024,
                       dtype: str = "bfloat16", remat: str = "dots") -> Dict[str, object]:
  """Compiles the step for the first chip of `topology`; returns its memory and cost figures."""
  from jax.experimental import topologies
  device = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices[0]
  config = presets.get(model, num_layers=layers, vocab_size=vocab_size, dtype=dtype,
                       param_dtype="float32", remat=remat,
                       **kernels.attention_options(attention_impl, device))
  sharding = jax.sharding.SingleDeviceSharding(device)
  graphdef, abstract_params = nnx.split(
      nnx.eval_shape(lambda: transformer.DecoderLM(config, rngs=nnx.Rngs(0))))
  abstract_params = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract_params)
  ids = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=sharding)

  def loss(params, tokens, segment_ids):
    logits, _ = nnx.merge(graphdef, params)(tokens, segment_ids_BxL=segment_ids)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1)
                    - jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0])

  start = time.perf_counter()
  compiled = jax.jit(jax.grad(loss)).lower(abstract_params, ids, ids).compile()
  return _figures(compiled, config, model=model, topology=topology, layers=layers, batch=batch,
                  length=length, vocab_size=vocab_size, dtype=dtype, remat=remat,
                  seconds=time.perf_counter() - start)


def compile_attention_step(model: str, attention_impl: str, topology: str, *, batch: int,
                           length: int, dtype: str = "bfloat16") -> Dict[str, object]:
  """As `compile_train_step`, for one layer's attention alone: q, k, v -> the output and its
  gradients (the layer's projections, norms and MLP left out)."""
  from jax.experimental import topologies
  device = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices[0]
  config = presets.get(model, dtype=dtype, **kernels.attention_options(attention_impl, device))
  sharding = jax.sharding.SingleDeviceSharding(device)
  kv_heads, groups, head_dim = config.kv_heads, config.num_heads // config.kv_heads, \
      config.dim_per_head
  spec = lambda shape, t=dtype: jax.ShapeDtypeStruct(shape, jnp.dtype(t), sharding=sharding)
  ids = spec((batch, length), jnp.int32)

  def step(q, k, v, d_out, segment_ids, positions):
    out, vjp = jax.vjp(lambda q, k, v: attention_impl_lib.cache_free(
        config, q, k, v, segment_ids, positions), q, k, v)
    return out, vjp(d_out.astype(out.dtype))

  q = spec((batch, kv_heads, groups, length, head_dim))
  kv = spec((batch, kv_heads, length, head_dim))
  start = time.perf_counter()
  compiled = jax.jit(step).lower(q, kv, kv, q, ids, ids).compile()
  return _figures(compiled, config, model=model, topology=topology, layers=0, batch=batch,
                  length=length, vocab_size=0, dtype=dtype, remat="-",
                  seconds=time.perf_counter() - start)


def _figures(compiled, config, *, seconds, **run) -> Dict[str, object]:
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  hbm = (memory.argument_size_in_bytes + memory.output_size_in_bytes
         + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  return {
      **run, "attention_impl": config.attention_impl,
      "attention_blocks": [config.attention_block_q, config.attention_block_kv],
      "hbm_bytes": int(hbm), "temp_bytes": int(memory.temp_size_in_bytes),
      "argument_bytes": int(memory.argument_size_in_bytes),
      "bytes_accessed": float(cost.get("bytes accessed", np.nan)),
      "flops": float(cost.get("flops", np.nan)), "compile_seconds": round(seconds, 1),
  }


def docs_table(results: List[Dict[str, object]]) -> str:
  """A Markdown table of `compile_train_step` results, 'xla' rows as the baseline."""
  base = {(r["model"], r["topology"], r["layers"], r["batch"], r["length"]): r
          for r in results if r["attention_impl"] == "xla"}
  what = lambda r: (f"{r['model']} train step, {r['layers']} layer" if r["layers"] == 1
                    else f"{r['model']} train step, {r['layers']} layers" if r["layers"]
                    else f"{r['model']} attention alone")
  lines = ["| what | topology | batch x length | attention | HBM per chip (GiB) | "
           "temp (MiB) | bytes accessed (GB) | vs xla |",
           "|---|---|---|---|---|---|---|---|"]
  for r in results:
    ref = base.get((r["model"], r["topology"], r["layers"], r["batch"], r["length"]))
    ratio = (f"{ref['bytes_accessed'] / r['bytes_accessed']:.2f}x fewer bytes, "
             f"{ref['temp_bytes'] / max(r['temp_bytes'], 1):.2f}x less temp"
             if ref and ref is not r else "")
    lines.append(
        f"| {what(r)} | {r['topology']} | {r['batch']} x {r['length']} | "
        f"{r['attention_impl']} | {r['hbm_bytes'] / GiB:.2f} | {r['temp_bytes'] / 2**20:.1f} | "
        f"{r['bytes_accessed'] / 1e9:.1f} | {ratio} |")
  return "\n".join(lines)
