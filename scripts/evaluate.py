r"""Zero-shot rank-classification evaluation of an HF-format checkpoint on TeacherLM's tasks.

  python scripts/evaluate.py --gin_file=gin/eval.gin --checkpoint=/path/to/hf_dir \
      --output_dir=/tmp/eval --gin.evaluate.task_names="['creak','ecqa']"

The tokenizer is read from --tokenizer (default: the checkpoint directory). Writes
eval_results.json and eval_results.md into --output_dir and prints the table. With
--skip_bad_rows, unreadable data rows are counted and reported instead of stopping the run.
"""

from absl import app
from absl import flags
from absl import logging

from teacherlm_jax import cli

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "HF checkpoint directory, or a teacherlm_jax model directory (a trainer "
    "model_dir or a convert_hf.py params dir; then pass --vocabulary)", required=True)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "HF tokenizer directory (default: checkpoint)")
_VOCABULARY = flags.DEFINE_string("vocabulary", None, "'hf:<dir>' or 'spm:<model>' (overrides "
                                  "--tokenizer; needed for teacherlm_jax model directories)")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "where to write the reports", required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "datasets root (default $TEACHERLM_DATA_DIR)")
_SKIP_BAD_ROWS = flags.DEFINE_bool("skip_bad_rows", False, "count and skip unreadable rows")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")
_ATTENTION_IMPL = flags.DEFINE_enum("attention_impl", "", ["", "xla", "pallas", "cudnn"],
                                    "attention kernel ('' = this platform's default)")
_MESH = cli.define_mesh_flag("evaluate.mesh_shape")


def configure(gin_bindings=()) -> None:
  """Parses what the flags name: gin files, bindings, --gin.X= and --mesh."""
  from teacherlm_jax.evaluation import evaluate  # pylint: disable=unused-import  (registers it)
  cli.parse_flags_and_gin(list(gin_bindings)
                          + cli.mesh_bindings(_MESH.value, "evaluate.mesh_shape"))


def main(argv, gin_bindings=()):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from teacherlm_jax.data import mixtures, sources, tasks, vocab
  from teacherlm_jax.evaluation import evaluate
  import jax
  from teacherlm_jax.models import checkpoint_io, checkpoint_vocab
  from teacherlm_jax.models import reconfigure
  from teacherlm_jax.runtime import kernels

  configure(gin_bindings)
  if _DATA_DIR.value:
    sources.set_data_dir(_DATA_DIR.value)
  if _SKIP_BAD_ROWS.value:
    tasks.set_on_bad_row("skip")
  if _VOCABULARY.value:
    vocabulary = vocab.get_vocabulary(_VOCABULARY.value)
  elif _TOKENIZER.value:
    vocabulary = vocab.HFTokenizerVocabulary(_TOKENIZER.value)
  elif checkpoint_vocab.tokenizer_spec(_CHECKPOINT.value):
    # The checkpoint's own tokenizer: an HF directory's, or the one our trainer saved.
    vocabulary = vocab.get_vocabulary(checkpoint_vocab.tokenizer_spec(_CHECKPOINT.value))
  else:
    raise app.UsageError(f"{_CHECKPOINT.value} has no tokenizer beside it: pass --vocabulary")
  mixtures.register_all(vocabulary)
  logging.info("loading %s", _CHECKPOINT.value)
  model = checkpoint_io.load_any(_CHECKPOINT.value, dtype=_DTYPE.value)
  model = reconfigure.with_config_fields(
      model, **kernels.attention_options(_ATTENTION_IMPL.value, jax.local_devices()[0]))
  report = evaluate.evaluate(model, vocabulary, model_source=_CHECKPOINT.value)
  report["checkpoint"] = _CHECKPOINT.value
  json_path, md_path = evaluate.write_report(report, _OUTPUT_DIR.value)
  print(evaluate.markdown_table(report))  # The result, on stdout; progress is in the log.
  if tasks.SKIPS.total:
    logging.warning("%s", tasks.SKIPS.summary())
  logging.info("wrote %s and %s", json_path, md_path)


if __name__ == "__main__":
  cli.run(main)
