"""Runs on gs:// against a real GCS API server on 127.0.0.1 (tests/gcs_emulator.py).

Two training processes write checkpoints to gs://, are killed with -9 and resume to the
parameters of an uninterrupted run; an annotation run reading and writing gs:// is killed with
-9 at several moments and resumed, and holds every id exactly once with the uninterrupted run's
texts; a training run's TensorBoard events are in the bucket at each flush and read back; the
pipeline runs to its report on gs://; no local folder named 'gs:' appears anywhere.
"""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

from teacherlm_jax.annotation import io as annotation_io
from teacherlm_jax.storage import files
from teacherlm_jax.training import metrics as metrics_lib
from teacherlm_jax.training import train

# The tiny teacher, input records and uninterrupted reference annotation of test_annotate.py.
from test_annotate import (  # pylint: disable=g-bad-import-order
    GREEDY, MAX_NEW_TOKENS, NUM_RECORDS, SETTINGS, _same_annotations)
from test_annotate import creak_rows, reference, workdir  # pylint: disable=unused-import  (fixtures)
from test_train_multiprocess import _config as train_multiprocess_config

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
  """test_train_multiprocess's 2-process run, 16 steps, without TensorBoard by default."""
  base = train_multiprocess_config(data_dir, num_steps=16, logging=dict(tensorboard=False))
  return base.replace(**changes)


def _launch_training(config, model_dir, log_path, process_id, port, emulator):
  bindings = [f"--gin_bindings={binding}" for binding in config.gin_bindings()]
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
  reference = train.train(config.replace(mesh=dict(fsdp=8, tensor=1)), str(tmp_path / "local"))
  model_dir = f"{gcs_dir}/run"
  processes, logs = _two_processes(config, model_dir, tmp_path, gcs_emulator, "first")
  committed = f"{model_dir}/checkpoints/4/commit_success.txt"  # orbax's mark of a whole step.
  deadline = time.time() + 900
  try:
    while not files.exists(committed):
      assert all(p.poll() is None for p in processes), logs[0].read_text()[-3000:]
      assert time.time() < deadline, "no checkpoint committed to gs:// in time"
      time.sleep(0.1)
  finally:
    for process in processes:
      process.send_signal(signal.SIGKILL)
      process.wait()
  assert "step 16/16" not in logs[0].read_text(), "finished before the kill"

  processes, logs = _two_processes(config, model_dir, tmp_path, gcs_emulator, "resumed")
  try:
    for process, log in zip(processes, logs):
      assert process.wait(timeout=900) == 0, log.read_text()[-3000:]
  finally:
    for process in processes:  # None left behind when a wait times out.
      if process.poll() is None:
        process.kill()
        process.wait()
  log = logs[0].read_text()
  assert "resuming from gs://" in log
  assert "input: continuing from the position saved at step" in log  # Not replayed.
  assert files.exists(f"{model_dir}/input_position/16/process-00001-of-00002.bin")

  finished = train.train(config.replace(mesh=dict(fsdp=8, tensor=1)), model_dir)
  assert finished["start_step"] == 16
  # gloo sums gradients in another order than one process (see test_train_multiprocess.py).
  for a, b in zip(jax.tree.leaves(finished["state"]["params"]),
                  jax.tree.leaves(reference["state"]["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=5e-5)
  _no_local_gs_folder(REPO, tmp_path, pathlib.Path.cwd())


def _annotate_on_gs(teacher, input_uri, output, *extra):
  bindings = [f"--gin.SamplingConfig.max_new_tokens={MAX_NEW_TOKENS}", *GREEDY] + [
      f"--gin.annotate.{k}={v!r}" for k, v in SETTINGS.items()]
  return subprocess.Popen(
      [sys.executable, str(REPO / "scripts" / "annotate.py"), "--gin_file=gin/annotate.gin",
       f"--model_dir={teacher}", f"--input={input_uri}", f"--output={output}", *bindings,
       *extra],
      cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"},
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _committed_chunks(shard) -> int:
  return len((annotation_io.read_manifest(shard) or {}).get("chunks", []))


def test_annotation_on_gs_killed_at_several_moments_holds_each_id_once(
    workdir, reference, gcs_emulator, gcs_dir, tmp_path):
  _, teacher, records = workdir
  input_uri = f"{gcs_dir}/data/records.jsonl"
  files.upload(records, input_uri)
  output = f"{gcs_dir}/annotations"
  shard = annotation_io.shard_dir(output, 0, 1)
  # Kill once at start-up, then after 1, 3 and 5 committed chunks (of 8), resuming each time.
  for kill_after_chunks in (0, 1, 3, 5):
    process = _annotate_on_gs(teacher, input_uri, output, "--resume")
    deadline = time.time() + 300
    while _committed_chunks(shard) < kill_after_chunks or (
        kill_after_chunks == 0 and time.time() < deadline - 295):
      assert process.poll() is None, process.stdout.read()[-3000:]
      assert time.time() < deadline, f"{kill_after_chunks} chunks not committed in time"
      time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert not (annotation_io.read_manifest(shard) or {"complete": False})["complete"]
  # A chunk that a killed worker wrote but never committed (a repeat of committed records).
  committed = list(annotation_io.iter_shard_records(shard))
  assert 5 <= len(committed) // SETTINGS["chunk_size"] < NUM_RECORDS // SETTINGS["chunk_size"]
  stray = f"{shard}/chunk-{_committed_chunks(shard):06d}-deadbeef.jsonl"
  files.write_atomic(stray, "".join(json.dumps(r) + "\n" for r in committed[:2]))

  process = _annotate_on_gs(teacher, input_uri, output, "--resume")
  out, _ = process.communicate(timeout=300)
  assert process.returncode == 0, out[-3000:]
  assert f'"skipped_already_committed": {len(committed)}' in out
  assert not files.exists(stray)  # Ignored, then deleted.
  merge = subprocess.run(
      [sys.executable, "scripts/annotate.py", "--merge", f"--output={output}",
       "--merge_wait_s=60"], cwd=REPO, capture_output=True, text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
  assert merge.returncode == 0, merge.stderr[-3000:]
  merged = annotation_io.read_jsonl(f"{output}/merged.jsonl")
  assert len(merged) == NUM_RECORDS == len({r["id"] for r in merged})
  _same_annotations(merged, reference[1])
  _no_local_gs_folder(REPO, tmp_path, pathlib.Path.cwd())


def _events_in_bucket(logdir, local_dir) -> dict:
  """tag -> {step: value} of the event files under `logdir` on gs://, each read back from the
  bucket and parsed by TensorFlow's own event reader."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  scalars = {}
  for path in files.glob(f"{logdir}/events.out.tfevents.*"):
    local = local_dir / path.name
    local.write_bytes(files.read_bytes(path))
    for event in tf.compat.v1.train.summary_iterator(str(local)):
      for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name == "scalars":  # Not the hparams.
          scalars.setdefault(value.tag, {})[event.step] = float(
              tf.make_ndarray(value.tensor))
  return scalars


def test_training_on_gs_leaves_its_tensorboard_events_in_the_bucket(
    flan_data, gcs_emulator, gcs_dir, tmp_path):
  model_dir = f"{gcs_dir}/run"
  config = _train_config(flan_data, num_steps=8, logging=dict(every=2, tensorboard=True),
                         checkpoint=dict(every=4), mesh=dict(fsdp=8, tensor=1))
  result = train.train(config, model_dir)
  scalars = _events_in_bucket(metrics_lib.tensorboard_dir(model_dir), tmp_path)
  assert sorted(scalars["train/loss"]) == [2, 4, 6, 8]
  losses = np.asarray(result["losses"]).reshape(4, 2).mean(axis=1)  # Per logged window.
  np.testing.assert_allclose([scalars["train/loss"][s] for s in (2, 4, 6, 8)], losses, rtol=1e-5)
  assert metrics_lib.read_scalars(metrics_lib.tensorboard_dir(model_dir)) == scalars
  _no_local_gs_folder(REPO, tmp_path, pathlib.Path.cwd())


def test_tensorboard_events_on_gs_are_in_the_bucket_at_each_flush(gcs_emulator, gcs_dir,
                                                                   tmp_path):
  logdir = f"{gcs_dir}/tensorboard"
  writer = metrics_lib.create_writer(gcs_dir)
  writer.write_scalars(1, {"train/loss": 2.5})
  writer.flush()  # What the trainer does at each checkpoint: a killed run keeps these.
  assert _events_in_bucket(logdir, tmp_path) == {"train/loss": {1: 2.5}}
  writer.write_scalars(2, {"train/loss": 1.5})
  writer.close()
  assert _events_in_bucket(logdir, tmp_path) == {"train/loss": {1: 2.5, 2: 1.5}}


def test_a_second_commit_of_a_chunk_never_replaces_the_first(gcs_emulator, gcs_dir):
  output = f"{gcs_dir}/annotations"
  shard = annotation_io.shard_dir(output, 0, 1)
  first = annotation_io.ShardWriter(output, 0, 1, {"run": 1}, resume=True)
  # A second writer claims the shard: the first, still running, writes its next chunk but
  # cannot list it; the second numbers its chunk the same and finds the first's there.
  second = annotation_io.ShardWriter(output, 0, 1, {"run": 1}, resume=True)
  with pytest.raises(files.VersionConflict, match="another writer updated this shard"):
    first.commit([{"id": "a", "input_index": 0, "text": "first"}])
  with pytest.raises(FileExistsError, match="another writer of this shard wrote this chunk"):
    second.commit([{"id": "a", "input_index": 0, "text": "second"}])
  assert list(annotation_io.iter_shard_records(shard)) == []  # Neither committed.
  assert files.read_text(f"{shard}/chunk-000000.jsonl").count('"first"') == 1  # Kept.
  # Resumed alone: the unlisted chunk is deleted and its record annotated again.
  third = annotation_io.ShardWriter(output, 0, 1, {"run": 1}, resume=True)
  third.commit([{"id": "a", "input_index": 0, "text": "third"}])
  # The same bytes there already (an upload retried after its reply was lost): accepted, each
  # id still once.
  files.write_if_absent(f"{shard}/chunk-000001.jsonl",
                        annotation_io.to_json({"id": "b", "input_index": 1}) + "\n")
  third.commit([{"id": "b", "input_index": 1}])
  assert [r["id"] for r in annotation_io.iter_shard_records(shard)] == ["a", "b"]


@pytest.fixture(params=["local", "gs"])
def annotation_root(request, tmp_path):
  if request.param == "local":
    return str(tmp_path / "annotations")
  return f"{request.getfixturevalue('gcs_dir')}/annotations"


def test_a_manifest_update_over_another_writers_is_refused(annotation_root):
  output = annotation_root
  shard = annotation_io.shard_dir(output, 0, 1)
  first = annotation_io.ShardWriter(output, 0, 1, {"run": 1}, resume=True)
  first.commit([{"id": "a", "input_index": 0}])
  first.commit([{"id": "b", "input_index": 1}])
  # The first writer is thought dead but runs on; its replacement reads the manifest (a, b)
  # and updates it. The first's next update would list a, b, c and drop what the second lists.
  second = annotation_io.ShardWriter(output, 0, 1, {"run": 1}, resume=True)
  with pytest.raises(files.VersionConflict,
                     match=(r"manifest.json: another writer updated this shard's manifest .*"
                            r"Stop the other writer of shard 0 of 1, then rerun with --resume")):
    first.commit([{"id": "c", "input_index": 2, "text": "first"}])
  with pytest.raises(files.VersionConflict, match="another writer updated this shard"):
    first.finish({})
  assert [r["id"] for r in annotation_io.iter_shard_records(shard)] == ["a", "b"]
  # A writer that read the manifest before the second's update is refused alike.
  _, version_read = annotation_io.read_manifest_versioned(shard)
  second.finish({})
  with pytest.raises(files.VersionConflict):
    files.write_if_version(f"{shard}/manifest.json", '{"run": {}, "chunks": []}', version_read)
  # Resumed once the first is stopped: its unlisted chunk is deleted, c annotated again.
  third = annotation_io.ShardWriter(output, 0, 1, {"run": 1}, resume=True)
  third.commit([{"id": "c", "input_index": 2, "text": "third"}])
  third.finish({})
  assert annotation_io.merge(output, f"{output}/merged.jsonl") == 3
  assert [r.get("text") for r in annotation_io.read_jsonl(f"{output}/merged.jsonl")] == [
      None, None, "third"]


def test_merge_waits_for_every_shard_then_names_the_missing_ones(gcs_emulator, gcs_dir):
  output = f"{gcs_dir}/annotations"
  writers = [annotation_io.ShardWriter(output, i, 2, {"run": 1}, resume=False) for i in range(2)]
  writers[0].commit([{"id": "a", "input_index": 0}])
  writers[0].finish({})
  with pytest.raises(TimeoutError, match=r"still running or killed: \['shard 1 of 2'\]"):
    annotation_io.merge(output, f"{output}/merged.jsonl", wait_s=1)
  writers[1].commit([{"id": "b", "input_index": 1}])
  writers[1].finish({})
  assert annotation_io.merge(output, f"{output}/merged.jsonl", wait_s=1) == 2


# The main job's pipeline shrunk to minutes: two arms, one seed, the fewest creatures, a teacher
# trained just long enough to write some text. TensorBoard stays on, as in the main job: the
# report's loss curves are read back from event files on gs://.
PIPELINE_SHRUNKEN = [
    "--gin.PipelineConfig.seeds=(0,)",
    "--gin.PipelineConfig.arms=('original', 'teacher_annotated')",
    "--gin.PipelineConfig.synthetic_creatures=64",
    "--gin.PipelineConfig.student_epochs=1",
    "--gin.teacher/TrainConfig.num_steps=80",
    "--gin.CheckpointConfig.every=40",
    "--gin.LoggingConfig.every=20",
    "--gin.SamplingConfig.max_new_tokens=24",
    "--gin.annotate.chunk_size=32",
]


def test_pipeline_runs_to_its_report_on_gs(gcs_emulator, gcs_dir, tmp_path):
  experiment = f"{gcs_dir}/exp"
  env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
  env["TMPDIR"] = str(tmp_path / "tmp")  # Where a local path built from a URI would land.
  os.makedirs(env["TMPDIR"])
  result = subprocess.run(
      [sys.executable, str(REPO / "scripts" / "pipeline.py"),
       f"--gin_file={REPO / 'gin' / 'pipeline_tiny.gin'}", f"--experiment_dir={experiment}",
       *PIPELINE_SHRUNKEN],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
  output = result.stdout + result.stderr
  assert result.returncode == 0, output[-4000:]
  report = json.loads(files.read_text(f"{experiment}/report/report.json"))
  assert set(report["arms"]) == {"original", "teacher_annotated"}
  for arm in report["arms"].values():
    assert len(arm["accuracy"]) == 1
  assert len(report["delta"]["teacher_annotated"]["per_seed"]) == 1
  assert report["teacher_loss"], "no teacher loss curve read back from gs://"
  for image in ("loss.png", "accuracy.png", "teacher_loss.png"):
    assert files.read_bytes(f"{experiment}/report/{image}")[:4] == b"\x89PNG"
  annotated = annotation_io.read_jsonl(f"{experiment}/annotations/annotations.jsonl")
  students = annotation_io.read_jsonl(f"{experiment}/data/student.jsonl")
  assert [r["id"] for r in annotated] == [r["id"] for r in students]  # Each once, in order.
  assert files.exists(f"{experiment}/teacher/checkpoints/80/commit_success.txt")
  for model_dir in ("teacher", "students/original_seed0", "students/teacher_annotated_seed0"):
    assert files.glob(f"{experiment}/{model_dir}/tensorboard/events.out.tfevents.*"), model_dir
  _no_local_gs_folder(REPO, pathlib.Path(tempfile.gettempdir()))
  assert not list(tmp_path.rglob("gs:")), list(tmp_path.rglob("gs:"))  # cwd and TMPDIR.
