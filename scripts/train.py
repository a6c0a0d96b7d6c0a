r"""Trains a model: teacher specialisations, multi-stage SFT, or a student (one entry point).

  python scripts/train.py --gin_file=gin/teacher_sft_tiny.gin --model_dir=/tmp/teacher \
      --gin.TrainConfig.num_steps=200

Re-running with the same --model_dir resumes from its latest checkpoint. SIGTERM saves a
checkpoint at the current step and exits 0. Multi-host: pass --coordinator_address,
--num_processes and --process_id on every process (omit them on TPU pods, where they are
discovered: pass --distributed), or set them in the environment as
TEACHERLM_COORDINATOR/_NUM_PROCESSES/_PROCESS_ID.
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging

_GIN_FILES = flags.DEFINE_multi_string("gin_file", [], "gin files, parsed in order")
_GIN_BINDINGS = flags.DEFINE_multi_string(
    "gin_bindings", [], "gin bindings, e.g. 'TrainConfig.num_steps = 10' (also --gin.X=value)")
_MODEL_DIR = flags.DEFINE_string("model_dir", None, "checkpoints, metrics and configs")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the job")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "call jax.distributed.initialize() with auto-detected settings "
    "(TPU pods, SLURM); implied by --coordinator_address or --num_processes > 1")


def split_gin_flags(argv):
  """Turns T5X-style `--gin.NAME=value` arguments into bindings `NAME = value`."""
  rest, bindings = [], []
  for arg in argv:
    if arg.startswith("--gin."):
      name, sep, value = arg[len("--gin."):].partition("=")
      if not sep:
        raise app.UsageError(f"{arg}: expected --gin.NAME=VALUE")
      bindings.append(f"{name} = {value}")
    else:
      rest.append(arg)
  return rest, bindings


def parse_gin(gin_files, bindings):
  """Parses gin files and bindings; unknown names raise a ValueError saying what to change."""
  import gin
  from teacherlm_jax import train  # Registers TrainConfig.
  # `include 'gin/x.gin'` resolves from the repository root whatever the working directory.
  gin.add_config_file_search_path(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    gin.parse_config_files_and_bindings(gin_files, bindings, finalize_config=False)
  except (ValueError, IOError) as e:
    known = ", ".join(f.name for f in train.dataclasses.fields(train.TrainConfig))
    raise ValueError(f"gin configuration error: {e}\nFix the binding (in the gin file or "
                     f"--gin_bindings); TrainConfig fields are: {known}") from e


def main(argv, gin_bindings=()):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _MODEL_DIR.value:
    raise app.UsageError("--model_dir is required")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file at INFO.
  coordinator = _COORDINATOR.value or os.environ.get("TEACHERLM_COORDINATOR")
  num_processes = _NUM_PROCESSES.value or int(os.environ.get("TEACHERLM_NUM_PROCESSES", "0")) \
      or None
  process_id = _PROCESS_ID.value
  if process_id is None and "TEACHERLM_PROCESS_ID" in os.environ:
    process_id = int(os.environ["TEACHERLM_PROCESS_ID"])
  if _DISTRIBUTED.value or coordinator or (num_processes or 1) > 1:
    from teacherlm_jax import partitioning
    partitioning.initialize_distributed(coordinator, num_processes, process_id)
  from teacherlm_jax import train
  parse_gin(_GIN_FILES.value, list(_GIN_BINDINGS.value) + list(gin_bindings))
  result = train.train(train.TrainConfig(), _MODEL_DIR.value)
  status = "preempted" if result["preempted"] else "done"
  print(f"{status}: step {result['step']} in {_MODEL_DIR.value}", flush=True)


if __name__ == "__main__":
  _argv, _bindings = split_gin_flags(sys.argv)
  app.run(lambda argv: main(argv, _bindings), argv=_argv)
