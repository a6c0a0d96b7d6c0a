r"""Zero-shot rank-classification evaluation of an HF-format checkpoint on TeacherLM's tasks.

  python scripts/evaluate.py --gin_file=gin/eval.gin --checkpoint=/path/to/hf_dir \
      --output_dir=/tmp/eval --gin.evaluate.task_names="['creak','ecqa']"

The tokenizer is read from --tokenizer (default: the checkpoint directory). Writes
eval_results.json and eval_results.md into --output_dir and prints the table. With
--skip_bad_rows, unreadable data rows are counted and reported instead of stopping the run.
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging

_GIN_FILES = flags.DEFINE_multi_string("gin_file", [], "gin files, parsed in order")
_GIN_BINDINGS = flags.DEFINE_multi_string("gin_bindings", [],
                                          "gin bindings (also --gin.NAME=value)")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "HF checkpoint directory", required=True)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "HF tokenizer directory (default: checkpoint)")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "where to write the reports", required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "datasets root (default $TEACHERLM_DATA_DIR)")
_SKIP_BAD_ROWS = flags.DEFINE_bool("skip_bad_rows", False, "count and skip unreadable rows")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")


def split_gin_flags(argv):
  """T5X-style `--gin.NAME=value` arguments -> bindings `NAME = value`."""
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
  import gin
  from teacherlm_jax import evaluate
  from teacherlm_jax.data import mixtures, sources, tasks, vocab
  from teacherlm_jax.models import hf

  gin.add_config_file_search_path(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  gin.parse_config_files_and_bindings(_GIN_FILES.value,
                                      list(_GIN_BINDINGS.value) + list(gin_bindings))
  if _DATA_DIR.value:
    sources.set_data_dir(_DATA_DIR.value)
  if _SKIP_BAD_ROWS.value:
    tasks.set_on_bad_row("skip")
  vocabulary = vocab.HFTokenizerVocabulary(_TOKENIZER.value or _CHECKPOINT.value)
  mixtures.register_all(vocabulary)
  logging.info("importing %s", _CHECKPOINT.value)
  _, model = hf.import_checkpoint(_CHECKPOINT.value, dtype=_DTYPE.value)
  report = evaluate.evaluate(model, vocabulary)
  report["checkpoint"] = _CHECKPOINT.value
  json_path, md_path = evaluate.write_report(report, _OUTPUT_DIR.value)
  print(evaluate.markdown_table(report))
  if tasks.SKIPS.total:
    print(tasks.SKIPS.summary())
  print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
  _argv, _bindings = split_gin_flags(sys.argv)
  app.run(lambda argv: main(argv, _bindings), argv=_argv)
