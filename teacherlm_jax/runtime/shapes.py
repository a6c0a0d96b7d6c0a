"""Padded lengths: the few shapes a jitted function is compiled for, whatever the inputs."""
from __future__ import annotations

import math
from typing import Optional


def bucket_length(length: int, minimum: int = 8, step: Optional[int] = None) -> int:
  """The smallest power of two >= `length` and >= `minimum`; with `step`, past `step` the
  smallest multiple of `step` instead, which wastes at most `step` positions on long inputs
  (attention cost grows with the square of them)."""
  if step is not None and length > step:
    return math.ceil(length / step) * step
  return max(minimum, 1 << max(0, int(length) - 1).bit_length())
