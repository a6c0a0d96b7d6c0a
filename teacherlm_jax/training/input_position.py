"""The input pipeline's position, saved next to each checkpoint so that resume is O(1).

  {model_dir}/input_position/{step}/process-00000-of-00002.bin

One file per process (each reads its own rows or shard), holding what the batch iterator's
`state()` returned after the step's last batch. It is written before the checkpoint of that
step, so a restorable checkpoint always has its position; a missing file (a checkpoint of an
older run, another process count, a pipeline tf.data cannot save) means the input is replayed.
"""
from __future__ import annotations

from typing import Iterable, Optional

from teacherlm_jax.storage import files

SUBDIR = "input_position"


def path(model_dir: str, step: int, process_index: int, process_count: int) -> str:
  return files.join(model_dir, SUBDIR, str(step),
                    f"process-{process_index:05d}-of-{process_count:05d}.bin")


def save(model_dir: str, step: int, state: bytes, process_index: int,
         process_count: int) -> None:
  files.write_atomic(path(model_dir, step, process_index, process_count), state)


def load(model_dir: str, step: int, process_index: int,
         process_count: int) -> Optional[bytes]:
  target = path(model_dir, step, process_index, process_count)
  return files.read_bytes(target) if files.exists(target) else None


def prune(model_dir: str, kept_steps: Iterable[int], process_index: int,
          process_count: int) -> None:
  """Deletes this process's positions of steps older than every kept checkpoint."""
  kept = list(kept_steps)
  if not kept:
    return
  for candidate in files.glob(files.join(model_dir, SUBDIR, "*",
                                         f"process-{process_index:05d}-of-*.bin")):
    step = candidate.parent.name
    if step.isdigit() and int(step) < min(kept):
      files.remove(candidate)
