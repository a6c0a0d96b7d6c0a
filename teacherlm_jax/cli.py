"""absl + gin + multi-host glue shared by every `scripts/*.py` entry point (T5X conventions).

  --gin_file=gin/x.gin            parsed in order; `include 'gin/y.gin'` resolves from the repo
  --gin_bindings='A.b = 1'        repeated
  --gin.A.b=1                     T5X-style shorthand for a binding
  --coordinator_address / --num_processes / --process_id / --distributed
                                  multi-host start-up (or TEACHERLM_COORDINATOR,
                                  TEACHERLM_NUM_PROCESSES, TEACHERLM_PROCESS_ID)
  --cpu_devices=N                 split the host CPU into N JAX devices (a mesh over cores)
  --mesh=DATA,FSDP,TENSOR         (scripts that define it) the mesh, as the script's gin binding

`run(main)` splits the `--gin.X=` arguments off before absl parses flags, applies
--cpu_devices and passes them to `main(argv, gin_bindings)`; `parse(files, bindings)` parses
everything and turns gin's errors into a one-line `app.UsageError` that names the binding, where
it is and the name it probably meant; `initialize_distributed()` starts JAX's multi-process
runtime when the flags or environment ask for it. Logging is absl's: INFO by default (without
orbax's per-file lines), `-v 1` for those and more, `--verbosity=-1` for warnings only.
"""
from __future__ import annotations

import difflib
import inspect
import logging
import os
import pathlib
import re
import sys
from typing import Callable, List, Optional, Sequence, Tuple

from absl import app
from absl import flags
from absl import logging as absl_logging

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


def define_mesh_flag(*bindings: str) -> flags.FlagHolder:
  """A --mesh=DATA,FSDP,TENSOR flag for a script whose gin mesh is `bindings`: one name that
  takes the (data, fsdp, tensor) tuple, or three names that take a size each."""
  if len(bindings) not in (1, 3):
    raise ValueError(f"mesh bindings {bindings}: expected one tuple binding or three sizes")
  return flags.DEFINE_list(
      "mesh", None, "mesh sizes DATA,FSDP,TENSOR (one may be -1: the remaining devices), e.g. "
      f"--mesh=1,-1,4; sets {' / '.join(bindings)} after the gin files and bindings")


def mesh_bindings(mesh: Sequence[str] | None, *bindings: str) -> List[str]:
  """--mesh as gin bindings (empty without --mesh); errors name the flag."""
  if not mesh:
    return []
  try:
    sizes = [int(size) for size in mesh]
  except ValueError:
    sizes = []
  if len(sizes) != 3 or any(size == 0 or size < -1 for size in sizes):
    raise app.UsageError(f"--mesh={','.join(mesh)}: expected three sizes DATA,FSDP,TENSOR, each "
                         ">= 1 or -1, e.g. --mesh=1,-1,4")
  if len(bindings) == 1:
    return [f"{bindings[0]} = ({sizes[0]}, {sizes[1]}, {sizes[2]})"]
  return [f"{name} = {size}" for name, size in zip(bindings, sizes)]


def parse(gin_files: Sequence[str], bindings: Sequence[str]) -> None:
  """Parses gin files then bindings; raises a one-line `app.UsageError` on a bad one."""
  import gin  # pylint: disable=g-import-not-at-top
  gin.add_config_file_search_path(str(REPO_ROOT))
  try:
    gin.parse_config_files_and_bindings(list(gin_files), list(bindings), finalize_config=False)
  except (ValueError, SyntaxError, IOError, KeyError, ImportError) as e:
    raise app.UsageError(gin_error_message(e, gin_files)) from e


def is_bound(name: str) -> bool:
  """Whether the parsed gin configuration binds `name` ('configurable.parameter')."""
  import gin  # pylint: disable=g-import-not-at-top
  try:
    gin.query_parameter(name)
  except ValueError:
    return False
  return True


def gin_error_message(error: Exception, gin_files: Sequence[str] = ()) -> str:
  """One line for a gin parse error: what is wrong, with which binding, where, and the
  nearest known name, e.g. "gin: unknown binding 'OptimizerConfig.lr' in --gin_file=gin/x.gin
  line 3 (did you mean OptimizerConfig.learning_rate?)"."""
  lines = str(error).splitlines() or [type(error).__name__]
  reason = lines[0].strip()
  where = _gin_location(lines[1] if len(lines) > 1 else "", gin_files)
  text = lines[2].strip() if len(lines) > 2 else ""
  key = text.partition("=")[0].strip()
  if isinstance(error, SyntaxError):
    file = _as_given(error.filename, gin_files) if error.filename else "--gin_bindings"
    return f"gin: syntax error in {file} line {error.lineno}: {error.msg}"
  if isinstance(error, OSError):
    return f"gin: {reason} (files are looked up as given, then from {REPO_ROOT})"
  unknown_parameter = re.match(r"Configurable '(.+)' doesn't have a parameter named '(.+)'\.",
                               reason)
  unknown_configurable = re.match(r"No configurable matching '(.+)'\.", reason)
  if unknown_parameter:
    selector, name = unknown_parameter.groups()
    # A parameter of one other configurable (a TrainConfig field that lives in a group).
    owners = [other for other in _configurable_names()
              if "." not in other and other != selector and name in _parameters(other)]
    guess = f"{owners[0]}.{name}" if len(owners) == 1 else None
    close = _closest(name, _parameters(selector))
    guess = guess or (f"{selector}.{close}" if close else None)
    scope = key.rpartition(".")[0].rpartition("/")[0]
    guess = f"{scope}/{guess}" if guess and scope else guess
    return (f"gin: unknown binding '{key}' in {where}"
            + (f" (did you mean {guess}?)" if guess else
               f" ({selector} has no parameter '{name}')"))
  if unknown_configurable:
    selector = unknown_configurable.group(1)
    guess = _closest(selector, _configurable_names())
    corrected = key.replace(selector, guess, 1) if guess else ""
    return (f"gin: unknown binding '{key}' in {where}"
            + (f" (did you mean {corrected}?)" if guess else
               f" (no configurable '{selector}' is registered: a typo, or the gin file does "
               "not import its module)"))
  return f"gin: {reason} in {where}" + (f": '{text}'" if text else "")


def _gin_location(line: str, gin_files: Sequence[str]) -> str:
  in_file = re.search(r'In file "(.+)", line (\d+)', line)
  if in_file:
    return f"{_as_given(in_file.group(1), gin_files)} line {in_file.group(2)}"
  return "--gin_bindings" if "bindings string" in line else "the gin configuration"


def _as_given(path: str, gin_files: Sequence[str]) -> str:
  """`--gin_file=<as the user typed it>` for a file on the command line, else the path (an
  included file)."""
  for given in gin_files:
    if os.path.abspath(given) == os.path.abspath(path) or (
        os.path.abspath(REPO_ROOT / given) == os.path.abspath(path)):
      return f"--gin_file={given}"
  return path


def _parameters(selector: str) -> List[str]:
  import gin  # pylint: disable=g-import-not-at-top
  try:
    return list(inspect.signature(gin.get_configurable(selector)).parameters)
  except (KeyError, ValueError, TypeError):
    return []


def _configurable_names() -> List[str]:
  import gin  # pylint: disable=g-import-not-at-top
  # gin has no public list of registered names; suggestions are optional, so tolerate changes.
  registry = getattr(gin.config, "_REGISTRY", None)
  try:
    return sorted({selector.rpartition(".")[2] for selector, _ in registry.items()} |
                  {selector for selector, _ in registry.items()})
  except (AttributeError, TypeError):
    return []


def _closest(name: str, known: Sequence[str]) -> Optional[str]:
  """The known name `name` most likely misspells or abbreviates ('lr' -> 'learning_rate')."""
  close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
  if close:
    return close[0]
  initials = [k for k in known if "".join(w[:1] for w in k.split("_")) == name.lower()]
  prefixed = [k for k in known if k.startswith(name) or name in k.split("_")]
  for candidates in (initials, prefixed):
    if len(candidates) == 1:
      return candidates[0]
  return None


def parse_flags_and_gin(gin_bindings: Sequence[str]) -> None:
  """Parses --gin_file / --gin_bindings flags plus the split-off `--gin.X=` bindings."""
  parse(GIN_FILES.value, list(GIN_BINDINGS.value) + list(gin_bindings))


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


# Libraries whose INFO lines are about their own machinery (orbax: every file of every
# checkpoint); they show from `-v 1` on, so that the default log reads as the run's progress.
CHATTY_AT_INFO = ("orbax",)


class _ChattyLibraryFilter(logging.Filter):
  """Drops INFO lines of CHATTY_AT_INFO libraries below verbosity 1; warnings always pass."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno != logging.INFO or absl_logging.get_verbosity() >= 1:
      return True
    parts = pathlib.PurePath(record.pathname).parts
    return not any(library in parts for library in CHATTY_AT_INFO)


def configure_logging() -> None:
  """absl's handler at the level -v/--verbosity asks (absl's default: INFO), without the
  chatty libraries' INFO lines below -v 1."""
  absl_logging.get_absl_handler().addFilter(_ChattyLibraryFilter())


def keep_accelerators_for_jax() -> None:
  """Hides GPUs from TensorFlow, which only reads data (tf.data, seqio) and writes TensorBoard
  summaries here: otherwise it reserves most of each GPU's memory that JAX needs."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")


def run(main: Callable[..., None]) -> None:
  """`app.run` for a `main(argv, gin_bindings)` that accepts T5X-style `--gin.X=` flags."""
  try:
    argv, bindings, flag_error = *split_gin_flags(sys.argv), None
  except app.UsageError as e:  # Raised inside app.run below, which prints it as usage.
    argv, bindings, flag_error = [a for a in sys.argv if not a.startswith("--gin.")], [], e

  def start(remaining_argv):
    if flag_error is not None:
      raise flag_error
    configure_logging()
    configure_cpu_devices()
    keep_accelerators_for_jax()
    main(remaining_argv, bindings)

  app.run(start, argv=argv)
