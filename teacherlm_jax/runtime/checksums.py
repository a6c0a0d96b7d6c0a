"""Checksums of array trees, computed on device: what a saved checkpoint is verified against.

Orbax checks a checkpoint's structure but not its bytes: a bit flipped on disk restores as a
valid-looking array (NaN, or 3e38 in an embedding). Each array here gets two 32-bit sums of its
bits, one weighted by odd position weights, so any single flipped bit changes it. They are
computed where the array lives (sharded, every process alike, no host copy of the weights) and
compared after a restore.
"""
from __future__ import annotations

from typing import Any, Dict, List

import jax
import jax.numpy as jnp
import numpy as np

_GOLDEN = np.uint32(0x9E3779B9)


def _words(x: jax.Array) -> jax.Array:
  """The array's bits as uint32 of its shape (narrower types widened; 8-byte ones split along
  a last axis of 2). No reshape: a flattened sharded array would be gathered first."""
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32)


def _positions(shape) -> jax.Array:
  """Row-major element numbers (mod 2**32) of an array of `shape`, built from iotas."""
  index, stride = jnp.zeros(shape, jnp.uint32), 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
    stride = stride * shape[axis] % 2**32
  return index


def _array_sums(x: jax.Array):
  words = _words(x)
  index = _positions(words.shape)
  weighted = jnp.sum(words * (2 * index + 1), dtype=jnp.uint32)
  rotated = (words << 13) | (words >> 19)
  mixed = jnp.sum(rotated ^ (index * _GOLDEN), dtype=jnp.uint32)
  return weighted, mixed


_tree_sums = jax.jit(lambda tree: jax.tree.map(_array_sums, tree))


def _scalar(x: jax.Array) -> int:
  # A scalar is whole on every device, also when the array spans processes.
  return int(np.asarray(x.addressable_data(0)))


def of_tree(tree: Any) -> Dict[str, str]:
  """{array path: 'weighted-mixed' hex} for every array of `tree` (every process calls)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  sums = jax.tree_util.tree_leaves(_tree_sums([leaf for _, leaf in leaves]))
  return {jax.tree_util.keystr(path): f"{_scalar(a):08x}-{_scalar(b):08x}"
          for (path, _), a, b in zip(leaves, sums[0::2], sums[1::2])}


def mismatches(saved: Dict[str, str], tree: Any) -> List[str]:
  """Paths whose arrays in `tree` do not match `saved` (missing or extra arrays included)."""
  now = of_tree(tree)
  return sorted(path for path in set(saved) | set(now) if saved.get(path) != now.get(path))
