r"""Trains a SentencePiece model (or a byte-level BPE HF tokenizer) on local text files.

  python scripts/train_sentencepiece.py --input='../shared/data/flan_cot_data/*.tsv' \
      --model_prefix=/tmp/teacherlm_spm --vocab_size=8000

Inputs: *.jsonl (the --fields of each object), *.tsv / *.csv (every column), anything else one
line per sentence. The model uses seqio's id layout (pad 0, eos 1, unk 2, no bos), so
`data.vocab.sentencepiece_vocabulary(prefix + '.model')` reads it directly.
`--kind=hf_bpe` writes an HF tokenizer directory (BLOOM-style special tokens) instead.
"""
import csv
import glob
import json
import pathlib
from typing import Iterator, Sequence

from absl import app
from absl import flags
from absl import logging

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("input", None, "Input file glob(s).", required=True)
flags.DEFINE_list("fields", ["question", "sentence", "explanation", "analysis"],
                  "JSONL fields to read.")
flags.DEFINE_string("model_prefix", None, "Output prefix (writes PREFIX.model/.vocab), or the "
                    "output directory with --kind=hf_bpe.", required=True)
flags.DEFINE_integer("vocab_size", 8000, "Vocabulary size.")
flags.DEFINE_enum("model_type", "unigram", ["unigram", "bpe"], "SentencePiece model type.")
flags.DEFINE_enum("kind", "spm", ["spm", "hf_bpe"], "What to train.")
flags.DEFINE_integer("max_sentences", 1_000_000, "Cap on training sentences.")


def iter_texts(patterns: Sequence[str], fields: Sequence[str]) -> Iterator[str]:
  """Text pieces from every file matching `patterns` (see the module docstring)."""
  paths = sorted({p for pattern in patterns for p in glob.glob(pattern)})
  if not paths:
    raise FileNotFoundError(f"no input files match {list(patterns)}")
  for path in paths:
    suffix = pathlib.Path(path).suffix
    with open(path, encoding="utf-8", newline="" if suffix in (".csv", ".tsv") else None) as f:
      if suffix == ".jsonl" or (suffix == ".json" and f.read(1) == "{"):
        f.seek(0)
        for line_no, line in enumerate(f, start=1):
          if not line.strip():
            continue
          try:
            row = json.loads(line)
          except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{line_no}: is not JSON ({e.msg})") from e
          for field in fields:
            if isinstance(row.get(field), str) and row[field].strip():
              yield row[field]
      elif suffix in (".csv", ".tsv"):
        for values in csv.reader(f, delimiter="\t" if suffix == ".tsv" else ","):
          for value in values:
            value = value.replace("\\n", "\n").strip()
            if value:
              yield value
      else:
        f.seek(0)
        for line in f:
          if line.strip():
            yield line.rstrip("\n")


def _capped(texts: Iterator[str], limit: int) -> Iterator[str]:
  for i, text in enumerate(texts):
    if i >= limit:
      logging.info("stopping at --max_sentences=%d", limit)
      return
    yield text


def main(argv):
  del argv
  from teacherlm_jax.data import vocab  # pylint: disable=g-import-not-at-top
  texts = _capped(iter_texts(FLAGS.input, FLAGS.fields), FLAGS.max_sentences)
  if FLAGS.kind == "spm":
    path = vocab.train_sentencepiece(texts, FLAGS.model_prefix, FLAGS.vocab_size,
                                     FLAGS.model_type)
  else:
    path = vocab.build_bpe_tokenizer(texts, FLAGS.vocab_size, FLAGS.model_prefix)
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
