r"""Annotates a dataset with TeacherLM teachers (fundamentals, chain of thought, mistakes).

  python scripts/annotate.py --gin_file=gin/annotate.gin --input=data.jsonl --output=/tmp/ann \
      --model_dir=/path/to/teacherlm-7.1b
  python scripts/annotate.py --gin_file=gin/annotate.gin --input=data.jsonl --output=/tmp/ann \
      --gin.annotate.teachers="{'fundamentals': '/a', 'chain_of_thought': '/b', 'common_mistakes': '/c'}"
  python scripts/annotate.py ... --input=seqio:records_creak   # a seqio task's records
  python scripts/annotate.py ... --resume          # continue a killed run (exactly once)
  python scripts/annotate.py --merge --output=/tmp/ann --merged=/tmp/ann.jsonl
  python scripts/annotate.py ... --cpu_devices=2 --mesh=1,1,2
                                   # CPU host: one device per core, heads split over them

Multi-process: run one process per host with --coordinator_address, --num_processes and
--process_id (or TEACHERLM_COORDINATOR/_NUM_PROCESSES/_PROCESS_ID); each annotates its slice
of the input into its own shard; then merge once.
"""
import os

from absl import app
from absl import flags
from absl import logging

from teacherlm_jax import cli

_INPUT = flags.DEFINE_string(
    "input", None, "JSONL input records, or seqio:<task>[:<split>] for a seqio task's examples "
    "(built in: records_creak, records_ecqa, records_strategyqa; a gin file registers others "
    "with `import my_tasks`)")
_OUTPUT = flags.DEFINE_string("output", None, "annotation directory (one shard per process)")
_RESUME = flags.DEFINE_bool("resume", False, "skip ids already committed in --output")
_MERGE = flags.DEFINE_bool("merge", False, "merge the shards of --output into --merged")
_MERGED = flags.DEFINE_string("merged", None, "merged JSONL file (default OUTPUT/merged.jsonl)")
_MERGE_WAIT_S = flags.DEFINE_float(
    "merge_wait_s", 0.0, "--merge: wait up to this long for every process's shard to complete "
    "(a job launched on a slice may still be writing its last chunks)")
_MODEL_DIR = flags.DEFINE_string(
    "model_dir", None, "the teacher for every kind (sets annotate.teachers): an HF directory, a "
    "trainer model_dir or a convert_hf.py params directory")
# The mesh spans this process's devices: processes split the records, not the model.
_MESH = cli.define_mesh_flag("annotate.mesh_shape")


def configure(gin_bindings=()) -> None:
  """Parses what the flags name: gin files, bindings, --gin.X=, --model_dir and --mesh."""
  from teacherlm_jax.annotation import annotate  # pylint: disable=unused-import  (registers it)
  bindings = list(gin_bindings) + cli.mesh_bindings(_MESH.value, "annotate.mesh_shape")
  if _MODEL_DIR.value:
    bindings.append(f"annotate.teachers = {_MODEL_DIR.value!r}")
  cli.parse_flags_and_gin(bindings)


def main(argv, gin_bindings=()):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _OUTPUT.value:
    raise app.UsageError("--output is required")
  if _MERGE.value:
    from teacherlm_jax.annotation import io as annotation_io
    merged = _MERGED.value or os.path.join(_OUTPUT.value, "merged.jsonl")
    count = annotation_io.merge(_OUTPUT.value, merged, wait_s=_MERGE_WAIT_S.value)
    logging.info("merged %d records into %s", count, merged)
    return
  if not _INPUT.value:
    raise app.UsageError("--input is required")
  cli.initialize_distributed()
  from teacherlm_jax.annotation import annotate
  configure(gin_bindings)
  annotate.annotate(_INPUT.value, _OUTPUT.value, resume=_RESUME.value)  # Logs its summary.


if __name__ == "__main__":
  cli.run(main)
