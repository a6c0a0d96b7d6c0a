"""scripts/train.py in real processes: 2-process training, SIGTERM to both, kill -9 + resume.

Every run is the same tiny config on real FLAN CoT data (constant learning rate, so runs of
different lengths agree step by step). One uninterrupted single-process run is the reference.
"""
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from teacherlm_jax.runtime import checkpointing
from teacherlm_jax.training import metrics
from teacherlm_jax.training import train
from teacherlm_jax.training import train_config
from teacherlm_jax.training import train_data

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 12


def _config(data_dir, **changes):
  base = train_config.TrainConfig(
      model=train_config.ModelSettings(preset="tiny-bloom"),
      data=train_config.DataConfig(train_task=train_data.FLAN_COT_BYTES_TASK,
                                   data_dir=str(data_dir), seq_len=64, batch_size=8),
      optimizer=train_config.OptimizerConfig(learning_rate=3e-3, schedule="constant"),
      mesh=train_config.MeshConfig(data=1, fsdp=4, tensor=2),
      checkpoint=train_config.CheckpointConfig(every=4, keep=100),
      logging=train_config.LoggingConfig(every=1, peak_tflops_per_device=1.0),
      num_steps=NUM_STEPS, eval_batches=0)
  return base.replace(**changes)


def _launch(config, model_dir, log_path, devices=8, process_id=None, num_processes=None,
            port=None):
  bindings = [f"--gin_bindings={binding}" for binding in config.gin_bindings()]
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
  args = [sys.executable, str(REPO / "scripts" / "train.py"), f"--model_dir={model_dir}",
          *bindings]
  if num_processes:
    args += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
             f"--process_id={process_id}"]
  log = open(log_path, "w")
  return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO), env=env)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait(process, log_path, timeout=240):
  try:
    rc = process.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    process.kill()
    raise AssertionError(f"timed out; log:\n{pathlib.Path(log_path).read_text()[-3000:]}")
  return rc


def _train_losses(model_dir):
  """step -> training loss, from the run's TensorBoard event files."""
  return metrics.read_scalars(metrics.tensorboard_dir(str(model_dir)))["train/loss"]


def _params(state):
  return jax.tree.map(np.asarray, state["params"])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  from conftest import data_dir
  if not data_dir().is_dir():
    pytest.skip(f"real data directory {data_dir()} is absent (set TEACHERLM_DATA_DIR)")
  return data_dir()


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
  """One uninterrupted single-process run with checkpoints every 4 steps."""
  shared_data = data
  model_dir = tmp_path_factory.mktemp("reference")
  result = train.train(_config(shared_data), str(model_dir))
  losses = _train_losses(model_dir)
  assert sorted(losses) == list(range(1, NUM_STEPS + 1))
  return model_dir, losses, _params(result["state"])


def test_two_processes_train_like_one_and_checkpoints_move_between_settings(
    shared_data, reference, tmp_path):
  ref_dir, ref_losses, ref_params = reference
  model_dir = tmp_path / "run"
  # Start from the single-process checkpoint at step 4 ...
  (model_dir / "checkpoints").mkdir(parents=True)
  shutil.copytree(ref_dir / "checkpoints" / "4", model_dir / "checkpoints" / "4")
  # ... continue to step 8 in 2 processes of 4 devices each (same 8-device mesh) ...
  config = _config(shared_data, num_steps=8)
  port = _free_port()
  logs = [tmp_path / f"process_{i}.log" for i in range(2)]
  processes = [_launch(config, model_dir, logs[i], devices=4, process_id=i, num_processes=2,
                       port=port) for i in range(2)]
  codes = [_wait(p, log) for p, log in zip(processes, logs)]
  assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
  assert "2 process(es)" in logs[0].read_text()
  assert "(8/8)" in logs[0].read_text()  # clu's progress report.
  # Event files from process 0 only; process 1 logs its metrics.
  assert len(os.listdir(model_dir / "tensorboard")) == 1
  assert "train/loss=" in logs[1].read_text()
  losses = _train_losses(model_dir)
  assert sorted(losses) == [5, 6, 7, 8]
  for step in (5, 6, 7, 8):
    np.testing.assert_allclose(losses[step], ref_losses[step], rtol=1e-5)
  assert checkpointing.Checkpointer(str(model_dir)).all_steps() == [4, 8]
  # ... and finish in one process from the 2-process checkpoint.
  result = train.train(config.replace(num_steps=NUM_STEPS), str(model_dir))
  assert result["start_step"] == 8
  losses = _train_losses(model_dir)
  np.testing.assert_allclose([losses[s] for s in range(5, NUM_STEPS + 1)],
                             [ref_losses[s] for s in range(5, NUM_STEPS + 1)], rtol=1e-5)
  final = _params(result["state"])
  # gloo sums gradients in another order; Adam's 1/sqrt(v) turns that last-bit noise in
  # near-zero gradients into weight differences of up to ~lr * 1e-2 after a few steps.
  for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=5e-5)
  assert len(os.listdir(model_dir / "tensorboard")) == 2  # Process 0 of each run only.


def test_kill_9_then_resume_gives_the_uninterrupted_params(shared_data, reference, tmp_path):
  _, ref_losses, ref_params = reference
  model_dir = tmp_path / "run"
  config = _config(shared_data, checkpoint=dict(every=2))
  log = tmp_path / "train.log"
  process = _launch(config, model_dir, log)
  checkpoints = model_dir / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline and process.poll() is None:
    steps = [int(n) for n in os.listdir(checkpoints) if n.isdigit()] if checkpoints.is_dir() else []
    if steps:
      break
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert process.returncode == -signal.SIGKILL, log.read_text()[-3000:]
  killed_at = checkpointing.Checkpointer(str(model_dir)).latest_step()
  assert killed_at is not None and killed_at < NUM_STEPS, killed_at
  result = train.train(config, str(model_dir))
  assert result["start_step"] == killed_at
  np.testing.assert_allclose(result["losses"],
                             [ref_losses[s] for s in range(killed_at + 1, NUM_STEPS + 1)],
                             rtol=1e-6)
  for a, b in zip(jax.tree.leaves(_params(result["state"])), jax.tree.leaves(ref_params)):
    np.testing.assert_array_equal(a, b)


def _sigterm_two_processes(config, model_dir, tmp_path, after_step: int) -> int:
  """Trains in 2 processes, sends both SIGTERM once process 0 logged `after_step`, checks that
  both exit 0 having saved one checkpoint together, and returns its step."""
  port = _free_port()
  logs = [tmp_path / f"process_{i}.log" for i in range(2)]
  processes = [_launch(config, model_dir, logs[i], devices=4, process_id=i, num_processes=2,
                       port=port) for i in range(2)]
  deadline = time.time() + 240
  while f"({after_step}/{config.num_steps})" not in logs[0].read_text():  # clu's progress.
    assert all(p.poll() is None for p in processes), logs[0].read_text()[-3000:]
    assert time.time() < deadline, f"training did not reach step {after_step} in time"
    time.sleep(0.05)
  for process in processes:
    process.send_signal(signal.SIGTERM)
  codes = [_wait(p, log) for p, log in zip(processes, logs)]
  texts = [log.read_text() for log in logs]
  assert codes == [0, 0], "\n".join(text[-3000:] for text in texts)
  saved = checkpointing.Checkpointer(str(model_dir)).all_steps()
  assert len(saved) == 1 and after_step <= saved[0] < config.num_steps, saved
  for text in texts:
    assert f"preempted: step {saved[0]}" in text
  return saved[0]


def test_sigterm_to_both_processes_saves_one_checkpoint_at_the_step_they_agree_on(
    shared_data, reference, tmp_path):
  """TPU preemption sends SIGTERM to every host: jax.distributed's preemption sync point makes
  both processes stop after the same step, save it together and exit 0."""
  _, ref_losses, _ = reference
  model_dir = tmp_path / "run"
  config = _config(shared_data, num_steps=1000, checkpoint=dict(every=1000))
  saved = _sigterm_two_processes(config, model_dir, tmp_path, after_step=3)
  losses = _train_losses(model_dir)
  steps = range(1, min(saved, NUM_STEPS) + 1)  # The same run as the reference's so far.
  np.testing.assert_allclose([losses[s] for s in steps], [ref_losses[s] for s in steps],
                             rtol=1e-5)


def test_two_processes_with_several_steps_per_call_stop_together_on_sigterm(
    shared_data, tmp_path):
  """Calls of 2 steps (batches stacked per process): both processes check the preemption sync
  point at every step of a call, save the step after that call together, and that checkpoint
  holds the parameters one process reaches in single steps."""
  model_dir = tmp_path / "run"
  config = _config(shared_data, num_steps=1000, steps_per_call=2, checkpoint=dict(every=1000),
                   logging=dict(every=2))
  saved = _sigterm_two_processes(config, model_dir, tmp_path, after_step=4)
  assert saved % 2 == 0, saved  # After a call.
  restored = train.train(config.replace(num_steps=saved), str(model_dir))
  assert restored["start_step"] == saved
  single = train.train(_config(shared_data, num_steps=saved, checkpoint=dict(every=1000)),
                       str(tmp_path / "single"))
  # gloo's sums in another order: as in the two-process test above.
  for a, b in zip(jax.tree.leaves(_params(restored["state"])),
                  jax.tree.leaves(_params(single["state"]))):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=5e-5)


def test_per_process_input_builds_the_global_batch_from_each_process_shard(
    shared_data, tmp_path):
  """input_sharding='per_process': each process reads its own data shard and the global batch
  holds both. One process fed the two shards' batches together trains the same steps (same
  losses; they differ if a process reads the other's shard or the same one twice)."""
  steps = 3
  config = _config(shared_data, num_steps=steps, data=dict(input_sharding="per_process"))
  port = _free_port()
  logs = [tmp_path / f"process_{i}.log" for i in range(2)]
  processes = [_launch(config, tmp_path / "run", logs[i], devices=4, process_id=i,
                       num_processes=2, port=port) for i in range(2)]
  codes = [_wait(p, log) for p, log in zip(processes, logs)]
  assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
  losses = _train_losses(tmp_path / "run")

  task = train_data.register_flan_cot_bytes_task(str(shared_data))
  half = config.data.batch_size // 2
  shards = [train_data.SeqioBatches(
      task, "train", config.data.seq_len, config.data.batch_size, seed=config.data.seed,
      input_sharding="per_process", process_rows=(i * half, (i + 1) * half), process_index=i,
      process_count=2) for i in range(2)]

  def global_batches(start):
    for rows in zip(*(shard(start) for shard in shards)):
      yield {key: np.concatenate([r[key] for r in rows]) for key in rows[0]}

  first = next(global_batches(0))
  assert first["tokens"].shape == (config.data.batch_size, config.data.seq_len)
  assert not np.array_equal(first["tokens"][:half], first["tokens"][half:])
  result = train.train(config.replace(data=dict(input_sharding="global")),
                       str(tmp_path / "one_process"), train_batches=global_batches)
  np.testing.assert_allclose(result["losses"], [losses[s] for s in range(1, steps + 1)],
                             rtol=1e-5)
