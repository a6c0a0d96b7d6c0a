r"""Runs the whole TeacherLM pipeline in one experiment directory.

  # The embedded default: a synthetic arithmetic task, tiny models, 2 CPU cores, no data needed.
  python scripts/pipeline.py --gin_file=gin/pipeline_tiny.gin --experiment_dir=/tmp/teacherlm_tiny
  # Real data (CREAK + FLAN CoT from ../shared/data or $TEACHERLM_DATA_DIR):
  python scripts/pipeline.py --gin_file=gin/pipeline_creak.gin --experiment_dir=/tmp/creak

  # The paper's recipe on pretrained checkpoints (three-stage teacher, students with their own
  # tokenizers): gin/pipeline_pretrained_tiny.gin, gin/pipeline_teacherlm_7b1_tpu.gin.

Stages: data -> vocabulary (only for a teacher from random weights) -> teacher (up to three
stages: multi-task, all kinds, one specialist per kind) -> annotation -> students (original,
annotated; one per seed and student checkpoint) -> evaluation -> report. Rerunning with the same --experiment_dir skips finished
stages and resumes the unfinished one. The comparison table is printed at the end and written
to {experiment_dir}/report/report.md with plots.
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


def main(argv, gin_bindings):
  del argv
  cli.initialize_distributed()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")  # tf.data only; keep accelerators for JAX.
  from teacherlm_jax.data import sources  # pylint: disable=g-import-not-at-top
  from teacherlm_jax.pipeline import pipeline  # pylint: disable=g-import-not-at-top
  if _DATA_DIR.value:
    sources.set_data_dir(_DATA_DIR.value)
  cli.parse_flags_and_gin(gin_bindings)
  logging.set_verbosity(logging.WARNING)
  pipeline.Pipeline(pipeline.PipelineConfig(), _EXPERIMENT_DIR.value).run()


if __name__ == "__main__":
  cli.run(main)
