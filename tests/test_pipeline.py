"""The main job end to end (shrunken): every stage runs, a killed run resumes without redoing
finished stages, and the report holds both students' accuracy."""
import json
import os
import signal
import subprocess
import sys
import time


from conftest import REPO_ROOT

SHRUNKEN = [
    "--gin.PipelineConfig.seeds=(0,)",
    "--gin.PipelineConfig.synthetic_sizes={'eval': 40, 'teacher': 150, 'student': 40}",
    "--gin.teacher/TrainConfig.num_steps=100",
    "--gin.student/TrainConfig.num_steps=15",
    "--gin.TrainConfig.checkpoint_every=10",
    "--gin.TrainConfig.batch_size=8",
    "--gin.TrainConfig.seq_len=128",
    "--gin.SamplingConfig.max_new_tokens=24",
]


def _command(experiment_dir):
  return [sys.executable, str(REPO_ROOT / "scripts" / "pipeline.py"),
          "--gin_file=gin/pipeline_tiny.gin", f"--experiment_dir={experiment_dir}", *SHRUNKEN]


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # One CPU device, as on a user's machine.
  return env


def test_tiny_pipeline_killed_then_resumed(tmp_path):
  experiment = tmp_path / "exp"
  first = subprocess.Popen(_command(experiment), cwd=REPO_ROOT, env=_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  teacher_done = experiment / "teacher" / "DONE.json"
  deadline = time.time() + 600
  while not teacher_done.exists() and first.poll() is None and time.time() < deadline:
    time.sleep(0.5)
  assert teacher_done.exists(), first.communicate()[0][-3000:]
  first.send_signal(signal.SIGKILL)  # Mid-pipeline: annotation (or later) is running.
  first.wait()
  teacher_mtime = teacher_done.stat().st_mtime

  second = subprocess.run(_command(experiment), cwd=REPO_ROOT, env=_env(), capture_output=True,
                          text=True, timeout=900)
  output = second.stdout + second.stderr
  assert second.returncode == 0, output[-4000:]
  assert "stage teacher: already done, skipped" in output
  assert "stage data: already done, skipped" in output
  assert teacher_done.stat().st_mtime == teacher_mtime

  report = json.loads((experiment / "report" / "report.json").read_text())
  for variant in ("original", "annotated"):
    accuracy = report["accuracy"][variant]["synthetic_eval"]
    assert len(accuracy) == 1 and 0.0 <= accuracy[0] <= 1.0
  assert (experiment / "report" / "loss.png").stat().st_size > 0
  assert (experiment / "report" / "accuracy.png").stat().st_size > 0
  annotated = [json.loads(line) for line in
               (experiment / "annotations" / "annotations.jsonl").read_text().splitlines()]
  students = [json.loads(line) for line in
              (experiment / "data" / "student.jsonl").read_text().splitlines()]
  assert [r["id"] for r in annotated] == [r["id"] for r in students]  # Each once, in order.
  assert len(students) == 40
  assert "| synthetic_eval |" in output  # The comparison table is logged.
  # TensorBoard is on in the main job: the report's loss curves come from the event files.
  for model_dir in ("teacher", "students/original_seed0", "students/annotated_seed0"):
    assert list((experiment / model_dir / "tensorboard").glob("events.out.tfevents.*")), model_dir
