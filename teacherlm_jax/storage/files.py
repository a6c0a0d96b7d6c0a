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

import hashlib
import io
import os
import shutil
import tempfile
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
  return read_bytes(path).decode("utf-8")


def read_bytes(path: PathLike) -> bytes:
  """The whole content, of one version: on an object store a single GET (a file object would
  read ranges, and ranges of an object replaced meanwhile mix two versions)."""
  path = resolve(path)
  if is_uri(path):
    return _object_store(path).cat_file(os.fspath(path))
  return path.read_bytes()


def _object_store(path: PathLike):
  """The fsspec file system of a URI, with its listing cache dropped: other processes write
  the same bucket, and a cached listing would hide their objects from `exists` and `glob`."""
  import fsspec  # pylint: disable=g-import-not-at-top
  scheme = os.fspath(path).split("://")[0]
  # The instance etils.epath uses (fsspec caches one per arguments): one cache to drop.
  store = (fsspec.filesystem("gcs", finalize_on_close=True) if scheme == "gs"
           else fsspec.filesystem(scheme))
  store.invalidate_cache()
  return store


def open_text(path: PathLike, errors: str = "strict"):
  """A UTF-8 text stream of a file to read line by line: a local file as it is read, an object
  (one version of it) from memory. `errors` as for `open`."""
  if is_uri(path):
    return io.StringIO(read_bytes(path).decode("utf-8", errors=errors), newline="")
  return open(resolve(path), encoding="utf-8", errors=errors, newline="")


def exists(path: PathLike) -> bool:
  if is_uri(path):
    return _object_store(path).exists(os.fspath(path))
  return resolve(path).exists()


def glob(pattern: PathLike) -> List[epath.Path]:
  """Paths matching a glob pattern (`*` in any part), sorted."""
  text = os.fspath(pattern)
  if is_uri(text):
    _object_store(text)  # Fresh listings.
  else:
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


def _files_under(directory: epath.Path):
  for child in directory.iterdir():
    if child.is_dir():
      yield from _files_under(child)
    else:
      yield child


def local_copy(path: PathLike) -> str:
  """A local path with `path`'s content (a file or a directory tree), for libraries that only
  open local files (SentencePiece, HF tokenizers and checkpoints); a local path is returned as
  it is. Copies are cached per URI for this machine."""
  if not is_uri(path):
    return os.fspath(resolve(path))
  source = resolve(path)
  key = hashlib.sha256(os.fspath(source).encode("utf-8")).hexdigest()[:16]
  target = os.path.join(tempfile.gettempdir(), "teacherlm_gcs_cache", key, source.name)
  if os.path.exists(target):
    return target
  staging = f"{target}.{uuid.uuid4().hex[:8]}.tmp"
  if source.is_dir():
    for item in _files_under(source):
      local = os.path.join(staging, os.fspath(item)[len(os.fspath(source)) + 1:])
      os.makedirs(os.path.dirname(local), exist_ok=True)
      with open(local, "wb") as f:
        f.write(item.read_bytes())
  else:
    os.makedirs(os.path.dirname(staging), exist_ok=True)
    with open(staging, "wb") as f:
      f.write(source.read_bytes())
  try:
    os.replace(staging, target)
  except OSError:  # Another process placed the same copy first.
    shutil.rmtree(staging, ignore_errors=True)
  return target


def upload(local_path: PathLike, path: PathLike) -> epath.Path:
  """Copies a local file or directory tree (e.g. written by a library that only writes local
  files) to `path`, each file published whole."""
  local, target = os.fspath(local_path), resolve(path)
  if os.path.isdir(local):
    for directory, _, names in os.walk(local):
      for name in names:
        source = os.path.join(directory, name)
        with open(source, "rb") as f:
          write_atomic(target.joinpath(os.path.relpath(source, local)), f.read())
  else:
    with open(local, "rb") as f:
      write_atomic(target, f.read())
  return target


def move_tree(source: PathLike, target: PathLike) -> None:
  """Moves a file or directory tree: a rename on a disk; a copy, then delete on an object
  store (no rename there: readers may briefly see both)."""
  source, target = resolve(source), resolve(target)
  if is_uri(source):
    _object_store(source).mv(os.fspath(source), os.fspath(target), recursive=True)
    return
  os.makedirs(os.path.dirname(os.fspath(target)), exist_ok=True)
  os.replace(source, target)


def wait_until(ready: Callable[[], bool], *, timeout_s: float, poll_s: float = 1.0,
               what: str) -> None:
  """Polls `ready()` until it holds; a TimeoutError says what it waited for."""
  deadline = time.monotonic() + timeout_s
  while not ready():
    if time.monotonic() > deadline:
      raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")
    time.sleep(poll_s)
