r"""Converts checkpoints between a local HF directory and teacherlm_jax.

  # HF -> orbax params (what train.py / annotate.py restore), tokenizer copied alongside:
  python scripts/convert_hf.py --direction=import --hf_dir=/ckpt/bloom-7b1 \
      --output_dir=gs://bucket/teacher/init
  # orbax params -> HF (loadable by transformers.AutoModelForCausalLM.from_pretrained):
  python scripts/convert_hf.py --direction=export --params_dir=/exp/teacher/params \
      --model_config=/exp/teacher/params/model_config.json --output_dir=/exp/teacher/hf \
      --tokenizer_dir=/ckpt/bloom-7b1

Hub names are not fetched: pass a local directory (`huggingface-cli download` it beforehand).
"""
import tempfile

from absl import app, flags, logging

from teacherlm_jax.data import hf_tokenizers
from teacherlm_jax.models import checkpoint_io, hf
from teacherlm_jax.storage import files

_DIRECTION = flags.DEFINE_enum("direction", "import", ["import", "export"],
                               "import: HF dir -> orbax params; export: orbax params -> HF dir.")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "Local HF checkpoint directory (import).")
_PARAMS_DIR = flags.DEFINE_string("params_dir", None, "Orbax params directory (export).")
_MODEL_CONFIG = flags.DEFINE_string("model_config", None,
                                    "model_config.json written next to the params (export).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where to write.", required=True)
_TOKENIZER_DIR = flags.DEFINE_string("tokenizer_dir", None,
                                     "Tokenizer to copy into the output (default: --hf_dir).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype.")


def main(argv):
  del argv
  if _DIRECTION.value == "import":
    if not _HF_DIR.value:
      raise app.UsageError("--direction=import needs --hf_dir")
    config, model = hf.import_checkpoint(_HF_DIR.value, dtype=_DTYPE.value)
    out = checkpoint_io.save_params(model, _OUTPUT_DIR.value)
    tokenizer_dir = _TOKENIZER_DIR.value or _HF_DIR.value
    try:
      with tempfile.TemporaryDirectory() as local:  # HF writes local files; out may be gs://.
        hf_tokenizers.load(files.local_copy(tokenizer_dir)).save_pretrained(local)
        files.upload(local, files.join(out, "tokenizer"))
    except hf_tokenizers.TokenizerError as e:
      logging.warning("no tokenizer copied: %s", e)
    logging.info("imported %s (%s, %.1fM params) -> %s", _HF_DIR.value, config.family,
                 config.num_params() / 1e6, out)
  else:
    if not (_PARAMS_DIR.value and _MODEL_CONFIG.value):
      raise app.UsageError("--direction=export needs --params_dir and --model_config")
    config = checkpoint_io.read_model_config(_MODEL_CONFIG.value)
    model = checkpoint_io.restore_params(config, _PARAMS_DIR.value)
    hf.export_checkpoint(model, _OUTPUT_DIR.value, tokenizer_dir=_TOKENIZER_DIR.value)
    logging.info("exported %s -> %s", _PARAMS_DIR.value, _OUTPUT_DIR.value)


if __name__ == "__main__":
  app.run(main)
