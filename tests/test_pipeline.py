"""The main job end to end, shrunken: every stage runs, a killed run resumes without redoing
finished stages, and the TeacherLM effect holds: students given the teacher's annotations beat
students given plain answers (95% CI over paired seeds above zero), while a baseline that reads
only the options stays at chance."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT

SEEDS = (0, 1, 2, 3, 4)
# The main job's task, models, epochs and seeds; two arms and a 600-step teacher (about 6% of
# its chains then name a wrong letter, against none at 800). Fewer seeds or half the creatures
# leave the students' gain inside the noise of a three-seed interval.
SHRUNKEN = [
    f"--gin.PipelineConfig.seeds={SEEDS}",
    "--gin.PipelineConfig.arms=('original', 'teacher_annotated')",
    "--gin.teacher/TrainConfig.num_steps=600",
]


def _command(experiment_dir):
  return [sys.executable, str(REPO_ROOT / "scripts" / "pipeline.py"),
          "--gin_file=gin/pipeline_tiny.gin", f"--experiment_dir={experiment_dir}", *SHRUNKEN]


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # One CPU device, as on a user's machine.
  return env


def test_tiny_pipeline_killed_then_resumed_shows_the_effect(tmp_path):
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
  annotated = [json.loads(line) for line in
               (experiment / "annotations" / "annotations.jsonl").read_text().splitlines()]
  students = [json.loads(line) for line in
              (experiment / "data" / "student.jsonl").read_text().splitlines()]
  assert [r["id"] for r in annotated] == [r["id"] for r in students]  # Each once, in order.

  report = json.loads((experiment / "report" / "report.json").read_text())
  for arm in ("original", "teacher_annotated"):
    assert len(report["arms"][arm]["accuracy"]) == len(SEEDS)
  effect = report["delta"]["teacher_annotated"]
  assert effect["ci95"][0] > 0, report["arms"]
  assert report["shortcut_baseline_accuracy"] == pytest.approx(report["chance"], abs=5)
  assert report["wrong_answer_rate"] <= 0.1
  for image in ("loss.png", "accuracy.png", "teacher_loss.png"):
    assert (experiment / "report" / image).stat().st_size > 0
  assert "| teacher_annotated |" in output  # The Δ table is logged.
  # TensorBoard is on in the main job: the report's loss curves come from the event files.
  for model_dir in ("teacher", "students/original_seed0", "students/teacher_annotated_seed0"):
    assert list((experiment / model_dir / "tensorboard").glob("events.out.tfevents.*")), model_dir
