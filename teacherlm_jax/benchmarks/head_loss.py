"""The LM head and its cross entropy at BLOOM's vocabulary: our chunked loss vs torch.

At BLOOM's 250,880-token vocabulary the head's three matmuls and the loss are most of a small
model's train step. Ours: `models/head_loss.py` under `jax.grad` with the train step's compiler
options, at the default chunk floor (`MIN_CHUNK_TOKENS` tokens a chunk) and with the byte
budget alone (the policy before the floor: 32 tokens a chunk here). Torch: `F.linear` +
`F.cross_entropy` on the whole logits, then backward. Same float32 inputs, the head in the
tied-embedding layout [vocab, d], gradients for the hidden states and the head.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np

from teacherlm_jax.benchmarks import timing


def benchmark_head_loss(device: bool = False, quick: bool = False, batch_size: int = 8,
                        seq_len: int = 256, hidden: int = 512, vocab: int = 250880,
                        repeats: int = None) -> List[Dict]:
  """Rows (benchmark, metric, ours, pytorch, ratio, notes) for scripts/benchmark.py."""
  import jax
  import jax.numpy as jnp
  import torch

  from teacherlm_jax.models import head_loss
  from teacherlm_jax.runtime import backend

  if quick:
    seq_len, vocab = min(seq_len, 128), min(vocab, 32000)
  repeats = repeats or (1 if quick else 2)
  torch_device = "cuda" if device and torch.cuda.is_available() else "cpu"
  rng = np.random.default_rng(0)
  x_np = rng.standard_normal((batch_size, seq_len, hidden)).astype(np.float32)
  table_np = (rng.standard_normal((vocab, hidden)) * 0.02).astype(np.float32)
  targets_np = rng.integers(0, vocab, (batch_size, seq_len))
  x, table = jnp.asarray(x_np), jnp.asarray(table_np)
  targets = jnp.asarray(targets_np, jnp.int32)
  weights = jnp.ones((batch_size, seq_len), jnp.float32)
  options = backend.Backend.current().compiler_options(backend.TRAIN, jnp.float32)

  def ours_with(min_chunk_tokens: int):
    loss = lambda x, t: head_loss.head_loss(x, t, targets, weights, vocab_major=True,
                                            min_chunk_tokens=min_chunk_tokens)[0]
    grad = jax.jit(jax.grad(loss, (0, 1)), compiler_options=options or None)
    return lambda: jax.block_until_ready(grad(x, table))

  tx = torch.tensor(x_np, device=torch_device, requires_grad=True)
  ttable = torch.tensor(table_np, device=torch_device, requires_grad=True)
  ttargets = torch.tensor(targets_np, device=torch_device)

  def theirs():
    tx.grad, ttable.grad = None, None
    logits = torch.nn.functional.linear(tx, ttable)
    torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), ttargets.reshape(-1)).backward()
    if torch_device == "cuda":
      torch.cuda.synchronize()

  floor, bytes_only = ours_with(head_loss.MIN_CHUNK_TOKENS), ours_with(0)
  for fn in (floor, bytes_only, theirs):
    fn()  # Compile / warm up.
  best = timing.best_times((floor, bytes_only, theirs), repeats)
  tokens = batch_size * seq_len
  chunk = lambda min_tokens: batch_size * head_loss.chunk_length(
      batch_size, seq_len, vocab, head_loss.DEFAULT_CHUNK_BYTES, min_tokens)
  notes = (f"batch {batch_size}x{seq_len}, d {hidden}, float32, "
           f"{jax.devices()[0].platform}; gradients of hidden states and head")
  return [
      {"benchmark": "head+loss", "metric": f"tokens/s, vocab {vocab}",
       "ours": tokens / best[0], "pytorch": tokens / best[2], "ratio": best[2] / best[0],
       "notes": f"ours {chunk(head_loss.MIN_CHUNK_TOKENS)} tokens a chunk; {notes}"},
      {"benchmark": "head+loss", "metric": f"tokens/s, vocab {vocab}, byte budget alone",
       "ours": tokens / best[1], "pytorch": tokens / best[2], "ratio": best[2] / best[1],
       "notes": f"ours {chunk(0)} tokens a chunk (32 MiB of logits); {notes}"},
  ]
