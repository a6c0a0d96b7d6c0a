r"""Annotates a dataset with TeacherLM teachers (fundamentals, chain of thought, mistakes).

  python scripts/annotate.py --gin_file=gin/annotate.gin --input=data.jsonl --output=/tmp/ann \
      --gin.annotate.teachers="'/path/to/teacherlm-7.1b'"
  python scripts/annotate.py ... --resume          # continue a killed run (exactly once)
  python scripts/annotate.py --merge --output=/tmp/ann --merged=/tmp/ann.jsonl

Multi-process: run one process per host with --coordinator_address, --num_processes and
--process_id (or TEACHERLM_COORDINATOR/_NUM_PROCESSES/_PROCESS_ID); each annotates its slice
of the input into its own shard; then merge once.
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging

_GIN_FILES = flags.DEFINE_multi_string("gin_file", [], "gin files, parsed in order")
_GIN_BINDINGS = flags.DEFINE_multi_string(
    "gin_bindings", [], "gin bindings, e.g. 'annotate.max_new_tokens = 64' (also --gin.X=value)")
_INPUT = flags.DEFINE_string("input", None, "JSONL input records")
_OUTPUT = flags.DEFINE_string("output", None, "annotation directory (one shard per process)")
_RESUME = flags.DEFINE_bool("resume", False, "skip ids already committed in --output")
_MERGE = flags.DEFINE_bool("merge", False, "merge the shards of --output into --merged")
_MERGED = flags.DEFINE_string("merged", None, "merged JSONL file (default OUTPUT/merged.jsonl)")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the job")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index")


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


def main(argv, gin_bindings=()):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _OUTPUT.value:
    raise app.UsageError("--output is required")
  if _MERGE.value:
    from teacherlm_jax import annotation_io
    merged = _MERGED.value or os.path.join(_OUTPUT.value, "merged.jsonl")
    count = annotation_io.merge(_OUTPUT.value, merged)
    print(f"merged {count} records into {merged}", flush=True)
    return
  if not _INPUT.value:
    raise app.UsageError("--input is required")
  coordinator = _COORDINATOR.value or os.environ.get("TEACHERLM_COORDINATOR")
  num_processes = (_NUM_PROCESSES.value or int(os.environ.get("TEACHERLM_NUM_PROCESSES", "0"))
                   or None)
  process_id = _PROCESS_ID.value
  if process_id is None and "TEACHERLM_PROCESS_ID" in os.environ:
    process_id = int(os.environ["TEACHERLM_PROCESS_ID"])
  if coordinator or (num_processes or 1) > 1:
    from teacherlm_jax import partitioning
    partitioning.initialize_distributed(coordinator, num_processes, process_id)
  import gin
  from teacherlm_jax import annotate
  gin.add_config_file_search_path(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  gin.parse_config_files_and_bindings(_GIN_FILES.value,
                                      list(_GIN_BINDINGS.value) + list(gin_bindings))
  summary = annotate.annotate(_INPUT.value, _OUTPUT.value, resume=_RESUME.value)
  import json
  print("summary: " + json.dumps(summary, sort_keys=True), flush=True)


if __name__ == "__main__":
  _argv, _bindings = split_gin_flags(sys.argv)
  app.run(lambda argv: main(argv, _bindings), argv=_argv)
