"""Decoding throughput: ours (jit, KV cache, while_loop) vs `transformers` generate (PyTorch).

Both decode the same converted BLOOM-shaped model (random weights, float32), the same prompts
(left-padded for `generate`) and exactly `max_new_tokens` tokens per row (EOS disabled on our
side, `min_new_tokens` on theirs), greedy, at batch 1 (the reference annotates one sample at a
time) and batch 32. Also reported: samples/s of our batch-32 run against the reference's batch-1
samples/s, and the fraction of the memory-bandwidth bound (bytes a step must read: parameters
plus the KV cache, read once at the speed `read_bandwidth` measures for that many bytes) that
our decoding reaches.

With more than one JAX device (on CPU: `--cpu_devices`, one device per core) ours also runs on a
tensor mesh over them (heads, MLP columns and vocabulary split; the same `Decoder` the
annotation engine runs with `annotate.mesh_shape=(1, 1, N)`), timed in the same alternating loop
as the one-device run and `generate`. Why: XLA:CPU runs each of a batch-32 step's small matmuls
on one core, where PyTorch's oneDNN uses all of them; the mesh is how JAX spreads one step over
cores, as it spreads it over TPU chips.

`precision='bfloat16'` runs both with bf16 weights and activations (ours imported with dtype
and param_dtype bfloat16, theirs `.to(torch.bfloat16)`; our KV cache is `Decoder.cache_dtype`,
the config's, bf16); tokens then need not agree between the two, the counts do.
"""
from __future__ import annotations

import os
import tempfile
from typing import Dict, List

import numpy as np

from teacherlm_jax.benchmarks import models
from teacherlm_jax.benchmarks import timing


def read_bandwidth(nbytes: int, repeats: int = 5) -> float:
  """Bytes/s at which jitted code reads `nbytes` once (a float32 sum over that many bytes).

  Sized like a decode step's reads, so that caches help the bound as much as they could help
  a step; a copy's read+write rate would understate the bound.
  """
  import jax
  import jax.numpy as jnp
  data = jnp.ones((max(1, nbytes // 4),), jnp.float32)
  total = jax.jit(jnp.sum)
  best, = timing.best_times([lambda: total(data).block_until_ready()], repeats)
  return data.nbytes / best


def benchmark_decoding(device: bool = False, quick: bool = False, batch_sizes=(1, 32),
                       max_new_tokens: int = None, repeats: int = None,
                       precision: str = "float32", tensor_devices: int = None) -> List[Dict]:
  """Rows (benchmark, metric, ours, pytorch, ratio, notes) for scripts/benchmark.py.

  tensor_devices: size of the tensor mesh for the extra rows (default: the most devices, up to
  all of them, that divide the head count; 1 = no mesh rows).
  """
  import jax
  import torch
  import transformers

  from teacherlm_jax.annotation import decoding
  from teacherlm_jax.models import hf
  from teacherlm_jax.runtime import partitioning
  from teacherlm_jax.runtime import shapes

  suffix = timing.precision_suffix(precision)
  if quick:
    max_new_tokens = max_new_tokens or 16
    repeats = repeats or 1
  else:
    max_new_tokens = max_new_tokens or 64
    repeats = repeats or 3
  torch_device = "cuda" if device and torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)
  hf_config = models.hf_config("bloom", "quick" if quick else "full")
  torch_model = transformers.BloomForCausalLM(hf_config).eval().to(torch_device)
  rng = np.random.default_rng(0)
  rows = []
  with tempfile.TemporaryDirectory() as directory:
    torch_model.save_pretrained(directory)
    config, model = hf.import_checkpoint(directory, dtype=precision, param_dtype=precision)
  torch_model = torch_model.to(getattr(torch, precision))
  decoders = {"": decoding.Decoder(model, eos_id=-1)}  # Metric suffix -> decoder.
  devices = jax.devices()
  if tensor_devices is None:
    tensor_devices = max(t for t in range(1, len(devices) + 1) if hf_config.n_head % t == 0)
  if tensor_devices > 1:
    mesh = partitioning.make_mesh(1, 1, tensor_devices, devices=devices[:tensor_devices])
    decoders[f", tensor={tensor_devices} mesh"] = decoding.Decoder(model, eos_id=-1, mesh=mesh)
  decoder = decoders[""]
  sampling = decoding.SamplingConfig(max_new_tokens=max_new_tokens)
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(decoder.params))
  results = {}
  for batch in batch_sizes:
    lengths = rng.integers(16, 49, size=batch)
    prompts = [list(rng.integers(4, config.vocab_size, size=n)) for n in lengths]
    width = int(max(lengths))
    tokens = np.full((batch, width), config.pad_token_id, np.int64)
    mask = np.zeros((batch, width), np.int64)
    for row, prompt in enumerate(prompts):
      tokens[row, width - len(prompt):] = prompt
      mask[row, width - len(prompt):] = 1
    inputs = dict(input_ids=torch.tensor(tokens, device=torch_device),
                  attention_mask=torch.tensor(mask, device=torch_device))

    def theirs():
      with torch.no_grad():
        out = torch_model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                                   min_new_tokens=max_new_tokens, pad_token_id=3)
      assert out.shape[1] == width + max_new_tokens

    def ours(decoder):
      generations = decoder.generate(prompts, sampling)
      assert all(g.num_tokens == max_new_tokens for g in generations)

    ours_fns = [lambda d=d: ours(d) for d in decoders.values()]
    for fn in ours_fns:
      fn()  # Compile.
    theirs()  # Warm up.
    *ours_times, theirs_s = timing.best_times(ours_fns + [theirs], repeats)
    generated = batch * max_new_tokens
    cache_length = shapes.bucket_length(width) + max_new_tokens
    kv_bytes = (2 * config.num_layers * batch * cache_length * config.hidden_size
                * decoder.cache_dtype.itemsize)
    bandwidth = None if device else read_bandwidth(param_bytes + kv_bytes)
    for side, ours_s in zip(decoders, ours_times):
      results[batch, side] = (generated / ours_s, generated / theirs_s)
      rows.append({"benchmark": "decoding",
                   "metric": f"generated tokens/s, batch {batch}{side}{suffix}",
                   "ours": generated / ours_s, "pytorch": generated / theirs_s,
                   "ratio": theirs_s / ours_s,
                   "notes": f"bloom d={hf_config.hidden_size} L={hf_config.n_layer} "
                            f"V={hf_config.vocab_size}, greedy, {max_new_tokens} new tokens, "
                            f"prompts 16-48, load avg {os.getloadavg()[0]:.1f} on "
                            f"{os.cpu_count()} cpus, {precision}"})
      if bandwidth:
        bound = batch * bandwidth / (param_bytes + kv_bytes)
        rows.append({"benchmark": "decoding",
                     "metric": f"fraction of bandwidth bound, batch {batch}{side}{suffix}",
                     "ours": (generated / ours_s) / bound,
                     "pytorch": (generated / theirs_s) / bound, "ratio": "",
                     "notes": f"bound {bound:.0f} tok/s = read bandwidth "
                              f"{bandwidth / 1e9:.1f} GB/s / ({param_bytes / 1e6:.0f} MB params "
                              "+ KV) x batch"})
  if 1 in batch_sizes and max(batch_sizes) > 1:
    big = max(batch_sizes)
    reference_samples = results[1, ""][1] / max_new_tokens
    for side in decoders:
      ours_samples = results[big, side][0] / max_new_tokens
      rows.append({"benchmark": "decoding",
                   "metric": f"samples/s vs reference (HF, batch 1){side}{suffix}",
                   "ours": ours_samples, "pytorch": reference_samples,
                   "ratio": ours_samples / reference_samples,
                   "notes": f"ours at batch {big}; target >= 10x"})
  return rows
