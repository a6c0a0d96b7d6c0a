r"""Trains a model: teacher specialisations, multi-stage SFT, or a student (one entry point).

  python scripts/train.py --gin_file=gin/teacher_sft_tiny.gin --model_dir=/tmp/teacher \
      --gin.TrainConfig.num_steps=200
  # A pretrained student on an annotation run's output, tokenised with the student
  # checkpoint's own tokenizer (the original:annotated rates and QC action from gin):
  python scripts/train.py --gin_file=gin/students/opt_1.3b.gin --input=/tmp/annotations \
      --model_dir=/tmp/student --gin.ModelSettings.init_hf_checkpoint="'/ckpt/opt-1.3b'" \
      --gin.student_input_mixture.fmt="'CMF'" --gin.student_input_mixture.qc_action="'skip'"
  # A student from random weights takes its vocabulary from gin instead:
  #   --gin.get_vocabulary.spec="'hf:/ckpt/opt-1.3b'"

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
_INPUT = flags.DEFINE_string(
    "input", None, "train a student on annotation output: an annotate.py --output directory "
    "(its merged.jsonl, from annotate.py --merge) or a JSONL glob, mixed with the original data "
    "by student_input_mixture (gin); sets DataConfig.train_task")
MESH_BINDINGS = ("MeshConfig.data", "MeshConfig.fsdp", "MeshConfig.tensor")
_MESH = cli.define_mesh_flag(*MESH_BINDINGS)


def configure(gin_bindings=()) -> None:
  """Parses what the flags name: gin files, bindings, --gin.X=, --mesh and --input."""
  import gin  # pylint: disable=g-import-not-at-top
  from teacherlm_jax.data import mixtures  # pylint: disable=g-import-not-at-top
  from teacherlm_jax.training import train  # pylint: disable=g-import-not-at-top,unused-import
  cli.parse_flags_and_gin(list(gin_bindings) + cli.mesh_bindings(_MESH.value, *MESH_BINDINGS))
  if _INPUT.value:
    gin.bind_parameter("DataConfig.train_task", mixtures.STUDENT_INPUT_MIXTURE)


def main(argv, gin_bindings=()):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _MODEL_DIR.value:
    raise app.UsageError("--model_dir is required")
  cli.initialize_distributed()
  from teacherlm_jax.training import train  # Registers TrainConfig before gin parses.
  configure(gin_bindings)
  config = train.TrainConfig()
  if _INPUT.value:
    from teacherlm_jax.data import mixtures  # pylint: disable=g-import-not-at-top
    from teacherlm_jax.training import stage_vocab  # pylint: disable=g-import-not-at-top
    # The student's data is tokenised with its checkpoint's tokenizer unless gin names one.
    vocabulary = (None if cli.is_bound("student_input_mixture.vocabulary")
                  else stage_vocab.data_vocabulary(config.model))
    mixtures.student_input_mixture(_INPUT.value, **(
        {"vocabulary": vocabulary} if vocabulary is not None else {}))
  result = train.train(config, _MODEL_DIR.value)
  status = "preempted" if result["preempted"] else "done"
  logging.info("%s: step %d in %s", status, result["step"], _MODEL_DIR.value)


if __name__ == "__main__":
  cli.run(main)
