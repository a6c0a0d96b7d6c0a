"""Runs on gs:// against a real GCS API server on 127.0.0.1 (tests/gcs_emulator.py).

Two training processes write checkpoints to gs://, are killed with -9 and resume to the
parameters of an uninterrupted run; no local folder named 'gs:' appears anywhere.
"""
import dataclasses
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from teacherlm_jax.storage import files
from teacherlm_jax.training import train
from teacherlm_jax.training import train_data

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def flan_data():
  from conftest import data_dir
  if not data_dir().is_dir():
    pytest.skip(f"real data directory {data_dir()} is absent (set TEACHERLM_DATA_DIR)")
  return data_dir()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _no_local_gs_folder(*roots: pathlib.Path) -> None:
  for root in roots:
    assert not (root / "gs:").exists(), f"a local folder {root / 'gs:'} was created"


def _train_config(data_dir, **changes):
  base = dict(model="tiny-bloom", train_task=train_data.FLAN_COT_BYTES_TASK, eval_batches=0,
              data_dir=str(data_dir), seq_len=64, batch_size=8, learning_rate=3e-3,
              schedule="constant", num_steps=16, log_every=1, checkpoint_every=4,
              keep_checkpoints=100, mesh_data=1, mesh_fsdp=4, mesh_tensor=2,
              peak_tflops_per_device=1.0, tensorboard=False)
  return train.TrainConfig(**{**base, **changes})


def _launch_training(config, model_dir, log_path, process_id, port, emulator):
  bindings = [f"--gin_bindings=TrainConfig.{f.name} = {getattr(config, f.name)!r}"
              for f in dataclasses.fields(config)]
  env = {**os.environ, **emulator.env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
  with open(log_path, "w") as log:
    return subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "train.py"), f"--model_dir={model_dir}",
         *bindings, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
         f"--process_id={process_id}"],
        stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO), env=env)


def _two_processes(config, model_dir, tmp_path, emulator, name):
  port = _free_port()
  logs = [tmp_path / f"{name}_{i}.log" for i in range(2)]
  return [_launch_training(config, model_dir, logs[i], i, port, emulator)
          for i in range(2)], logs


def test_two_processes_train_on_gs_are_killed_and_resume_like_one_run(
    flan_data, gcs_emulator, gcs_dir, tmp_path):
  config = _train_config(flan_data)
  reference = train.train(config.replace(mesh_fsdp=8, mesh_tensor=1), str(tmp_path / "local"))
  model_dir = f"{gcs_dir}/run"
  processes, logs = _two_processes(config, model_dir, tmp_path, gcs_emulator, "first")
  committed = f"{model_dir}/checkpoints/4/commit_success.txt"  # orbax's mark of a whole step.
  deadline = time.time() + 400
  while not files.exists(committed):
    assert all(p.poll() is None for p in processes), logs[0].read_text()[-3000:]
    assert time.time() < deadline, "no checkpoint committed to gs:// in time"
    time.sleep(0.1)
  for process in processes:
    process.send_signal(signal.SIGKILL)
    process.wait()
  assert "step 16/16" not in logs[0].read_text(), "finished before the kill"

  processes, logs = _two_processes(config, model_dir, tmp_path, gcs_emulator, "resumed")
  for process, log in zip(processes, logs):
    assert process.wait(timeout=400) == 0, log.read_text()[-3000:]
  log = logs[0].read_text()
  assert "resuming from gs://" in log
  assert "input: continuing from the position saved at step" in log  # Not replayed.
  assert files.exists(f"{model_dir}/input_position/16/process-00001-of-00002.bin")

  finished = train.train(config.replace(mesh_fsdp=8, mesh_tensor=1), model_dir)
  assert finished["start_step"] == 16
  # gloo sums gradients in another order than one process (see test_train_multiprocess.py).
  for a, b in zip(jax.tree.leaves(finished["state"]["params"]),
                  jax.tree.leaves(reference["state"]["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=5e-5)
  _no_local_gs_folder(REPO, tmp_path, pathlib.Path.cwd())
