r"""Trains a model: teacher specialisations, multi-stage SFT, or a student (one entry point).

  python scripts/train.py --gin_file=gin/teacher_sft_tiny.gin --model_dir=/tmp/teacher \
      --gin.TrainConfig.num_steps=200

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


def main(argv, gin_bindings=()):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _MODEL_DIR.value:
    raise app.UsageError("--model_dir is required")
  cli.initialize_distributed()
  from teacherlm_jax.training import train  # Registers TrainConfig before gin parses.
  cli.parse_flags_and_gin(gin_bindings)
  result = train.train(train.TrainConfig(), _MODEL_DIR.value)
  status = "preempted" if result["preempted"] else "done"
  logging.info("%s: step %d in %s", status, result["step"], _MODEL_DIR.value)


if __name__ == "__main__":
  cli.run(main)
