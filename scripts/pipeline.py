r"""Runs the whole TeacherLM pipeline in one experiment directory.

  # The embedded default: the synthetic creatures task, tiny models, 2 CPU cores, no data needed.
  python scripts/pipeline.py --gin_file=gin/pipeline_tiny.gin --experiment_dir=/tmp/teacherlm_tiny
  # Real data (CREAK + FLAN CoT from ../shared/data or $TEACHERLM_DATA_DIR):
  python scripts/pipeline.py --gin_file=gin/pipeline_creak.gin --experiment_dir=/tmp/creak

  # The paper's recipe on pretrained checkpoints (three-stage teacher, students with their own
  # tokenizers): gin/pipeline_pretrained_tiny.gin, gin/pipeline_teacherlm_7b1_tpu.gin.

Stages: data -> vocabulary (only for a teacher from random weights) -> teacher (up to three
stages: multi-task, the annotation kinds, one specialist per kind) -> annotation -> students
(original, teacher_annotated, oracle, shuffled; one per arm and seed, and per pretrained
student checkpoint) -> evaluation -> report. Rerunning with the same --experiment_dir skips
finished stages and resumes the unfinished one. The comparison and Δ tables are printed at the
end and written to {experiment_dir}/report/report.md (with report.json and plots; one report per
pretrained student); docs/results.md explains them.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # pylint: disable=g-import-not-at-top
from absl import logging

from teacherlm_jax import cli

_EXPERIMENT_DIR = flags.DEFINE_string("experiment_dir", None, "Where every stage writes.",
                                      required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Real datasets (default $TEACHERLM_DATA_DIR "
                                "or ../shared/data); only the 'creak' dataset reads it.")


def configure(gin_bindings=()) -> None:
  """Parses what the flags name: gin files, bindings and --gin.X=."""
  from teacherlm_jax.pipeline import pipeline  # pylint: disable=unused-import  (registers it)
  cli.parse_flags_and_gin(gin_bindings)


def main(argv, gin_bindings):
  del argv
  cli.initialize_distributed()
  from teacherlm_jax.data import sources  # pylint: disable=g-import-not-at-top
  from teacherlm_jax.pipeline import pipeline  # pylint: disable=g-import-not-at-top
  if _DATA_DIR.value:
    sources.set_data_dir(_DATA_DIR.value)
  configure(gin_bindings)
  report = pipeline.Pipeline(pipeline.PipelineConfig(), _EXPERIMENT_DIR.value).run()
  logging.info("report: %s", report)


if __name__ == "__main__":
  cli.run(main)
