"""Vocabularies tokenise exactly like their backends (transformers, sentencepiece) on real rows."""
import json
import subprocess
import sys

import pytest
import tensorflow as tf

from conftest import REPO_ROOT
from teacherlm_jax.data import vocab


@pytest.fixture(scope="module")
def real_texts():
  from conftest import data_dir
  path = data_dir() / "teacherlm_eval" / "ecqa" / "ecqa.jsonl"
  if not path.exists():
    pytest.skip(f"{path} is absent")
  with open(path, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  return [r["test"] for r in rows[:300]] + [r["taskA_neg"] for r in rows[:100]]


@pytest.fixture(scope="module")
def hf_dir(real_texts, tmp_path_factory):
  return vocab.build_bpe_tokenizer(real_texts[:200], 600, tmp_path_factory.mktemp("tok"))


def test_hf_vocabulary_matches_transformers(real_texts, hf_dir):
  import transformers
  reference = transformers.AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
  v = vocab.HFTokenizerVocabulary(str(hf_dir))
  assert v.vocab_size == len(reference) <= 600
  assert (v.eos_id, v.pad_id, v.unk_id) == (2, 3, 0)
  held_out = real_texts[200:]  # rows the tokenizer was not trained on, incl. newlines, quotes
  assert any("\n" in t for t in held_out)
  for text in held_out:
    ids = v.encode(text)
    assert ids == reference.encode(text, add_special_tokens=False)
    assert v.decode(ids) == reference.decode(ids) == text
  assert v.encode_batch(held_out[:5]) == [v.encode(t) for t in held_out[:5]]
  # The TF path (what seqio's tokenize preprocessor calls) gives the same ids.
  ds = tf.data.Dataset.from_tensor_slices(held_out[:20]).map(v.encode_tf)
  for text, ids in zip(held_out[:20], ds.as_numpy_iterator()):
    assert ids.tolist() == v.encode(text)
  batch = tf.ragged.constant([v.encode(t) for t in held_out[:3]]).to_tensor(v.pad_id)
  assert [s.decode("utf-8") for s in v.decode_tf(batch).numpy()] == held_out[:3]
  assert v == vocab.HFTokenizerVocabulary(str(hf_dir)) and v != vocab.get_vocabulary("hf:/x")
  assert vocab.get_vocabulary(f"hf:{hf_dir}") is vocab.get_vocabulary(f"hf:{hf_dir}")
  with pytest.raises(ValueError, match="expected 'hf:<tokenizer dir>'"):
    vocab.get_vocabulary("bpe:/x")


def test_train_sentencepiece_script(shared_data, tmp_path):
  prefix = tmp_path / "spm"
  subprocess.run(
      [sys.executable, str(REPO_ROOT / "scripts" / "train_sentencepiece.py"),
       f"--input={shared_data / 'flan_cot_data' / 'creak_train.tsv'}",
       f"--model_prefix={prefix}", "--vocab_size=500", "--max_sentences=3000"],
      check=True, capture_output=True, cwd=REPO_ROOT)
  v = vocab.sentencepiece_vocabulary(f"{prefix}.model")
  assert (v.pad_id, v.eos_id, v.unk_id) == (0, 1, 2) and v.vocab_size == 500
  text = "Q: Is the claim above correct? (A) yes (B) no A: The answer is ("
  assert v.decode(v.encode(text)) == text
  assert v.encode_tf(tf.constant(text)).numpy().tolist() == v.encode(text)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    vocab.sentencepiece_vocabulary(str(tmp_path / "missing.model"))
