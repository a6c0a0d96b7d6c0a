"""One file layer for every path the project reads or writes: local disks and gs:// alike.

Paths are `etils.epath.Path`s; gs:// goes through fsspec's gcsfs (the client orbax's metadata
files use too once EPATH_USE_TF is off), so one client serves checkpoints, annotation chunks,
reports and data inputs, and it honours STORAGE_EMULATOR_HOST in tests. `resolve` keeps a URI a
URI: `os.path.abspath('gs://b/x')` would be a local folder named 'gs:'.

An object store has no rename, so `write_atomic` publishes a file in one step on both: a temp
file, fsync and rename on a disk; one upload on an object store, which readers see whole once
it completes, never in part. `write_if_absent` publishes the same way but never replaces a
file: a hard link on a disk, the `ifGenerationMatch=0` precondition on GCS. `read_versioned` and
`write_if_version` are a compare-and-swap: a write replaces only the version that was read (the
object's generation on GCS; on a disk the content's hash, compared under a directory lock).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
import uuid
from typing import Callable, List, Optional, Tuple, Union
from urllib.parse import quote

# tf.io.gfile (epath's default when TensorFlow is installed) would be a second GCS client.
os.environ.setdefault("EPATH_USE_TF", "false")

from etils import epath  # pylint: disable=g-import-not-at-top,wrong-import-position

Path = epath.Path
PathLike = Union[str, os.PathLike]
URI_SCHEMES = ("gs://", "s3://")
# The version of a file that is not there: GCS's generation precondition for "absent".
ABSENT = "0"


class VersionConflict(RuntimeError):
  """A `write_if_version` whose expected version is no longer the file's: someone else wrote it."""


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


def write_if_absent(path: PathLike, data: Union[str, bytes]) -> epath.Path:
  """Publishes `data` at `path` whole, as `write_atomic` does, unless a file is there already:
  then it raises FileExistsError and the file is left as it was (the first writer wins)."""
  path = resolve(path)
  payload = data.encode("utf-8") if isinstance(data, str) else data
  if is_uri(path):
    # gcsfs sends ifGenerationMatch=0 and raises FileExistsError on GCS's 412.
    _object_store(path).pipe_file(os.fspath(path), payload, mode="create")
    return path
  local = os.fspath(path)
  os.makedirs(os.path.dirname(local), exist_ok=True)
  tmp = f"{local}.{uuid.uuid4().hex[:8]}.tmp"
  try:
    with open(tmp, "wb") as f:
      f.write(payload)
      f.flush()
      os.fsync(f.fileno())
    os.link(tmp, local)  # Unlike a rename, fails when `local` exists.
  finally:
    os.remove(tmp)
  _fsync_dir(os.path.dirname(local))
  return path


def read_versioned(path: PathLike) -> Tuple[Optional[bytes], str]:
  """The content of `path` (None if absent) and its version, for `write_if_version`: on GCS the
  generation of the very object downloaded (its x-goog-generation header), on a disk the
  SHA-256 of the content (equal bytes are an equal state to every reader)."""
  path = resolve(path)
  if is_uri(path):
    store = _object_store(path)
    try:
      headers, payload = store.call("GET", store.url(os.fspath(path)))
    except FileNotFoundError:
      return None, ABSENT
    return payload, headers["x-goog-generation"]
  try:
    payload = path.read_bytes()
  except FileNotFoundError:
    return None, ABSENT
  return payload, _content_version(payload)


def _content_version(payload: bytes) -> str:
  return hashlib.sha256(payload).hexdigest()


@contextlib.contextmanager
def _directory_lock(directory: str):
  """An exclusive flock on a local directory: released by the kernel when its holder dies, so a
  killed writer never leaves a stale lock (an O_EXCL lock file would stay and block)."""
  fd = os.open(directory, os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)  # Releases the lock.


def write_if_version(path: PathLike, data: Union[str, bytes], version: str) -> str:
  """Publishes `data` at `path` whole, as `write_atomic` does, only if the file is still at
  `version` (from `read_versioned` or the previous `write_if_version`; ABSENT: only if no file is
  there); returns the new version. Otherwise raises VersionConflict and leaves the file as it is.

  On GCS one upload carries `ifGenerationMatch=<version>`, checked by GCS atomically. On a local
  disk the check and the rename happen under an flock on the directory, which every
  `write_if_version` there takes; plain writes of the same file do not (a local disk only: flock
  on network file systems is not dependable)."""
  path = resolve(path)
  payload = data.encode("utf-8") if isinstance(data, str) else data
  if is_uri(path):
    return _upload_if_generation(path, payload, version)
  local = os.fspath(path)
  os.makedirs(os.path.dirname(local), exist_ok=True)
  with _directory_lock(os.path.dirname(local)):
    current = read_versioned(local)[1]
    if current != version:
      raise VersionConflict(f"{local}: changed since it was read (version {version[:12]}, now "
                            f"{current[:12]})")
    write_atomic(local, payload)
  return _content_version(payload)


def _upload_if_generation(path: epath.Path, payload: bytes, generation: str) -> str:
  """One multipart upload (gcsfs's own, plus a generation precondition it cannot send);
  returns the new object's generation."""
  store = _object_store(path)
  bucket, key, _ = store.split_path(os.fspath(path))
  body = (b"--==0==\nContent-Type: application/json; charset=UTF-8\n\n"
          + json.dumps({"name": key}).encode("utf-8")
          + b"\n--==0==\nContent-Type: application/octet-stream\n\n" + payload + b"\n--==0==--")
  endpoint = store._location  # pylint: disable=protected-access
  try:
    uploaded = store.call(
        "POST", f"{endpoint}/upload/storage/v1/b/{quote(bucket)}/o",
        uploadType="multipart", ifGenerationMatch=generation, data=body, json_out=True,
        headers={"Content-Type": 'multipart/related; boundary="==0=="'})
  except FileExistsError:  # GCS's 412: the live generation is another.
    current, live = read_versioned(path)
    if current == payload:
      return live  # This very upload, retried after its reply was lost.
    raise VersionConflict(f"{path}: changed since it was read (generation {generation}, now "
                          f"{live})") from None
  return str(uploaded["generation"])


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
