"""Training throughput: our jitted train step vs `transformers` + torch.optim.AdamW.

Both train the same model of one family (`family`; default BLOOM, the paper's teacher and
student: d=512, 8 layers, 8 heads, vocab 32000, 42M parameters; OPT, the paper's other
student, the same shape; LLaMA-style, d=512, 8 layers, MLP 1408, untied head, 58M), float32,
no dropout, on the same random token batch with the same update: next-token cross entropy
on every token, global-norm clipping at 1.0, AdamW (b1 0.9, b2 0.95, no decay). Reported:
tokens/s of each, the ratio, and MFU of each against one measured matmul peak (the best of a
jax and a torch float32 square matmul on this machine), with the FLOPs of
`mfu.flops_per_token`. Runs alternate so load changes hit both alike.

The batch is `batch_size` rows of `seq_len` tokens (`DEFAULT_SHAPE`, 8x256, unless given; rows
of another shape name it, e.g. "tokens/s, 1x2048"). BLOOM's `transformers` attention (eager,
ALiBi through `baddbmm`) computes every query's scores against every key and masks the future
(OPT's and LLaMA's run torch's SDPA); ours attends in blocks of query rows that skip the keys
after a block (`attention.causal_query_blocks`), so the longer the rows, the more of BLOOM's
attention work torch does and ours does not.

Ours runs `steps_per_call` steps per jitted call (`TrainConfig.steps_per_call`, the trainer's
multi-step `lax.scan`), torch the same number of steps per timed run; a second row times ours
at one step per call in the same alternation.

With `device=True` on an accelerator both sides run there: ours with the platform's attention
(`ModelSettings.attention_impl` left to the launch: 'cudnn' on GPU), torch with its SDPA where the
family has it (`attn_implementation='sdpa'`; the notes say which ran), and MFU is against the
chip's vendor bf16 peak (`runtime/chips.py`).

`precision='bfloat16'` compares mixed precision with mixed precision: our bf16 compute with
float32 master weights (`ModelSettings.compute_dtype`) against torch CPU autocast to bf16 with
float32 parameters; MFU is then against the best measured bf16 matmul.
"""
from __future__ import annotations

import re
from typing import Dict, List, Tuple

import numpy as np

from teacherlm_jax.benchmarks import models
from teacherlm_jax.benchmarks import timing

# (rows, tokens a row) of the training rows without a shape in their name. The benchmark also
# runs 1x2048 by default: the sequence length of `gin/student.gin` and `gin/teacher_sft.gin`,
# the same 2,048 tokens a step (`scripts/benchmark.py --training_shapes`).
DEFAULT_SHAPE = (8, 256)


def torch_matmul_tflops(size: int = 1024, repeats: int = 5, dtype: str = "float32") -> float:
  import torch
  a = torch.ones(size, size, dtype=getattr(torch, dtype))
  b = torch.ones(size, size, dtype=getattr(torch, dtype))
  a @ b
  best, = timing.best_times([lambda: a @ b], repeats)
  return 2.0 * size ** 3 / best / 1e12


def parse_shape(text: str) -> Tuple[int, int]:
  """'8x256' -> (8, 256): rows x tokens a row of one train step's batch."""
  match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", text)
  if not match or 0 in (int(match.group(1)), int(match.group(2))):
    raise ValueError(f"training shape {text!r}: expected ROWSxTOKENS, e.g. 8x256")
  return int(match.group(1)), int(match.group(2))


def benchmark_training(device: bool = False, quick: bool = False,
                       batch_size: int = DEFAULT_SHAPE[0], seq_len: int = DEFAULT_SHAPE[1],
                       steps: int = None, precision: str = "float32",
                       family: str = "bloom", steps_per_call: int = 4,
                       size: str = "full") -> List[Dict]:
  """Rows (benchmark, metric, ours, pytorch, ratio, notes) for scripts/benchmark.py."""
  import jax
  import torch
  import transformers

  from teacherlm_jax.models import hf
  from teacherlm_jax.runtime import backend
  from teacherlm_jax.runtime import partitioning
  from teacherlm_jax.training import mfu
  from teacherlm_jax.training import train as train_lib
  from teacherlm_jax.training import train_config

  the_hf_config = models.hf_config(family, "quick" if quick else size)
  vocab = the_hf_config.vocab_size
  steps = steps or (2 if quick else 5)
  if quick:
    seq_len = min(seq_len, 128)
  suffix = (timing.precision_suffix(precision) + ("" if family == "bloom" else f", {family}")
            + ("" if (batch_size, seq_len) == DEFAULT_SHAPE else f", {batch_size}x{seq_len}"))
  torch_device = "cuda" if device and torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)
  config = hf.config_from_hf(the_hf_config.to_dict())
  torch_attention = "sdpa" if torch_device == "cuda" else None
  try:
    torch_model = transformers.AutoModelForCausalLM.from_config(
        the_hf_config, attn_implementation=torch_attention)
  except ValueError:  # The family has no SDPA attention in this transformers: its eager one.
    torch_attention = "eager"
    torch_model = transformers.AutoModelForCausalLM.from_config(
        the_hf_config, attn_implementation=torch_attention)
  torch_model = torch_model.to(torch_device).train()
  torch_opt = torch.optim.AdamW(torch_model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                                weight_decay=0.0)

  rng = np.random.default_rng(0)
  tokens = rng.integers(4, vocab, size=(batch_size, seq_len + 1))
  inputs = torch.tensor(tokens[:, :-1], device=torch_device)
  labels = torch.tensor(tokens[:, 1:], device=torch_device)

  def their_step():
    with torch.autocast(torch_device, dtype=torch.bfloat16, enabled=precision == "bfloat16"):
      logits = torch_model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             labels.reshape(-1))
    torch_opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(torch_model.parameters(), 1.0)
    torch_opt.step()
    if torch_device == "cuda":
      torch.cuda.synchronize()
    return float(loss.detach())

  # Ours: the trainer's own compiled program (same step the training loop runs), one device.
  run = train_config.TrainConfig(
      model=train_config.ModelSettings(preset="small-bloom-50m", compute_dtype=precision),
      data=train_config.DataConfig(seq_len=seq_len, batch_size=batch_size),
      optimizer=train_config.OptimizerConfig(learning_rate=1e-4, schedule="constant",
                                             adam_b1=0.9, adam_b2=0.95, clip_norm=1.0),
      mesh=train_config.MeshConfig(devices=1, fsdp=1))
  config = config.replace(**run.model.numerics())  # The trainer's numerics.
  mesh = run.mesh.make()
  program = train_lib.program_for(run, config, mesh)
  state = program.fresh_state(program.init_params())
  batch_np = {"tokens": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
              "loss_weights": np.ones((batch_size, seq_len), np.float32),
              "segment_ids": np.ones((batch_size, seq_len), np.int32),
              "positions": np.tile(np.arange(seq_len, dtype=np.int32), (batch_size, 1))}
  batch = partitioning.shard_batch(batch_np, mesh, batch_size)
  batches = partitioning.shard_batch({k: np.stack([v] * steps_per_call) for k, v in
                                      batch_np.items()}, mesh, batch_size, stacked=True)
  holder = {"state": state}

  def our_step():
    holder["state"], step_metrics = program.train_step(holder["state"], batch)
    return float(step_metrics["loss"])

  def ours():  # As the trainer runs with TrainConfig.steps_per_call.
    if steps_per_call == 1:
      return our_step()
    holder["state"], step_metrics = program.train_steps(holder["state"], batches)
    return float(step_metrics["loss"][0])

  def theirs():
    return [their_step() for _ in range(steps_per_call)][0]

  ours_loss, theirs_loss = our_step(), theirs()  # Compile / warm up.
  ours()
  timed = (ours, theirs) if steps_per_call == 1 else (ours, theirs, our_step)
  best = timing.best_times(timed, steps)
  tokens_per_step = batch_size * seq_len
  ours_tps = steps_per_call * tokens_per_step / best[0]
  theirs_tps = steps_per_call * tokens_per_step / best[1]
  flops_per_token = mfu.flops_per_token(config, seq_len)
  platform = jax.devices()[0].platform
  if platform != "cpu":
    device_kind = jax.devices()[0].device_kind
    peak = mfu.peak_flops_per_device(device_kind, platform)
    peak = peak and peak / 1e12
    peak_note = (f"peak {peak:.0f} TFLOP/s = {device_kind}'s vendor bf16 figure" if peak else
                 f"no vendor peak known for {device_kind}")
  else:
    jax_peak = mfu.measure_matmul_peak_tflops(2048, dtype=precision)
    torch_peak = torch_matmul_tflops(2048, dtype=precision)
    peak = max(jax_peak, torch_peak)
    peak_note = (f"peak {peak:.3f} TFLOP/s = best {precision} 2048^2 matmul "
                 f"(jax {jax_peak:.3f}, torch {torch_peak:.3f})")
  params_m = config.num_params() / 1e6
  compute = "float32" if precision == "float32" else "bf16 compute, float32 master weights"
  if platform == "cpu":  # Which library ran our step's dots (backend.onednn_dots_supported).
    onednn = backend.Backend.current().compiler_options(backend.TRAIN, config.compute_dtype)
    platform += ", oneDNN float32 dots" if onednn else ", YNNPACK dots"
  notes = (f"{family} {params_m:.0f}M params, batch {batch_size}x{seq_len}, AdamW+clip, {compute}, "
           f"{platform}, attention ours {config.attention_impl} / torch "
           f"{torch_model.config._attn_implementation}, {steps_per_call} step(s) per call; "
           f"first-step loss ours "
           f"{ours_loss:.3f} / torch {theirs_loss:.3f}")
  rows = [{"benchmark": "training", "metric": f"tokens/s{suffix}", "ours": ours_tps,
           "pytorch": theirs_tps, "ratio": ours_tps / theirs_tps, "notes": notes}]
  if steps_per_call > 1:
    single_tps = tokens_per_step / best[2]
    rows.append({"benchmark": "training", "metric": f"tokens/s, one step per call{suffix}",
                 "ours": single_tps, "pytorch": theirs_tps, "ratio": single_tps / theirs_tps,
                 "notes": "the same step, one jitted call per step"})
  if peak:
    ours_mfu = ours_tps * flops_per_token / 1e12 / peak
    theirs_mfu = theirs_tps * flops_per_token / 1e12 / peak
    rows.append({"benchmark": "training", "metric": f"MFU{suffix}", "ours": ours_mfu,
                 "pytorch": theirs_mfu, "ratio": ours_mfu / theirs_mfu,
                 "notes": f"{flops_per_token / 1e6:.0f} MFLOP/token; {peak_note}"})
  return rows
