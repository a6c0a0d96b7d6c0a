"""Runs one scripts/*.py as a process of a multi-host JAX job: the entry point tpu_vm.py launches.

  python tpu/run_multihost.py scripts/train.py --gin_file=gin/student.gin ...

Calls jax.distributed.initialize() before the script touches JAX, then runs the script as
__main__ with its own argv. On a Cloud TPU slice every argument is detected from the TPU
metadata; elsewhere (GPU/CPU clusters, tests) set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID. Scripts that also initialize should guard with jax.distributed.is_initialized().
"""
import os
import runpy
import sys

import jax


def initialize() -> None:
  if jax.distributed.is_initialized():
    return
  num_processes = os.environ.get("JAX_NUM_PROCESSES")
  process_id = os.environ.get("JAX_PROCESS_ID")
  jax.distributed.initialize(  # coordinator_address: JAX reads JAX_COORDINATOR_ADDRESS itself.
      num_processes=int(num_processes) if num_processes else None,
      process_id=int(process_id) if process_id else None)


def main(argv: list[str]) -> None:
  if len(argv) < 2 or not argv[1].endswith(".py"):
    raise SystemExit("usage: run_multihost.py scripts/<name>.py [script flags]")
  script = argv[1]
  initialize()
  # As if run directly: the script sees its own argv and its directory first on sys.path.
  sys.argv = argv[1:]
  sys.path[0] = os.path.dirname(os.path.abspath(script))
  runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
  main(sys.argv)
