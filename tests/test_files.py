"""storage/files.py: the same calls on a local disk and on gs:// (a real GCS API server)."""
import os
import pathlib

import pytest

from teacherlm_jax.storage import files


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path):
  if request.param == "local":
    return str(tmp_path / "root")
  return request.getfixturevalue("gcs_dir")


def test_write_read_glob_remove(root, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  files.makedirs(files.join(root, "shard-0"))
  files.write_atomic(files.join(root, "shard-0", "chunk-1.jsonl"), '{"id": "a"}\n')
  files.write_atomic(files.join(root, "shard-0", "chunk-1.jsonl"), '{"id": "b"}\n')  # Replaces.
  files.write_atomic(files.join(root, "shard-1", "chunk-2.jsonl"), b"x")
  assert files.read_text(files.join(root, "shard-0", "chunk-1.jsonl")) == '{"id": "b"}\n'
  found = [os.fspath(p) for p in files.glob(files.join(root, "shard-*", "chunk-*.jsonl"))]
  assert found == [files.join(root, "shard-0", "chunk-1.jsonl"),
                   files.join(root, "shard-1", "chunk-2.jsonl")]
  assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path / "root" / "shard-0")
                 ) if not files.is_uri(root) else True
  files.remove(files.join(root, "shard-1", "chunk-2.jsonl"))
  files.remove(files.join(root, "shard-1", "chunk-2.jsonl"))  # Already gone: no error.
  assert not files.exists(files.join(root, "shard-1", "chunk-2.jsonl"))
  assert files.glob(files.join(root, "nothing-*")) == []
  assert not (tmp_path / "gs:").exists()  # A URI never becomes a local folder.


def test_resolve_keeps_uris_and_makes_local_paths_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert os.fspath(files.resolve("gs://b/run/x")) == "gs://b/run/x"
  assert files.join("gs://b/run", "checkpoints", "3") == "gs://b/run/checkpoints/3"
  assert os.fspath(files.resolve("run")) == str(tmp_path / "run")
  assert not pathlib.Path("gs:").exists()


def test_upload_then_local_copy_round_trips_a_directory(root, tmp_path):
  local = tmp_path / "tokenizer"
  (local / "sub").mkdir(parents=True)
  (local / "vocab.json").write_text('{"a": 1}')
  (local / "sub" / "merges.txt").write_bytes(b"a b\n")
  files.upload(local, files.join(root, "tok"))
  copy = pathlib.Path(files.local_copy(files.join(root, "tok")))
  assert (copy / "vocab.json").read_text() == '{"a": 1}'
  assert (copy / "sub" / "merges.txt").read_bytes() == b"a b\n"
  if files.is_uri(root):
    assert files.local_copy(files.join(root, "tok")) == str(copy)  # Cached per URI.
