"""Shared test setup: 8 simulated CPU devices, the real-data directory, HF peers."""
import os

# Must happen before JAX initialises its backends: sharding tests use 8 simulated devices,
# and single-device tests simply run on the first one.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# CPU is where we test; TPU programs are compiled for TPU topologies, never run.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # Test helpers: gcs_emulator, recipes.

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: ahead-of-time compiles of paper-scale configs (CI runs them; "
      "skip locally with -m 'not slow')")


def data_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("TEACHERLM_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture
def shared_data() -> pathlib.Path:
  """The real datasets (../shared/data or $TEACHERLM_DATA_DIR); skips when absent."""
  path = data_dir()
  if not path.is_dir():
    pytest.skip(f"real data directory {path} is absent (set TEACHERLM_DATA_DIR)")
  return path


@pytest.fixture
def onednn_dots() -> None:
  """Skips unless the train step compiles with oneDNN dots here (backend.onednn_dots_supported)."""
  from teacherlm_jax.runtime import backend
  if not backend.onednn_dots_supported():
    pytest.skip("not an Intel CPU with AVX-512 and AMX: the train step keeps YNNPACK dots")


@pytest.fixture(scope="session")
def gcs_emulator():
  """A GCS API server on 127.0.0.1 for this session; this process's clients point at it."""
  import gcs_emulator as emulator_lib  # pylint: disable=g-import-not-at-top
  emulator = emulator_lib.start()
  previous = {name: os.environ.get(name) for name in emulator.env}
  os.environ.update(emulator.env)
  try:
    yield emulator
  finally:
    emulator.stop()
    for name, value in previous.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value


@pytest.fixture
def gcs_dir(gcs_emulator, request):
  """A fresh gs:// prefix of the emulator's bucket, one per test."""
  import re  # pylint: disable=g-import-not-at-top
  import uuid  # pylint: disable=g-import-not-at-top
  name = re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name)[:40]  # No glob characters.
  return gcs_emulator.uri(f"{name}-{uuid.uuid4().hex[:8]}")
