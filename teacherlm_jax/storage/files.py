"""One file layer for every path the project reads or writes: local disks and gs:// alike.

Paths are `etils.epath.Path`s; gs:// goes through fsspec's gcsfs (the client orbax's metadata
files use too once EPATH_USE_TF is off), so one client serves checkpoints, annotation chunks,
reports and data inputs, and it honours STORAGE_EMULATOR_HOST in tests. `resolve` keeps a URI a
URI: `os.path.abspath('gs://b/x')` would be a local folder named 'gs:'.

An object store has no rename, so `write_atomic` publishes a file in one step on both: a temp
file, fsync and rename on a disk; one upload on an object store, which readers see whole once
it completes, never in part.
"""
from __future__ import annotations

import os
import time
import uuid
from typing import Callable, List, Union

# tf.io.gfile (epath's default when TensorFlow is installed) would be a second GCS client.
os.environ.setdefault("EPATH_USE_TF", "false")

from etils import epath  # pylint: disable=g-import-not-at-top,wrong-import-position

Path = epath.Path
PathLike = Union[str, os.PathLike]
URI_SCHEMES = ("gs://", "s3://")


def is_uri(path: PathLike) -> bool:
  """Whether `path` names an object-store object (gs://...) rather than a local file."""
  return os.fspath(path).startswith(URI_SCHEMES)


def resolve(path: PathLike) -> epath.Path:
  """An absolute local path, or the URI unchanged."""
  text = os.fspath(path)
  return epath.Path(text if is_uri(text) else os.path.abspath(text))


def join(path: PathLike, *parts: str) -> str:
  """`path/part/...` as a string, for APIs that take strings (orbax, seqio)."""
  return os.fspath(resolve(path).joinpath(*parts))


def makedirs(path: PathLike) -> epath.Path:
  """Creates a local directory (and parents); object stores have no directories to create."""
  path = resolve(path)
  if not is_uri(path):
    path.mkdir(parents=True, exist_ok=True)
  return path


def _fsync_dir(directory: str) -> None:
  fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def write_atomic(path: PathLike, data: Union[str, bytes]) -> epath.Path:
  """Writes `data` to `path` so that readers see the old content or the new, never a part."""
  path = resolve(path)
  payload = data.encode("utf-8") if isinstance(data, str) else data
  if is_uri(path):
    path.write_bytes(payload)  # One object upload: visible only once complete.
    return path
  local = os.fspath(path)
  os.makedirs(os.path.dirname(local), exist_ok=True)
  # A unique temp name: two writers of one path never share a temp file.
  tmp = f"{local}.{uuid.uuid4().hex[:8]}.tmp"
  with open(tmp, "wb") as f:
    f.write(payload)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, local)
  _fsync_dir(os.path.dirname(local))
  return path


def read_text(path: PathLike) -> str:
  return resolve(path).read_text(encoding="utf-8")


def read_bytes(path: PathLike) -> bytes:
  return resolve(path).read_bytes()


def exists(path: PathLike) -> bool:
  return resolve(path).exists()


def glob(pattern: PathLike) -> List[epath.Path]:
  """Paths matching a glob pattern (`*` in any part), sorted."""
  text = os.fspath(pattern)
  if not is_uri(text):
    text = os.path.abspath(text)
  root, _, rest = text.partition("*")
  parent = root.rsplit("/", 1)[0] or "/"
  relative = text[len(parent):].lstrip("/")
  base = epath.Path(parent)
  if not base.exists():
    return []
  return sorted(base.glob(relative), key=os.fspath)


def remove(path: PathLike) -> None:
  """Deletes a file if it is there (another process may have removed it already)."""
  path = resolve(path)
  try:
    path.unlink()
  except FileNotFoundError:
    pass


def remove_tree(path: PathLike) -> None:
  path = resolve(path)
  if path.exists():
    path.rmtree()


def wait_until(ready: Callable[[], bool], *, timeout_s: float, poll_s: float = 1.0,
               what: str) -> None:
  """Polls `ready()` until it holds; a TimeoutError says what it waited for."""
  deadline = time.monotonic() + timeout_s
  while not ready():
    if time.monotonic() > deadline:
      raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")
    time.sleep(poll_s)
