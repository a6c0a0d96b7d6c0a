"""Time to the first batch when training resumes deep into a seqio mixture: replaying the input
pipeline up to the step (what a resume without a saved position does) against restoring the
position saved with the checkpoint."""
from __future__ import annotations

import time
from typing import Dict

import numpy as np
import seqio

from teacherlm_jax.training import train_data

MIXTURE = "resume_benchmark_flan_cot_bytes_mix"


def register_mixture(data_dir: str) -> str:
  """Two FLAN CoT byte tasks (teacher prompts -> rationales) mixed 2:1."""
  first = train_data.register_flan_cot_bytes_task(
      data_dir, files=("qasc", "sensemaking"), name="resume_benchmark_flan_a")
  second = train_data.register_flan_cot_bytes_task(
      data_dir, files=("gsm8k", "aqua"), name="resume_benchmark_flan_b")
  if MIXTURE in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(MIXTURE)
  seqio.MixtureRegistry.add(MIXTURE, [(first, 2.0), (second, 1.0)])
  return MIXTURE


def run(data_dir: str, step: int, seq_len: int = 128, batch_size: int = 8) -> Dict:
  """Replays to batch `step`, saves the position after it, then resumes from that position in a
  fresh pipeline; both must give the same next batch."""
  batches = train_data.SeqioBatches(register_mixture(data_dir), "train", seq_len, batch_size,
                                    seed=0)
  start = time.perf_counter()
  next(batches(0))  # Also reads the data files once, so that neither timing below includes it.
  fresh_s = time.perf_counter() - start
  start = time.perf_counter()
  replayed = batches(step)
  next(replayed)
  replay_s = time.perf_counter() - start
  state = replayed.state()
  expected = next(replayed)

  start = time.perf_counter()
  resumed = batches(step + 1, state=state)
  got = next(resumed)
  restore_s = time.perf_counter() - start
  same = all(np.array_equal(got[key], expected[key]) for key in expected)
  if not same:
    raise AssertionError(f"the batch after restoring at {step + 1} differs from the replayed one")
  return {"mixture": MIXTURE, "step": step, "batch_size": batch_size, "seq_len": seq_len,
          "fresh_start_first_batch_s": round(fresh_s, 2),
          "replay_first_batch_s": round(replay_s, 2),
          "saved_position_first_batch_s": round(restore_s, 2),
          "speedup": round(replay_s / restore_s, 1), "position_bytes": len(state),
          "same_batch": same}
