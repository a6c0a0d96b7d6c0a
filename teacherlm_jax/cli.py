"""absl + gin + multi-host glue shared by every `scripts/*.py` entry point (T5X conventions).

  --gin_file=gin/x.gin            parsed in order; `include 'gin/y.gin'` resolves from the repo
  --gin_bindings='A.b = 1'        repeated
  --gin.A.b=1                     T5X-style shorthand for a binding
  --coordinator_address / --num_processes / --process_id / --distributed
                                  multi-host start-up (or TEACHERLM_COORDINATOR,
                                  TEACHERLM_NUM_PROCESSES, TEACHERLM_PROCESS_ID)
  --cpu_devices=N                 split the host CPU into N JAX devices (a mesh over cores)

`run(main)` splits the `--gin.X=` arguments off before absl parses flags, applies
--cpu_devices and passes them to `main(argv, gin_bindings)`; `parse(files, bindings)` parses
everything and turns gin's errors into one message that says which binding to fix;
`initialize_distributed()` starts JAX's multi-process runtime when the flags or environment
ask for it.
"""
from __future__ import annotations

import os
import pathlib
import sys
from typing import Callable, List, Sequence, Tuple

from absl import app
from absl import flags

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

GIN_FILES = flags.DEFINE_multi_string("gin_file", [], "gin files, parsed in order")
GIN_BINDINGS = flags.DEFINE_multi_string(
    "gin_bindings", [], "gin bindings, e.g. 'TrainConfig.num_steps = 10' (also --gin.X=value)")
COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the job")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index")
DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "call jax.distributed.initialize() with auto-detected settings "
    "(TPU pods, SLURM); implied by --coordinator_address or --num_processes > 1")
CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", None, "Split the host CPU into this many JAX devices (jax_num_cpu_devices) "
    "so that a mesh over them puts every core to work, e.g. --cpu_devices=2 with "
    "--gin.annotate.mesh_shape='(1, 1, 2)'. XLA:CPU runs the small matmuls of a batched "
    "decode step on one core; a tensor mesh splits them over cores. No effect on TPU/GPU.")


def split_gin_flags(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
  """(argv without `--gin.NAME=value` arguments, bindings 'NAME = value')."""
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


def parse(gin_files: Sequence[str], bindings: Sequence[str], *, hint: str = "") -> None:
  """Parses gin files then bindings; errors name the offending binding and what to change."""
  import gin  # pylint: disable=g-import-not-at-top
  gin.add_config_file_search_path(str(REPO_ROOT))
  try:
    gin.parse_config_files_and_bindings(list(gin_files), list(bindings), finalize_config=False)
  except (ValueError, IOError, KeyError) as e:
    raise ValueError(f"gin configuration error: {e}\nFix the binding (in the gin file or "
                     "--gin_bindings / --gin.NAME=value); unknown names are typos or bindings "
                     f"for a module this script does not import. {hint}".rstrip()) from e


def is_bound(name: str) -> bool:
  """Whether the parsed gin configuration binds `name` ('configurable.parameter')."""
  import gin  # pylint: disable=g-import-not-at-top
  try:
    gin.query_parameter(name)
  except ValueError:
    return False
  return True


def parse_flags_and_gin(gin_bindings: Sequence[str], *, hint: str = "") -> None:
  """Parses --gin_file / --gin_bindings flags plus the split-off `--gin.X=` bindings."""
  parse(GIN_FILES.value, list(GIN_BINDINGS.value) + list(gin_bindings), hint=hint)


def initialize_distributed(force: bool = False) -> bool:
  """Starts `jax.distributed` when the flags/environment ask for it (once); returns whether
  this is a multi-process run. Must run before any JAX call that touches devices."""
  import jax  # pylint: disable=g-import-not-at-top
  coordinator = COORDINATOR.value or os.environ.get("TEACHERLM_COORDINATOR")
  num_processes = NUM_PROCESSES.value or int(os.environ.get("TEACHERLM_NUM_PROCESSES", "0"))
  process_id = PROCESS_ID.value
  if process_id is None and "TEACHERLM_PROCESS_ID" in os.environ:
    process_id = int(os.environ["TEACHERLM_PROCESS_ID"])
  wanted = force or DISTRIBUTED.value or bool(coordinator) or num_processes > 1
  if not wanted:
    return False
  if jax.distributed.is_initialized():  # e.g. tpu/run_multihost.py started it already.
    return True
  from teacherlm_jax.runtime import partitioning  # pylint: disable=g-import-not-at-top
  partitioning.initialize_distributed(coordinator, num_processes or None, process_id)
  return True


def configure_cpu_devices() -> None:
  """Applies --cpu_devices; must run before JAX starts its backends (JAX says so otherwise)."""
  if CPU_DEVICES.value is None:
    return
  if CPU_DEVICES.value < 1:
    raise app.UsageError(f"--cpu_devices={CPU_DEVICES.value}: expected a count >= 1")
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_num_cpu_devices", CPU_DEVICES.value)


def run(main: Callable[..., None]) -> None:
  """`app.run` for a `main(argv, gin_bindings)` that accepts T5X-style `--gin.X=` flags."""
  argv, bindings = split_gin_flags(sys.argv)

  def start(remaining_argv):
    configure_cpu_devices()
    main(remaining_argv, bindings)

  app.run(start, argv=argv)
