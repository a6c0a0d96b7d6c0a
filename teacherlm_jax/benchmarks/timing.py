"""Wall-clock timing and settings shared by the side-by-side benchmarks."""
from __future__ import annotations

import time
from typing import Callable, List, Sequence


def best_times(fns: Sequence[Callable[[], object]], repeats: int) -> List[float]:
  """Best wall time of each function; runs alternate so load changes hit every side alike."""
  best = [float("inf")] * len(fns)
  for _ in range(repeats):
    for i, fn in enumerate(fns):
      start = time.perf_counter()
      fn()
      best[i] = min(best[i], time.perf_counter() - start)
  return best


PRECISIONS = ("float32", "bfloat16")


def precision_suffix(precision: str) -> str:
  """The metric-name suffix of a precision ('' for float32, the default rows); checks it."""
  if precision not in PRECISIONS:
    raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
  return "" if precision == "float32" else f", {precision}"
