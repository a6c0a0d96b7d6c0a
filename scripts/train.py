r"""Trains a model: teacher specialisations, multi-stage SFT, or a student (one entry point).

  python scripts/train.py --gin_file=gin/teacher_sft_tiny.gin --model_dir=/tmp/teacher \
      --gin.TrainConfig.num_steps=200

A student from an annotation job's output, with no pipeline (the data is tokenised with the
student checkpoint's own tokenizer):

  python scripts/train.py --gin_file=gin/student.gin --model_dir=/tmp/student \
      --gin.TrainConfig.init_hf_checkpoint="'/ckpt/opt-1.3b'" \
      --gin.student_mixture.annotations="'/tmp/annotations'" \
      --gin.student_mixture.format="'CMF'" [--gin.student_mixture.qc_action="'skip'"]

Re-running with the same --model_dir resumes from its latest checkpoint. SIGTERM saves a
checkpoint at the current step and exits 0. Multi-host: pass --coordinator_address,
--num_processes and --process_id on every process (omit them on TPU pods, where they are
discovered: pass --distributed), or set them in the environment as
TEACHERLM_COORDINATOR/_NUM_PROCESSES/_PROCESS_ID.
"""

from absl import app
from absl import flags
from absl import logging

from teacherlm_jax import cli

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "checkpoints, metrics and configs")


def parse_gin(gin_files, bindings):
  """Parses gin files and bindings; an unknown name lists the TrainConfig fields."""
  from teacherlm_jax.data import mixtures  # pylint: disable=unused-import  (student_mixture)
  from teacherlm_jax.training import train  # Registers TrainConfig.
  known = ", ".join(f.name for f in train.dataclasses.fields(train.TrainConfig))
  cli.parse(gin_files, bindings, hint=f"TrainConfig fields are: {known}")


def with_student_mixture(config):
  """`config` training on `student_mixture.annotations` when gin sets it, registered for the
  student's own vocabulary."""
  from teacherlm_jax.data import mixtures
  from teacherlm_jax.training import stage_vocab
  if not cli.is_bound("student_mixture.annotations"):
    return config
  task = mixtures.student_mixture(stage_vocab.data_vocabulary(config))
  return config if task is None else config.replace(train_task=task)


def main(argv, gin_bindings=()):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _MODEL_DIR.value:
    raise app.UsageError("--model_dir is required")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file at INFO.
  cli.initialize_distributed()
  from teacherlm_jax.training import train
  parse_gin(cli.GIN_FILES.value, list(cli.GIN_BINDINGS.value) + list(gin_bindings))
  result = train.train(with_student_mixture(train.TrainConfig()), _MODEL_DIR.value)
  status = "preempted" if result["preempted"] else "done"
  print(f"{status}: step {result['step']} in {_MODEL_DIR.value}", flush=True)


if __name__ == "__main__":
  cli.run(main)
