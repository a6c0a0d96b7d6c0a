"""Command-line errors: a gin typo is one usage line that names the binding and its fix."""
import pathlib
import subprocess
import sys

import gin
import pytest
from absl import app

from teacherlm_jax import cli
from teacherlm_jax.training import train  # Registers TrainConfig.  # pylint: disable=unused-import

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def clean_gin():
  yield
  gin.clear_config()  # Other tests build TrainConfig() from gin's defaults.


def _usage_error(files, bindings) -> str:
  with pytest.raises(app.UsageError) as error:
    cli.parse(files, bindings)
  message = str(error.value)
  assert "\n" not in message, message
  return message


def test_gin_file_typo_names_the_binding_its_line_and_the_field_meant(tmp_path):
  gin_file = tmp_path / "x.gin"
  gin_file.write_text("import teacherlm_jax.training.train\n"
                      "DataConfig.seq_len = 32\n"
                      "OptimizerConfig.lr = 3e-4\n")
  assert _usage_error([str(gin_file)], []) == (
      f"gin: unknown binding 'OptimizerConfig.lr' in --gin_file={gin_file} line 3 "
      "(did you mean OptimizerConfig.learning_rate?)")


def test_binding_typos_name_the_binding_and_the_name_meant():
  assert _usage_error([], ["TrainConfig.num_stepz = 3"]) == (
      "gin: unknown binding 'TrainConfig.num_stepz' in --gin_bindings "
      "(did you mean TrainConfig.num_steps?)")
  assert _usage_error([], ["teacher/DataConfg.seq_len = 3"]) == (
      "gin: unknown binding 'teacher/DataConfg.seq_len' in --gin_bindings "
      "(did you mean teacher/DataConfig.seq_len?)")
  # A field that lives in one of TrainConfig's groups names its group.
  assert _usage_error([], ["student/TrainConfig.learning_rate = 1e-5"]) == (
      "gin: unknown binding 'student/TrainConfig.learning_rate' in --gin_bindings "
      "(did you mean student/OptimizerConfig.learning_rate?)")


def test_syntax_errors_and_missing_files_are_one_line_too(tmp_path):
  gin_file = tmp_path / "bad.gin"
  gin_file.write_text("DataConfig.seq_len = 32 +\n")
  assert _usage_error([str(gin_file)], []).startswith(
      f"gin: syntax error in --gin_file={gin_file} line 1")
  assert _usage_error([str(tmp_path / "absent.gin")], []).startswith(
      f"gin: Unable to open file: {tmp_path / 'absent.gin'}")


def test_gin_flags_split_into_bindings():
  assert cli.split_gin_flags(["x", "--gin.DataConfig.seq_len=32", "--model_dir=d"]) == (
      ["x", "--model_dir=d"], ["DataConfig.seq_len = 32"])


def test_train_script_ends_a_gin_typo_with_the_usage_line_not_a_traceback(tmp_path):
  result = subprocess.run(
      [sys.executable, str(REPO / "scripts" / "train.py"), f"--model_dir={tmp_path}",
       "--gin_file=gin/teacher_sft_tiny.gin", "--gin.OptimizerConfig.lr=3e-4"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      "gin: unknown binding 'OptimizerConfig.lr' in --gin_bindings "
      "(did you mean OptimizerConfig.learning_rate?)")


def test_gin_flag_without_a_value_is_a_usage_line_too(tmp_path):
  result = subprocess.run(
      [sys.executable, str(REPO / "scripts" / "train.py"), f"--model_dir={tmp_path}",
       "--gin.TrainConfig.num_steps"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      "--gin.TrainConfig.num_steps: expected --gin.NAME=VALUE")


def test_orbax_info_lines_show_from_verbosity_1_and_warnings_always():
  from absl import logging as absl_logging
  import logging

  def record(level, path):
    return logging.LogRecord("absl", level, path, 1, "message", (), None)

  orbax = "/venv/site-packages/orbax/checkpoint/checkpoint_manager.py"
  progress = "/venv/site-packages/clu/metric_writers/logging_writer.py"
  chatty = cli._ChattyLibraryFilter()  # pylint: disable=protected-access
  previous = logging.getLogger("absl").level  # set_verbosity sets it: other tests log INFO.
  try:
    absl_logging.set_verbosity(0)  # The default: INFO.
    assert not chatty.filter(record(logging.INFO, orbax))
    assert chatty.filter(record(logging.WARNING, orbax))
    assert chatty.filter(record(logging.INFO, progress))
    absl_logging.set_verbosity(1)  # -v 1
    assert chatty.filter(record(logging.INFO, orbax))
  finally:
    logging.getLogger("absl").setLevel(previous)
