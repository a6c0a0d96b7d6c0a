"""Bad input never passes silently: every bad row of the corpus in tests/data/bad_input is a
named error or a counted reject, tokenizers must fit the model, non-finite numbers never reach
JSON, settings are checked at start, and errors say what to do."""
import errno
import json
import pathlib
import re

import jax
import numpy as np
import pytest
from flax import nnx

from hf_peers import make_hf_model
from teacherlm_jax.annotation import annotate
from teacherlm_jax.annotation import decoding
from teacherlm_jax.annotation import io as annotation_io
from teacherlm_jax.data import hf_tokenizers, record_tasks, sources, tasks, vocab
from teacherlm_jax.evaluation import evaluate
from teacherlm_jax.models import checkpoint_io, hf

CORPUS = pathlib.Path(__file__).resolve().parent / "data" / "bad_input"
RECORDS = CORPUS / "records.jsonl"
GOOD_IDS = ["good_1", "good_2", "good_3"]
# Line -> reject category of every bad line of records.jsonl (see its README.md).
BAD_LINES = {2: "not_utf8", 3: "not_json", 4: "missing_field", 5: "answer_outside_options",
             6: "answer_outside_options", 8: "duplicate_id", 9: "not_json"}
SAMPLING = decoding.SamplingConfig(max_new_tokens=3)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  """A tiny BLOOM teacher whose BPE tokenizer fits its vocabulary."""
  root = tmp_path_factory.mktemp("bad_input")
  directory = root / "teacher"
  texts = [line.decode("utf-8", "replace") for line in RECORDS.read_bytes().splitlines()] * 4
  vocab.build_bpe_tokenizer(texts, vocab_size=300, directory=directory)
  size = len(hf_tokenizers.load(directory))
  make_hf_model("bloom", directory, vocab_size=size, pad_token_id=3, eos_token_id=2)
  return root, directory


def _annotate(source, output, teacher_dir, **overrides):
  settings = dict(teachers=str(teacher_dir), kinds=("chain_of_thought",), sampling=SAMPLING,
                  num_slots=4, chunk_size=2, progress=False, process_index=0, process_count=1)
  return annotate.annotate(source, output, **{**settings, **overrides})


def _json_lines(path):
  """What a user runs on an output: every line must parse as strict JSON."""
  def strict(text):
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"{path}: bare {name}"))
  return [strict(line) for line in open(path, encoding="utf-8") if line.strip()]


# ---- per-line input ----------------------------------------------------------------------

def test_each_bad_line_of_the_corpus_is_a_named_error(tmp_path):
  for line, category in BAD_LINES.items():
    if category == "duplicate_id":
      continue  # A property of the file, not of the line: see the annotate run below.
    text = RECORDS.read_bytes().splitlines()[line - 1].decode("utf-8", "surrogateescape")
    with pytest.raises(sources.BadRow, match=rf"^{RECORDS}:{line}: ") as raised:
      annotation_io.parse_record(text, RECORDS, line, "id", ["question", "answer"])
    assert raised.value.category == category
  expected = {2: "not valid UTF-8 (byte 0xe9 at column 36)", 3: "at the end of the line",
              4: "field 'answer' is missing",
              5: "field 'answer' is '(F)' but there are only 4 options (A-D)",
              6: "field 'answer' is the letter '(B)' but field 'options' is empty"}
  rejects = []
  annotation_io.read_records(RECORDS, id_field="id", required_fields=["question", "answer"],
                             rejects=rejects)
  messages = {r.line: r.message for r in rejects}
  for line, message in expected.items():
    assert re.match(rf"{RECORDS}:{line}: .*{re.escape(message)}", messages[line]), messages[line]


def test_corpus_through_annotate_rejects_and_counts_every_bad_row(teacher, tmp_path):
  _, teacher_dir = teacher
  with pytest.raises(sources.BadRow, match=rf"{RECORDS}:2: is not valid UTF-8"):
    _annotate(RECORDS, tmp_path / "strict", teacher_dir)
  summary = _annotate(RECORDS, tmp_path / "lenient", teacher_dir, reject_bad_input=True)
  shard = annotation_io.shard_dir(tmp_path / "lenient", 0, 1)
  rejects = _json_lines(shard / "rejects.jsonl")
  assert {r["line"]: r["reason"] for r in rejects} == BAD_LINES
  assert all(r["message"].startswith(f"{RECORDS}:{r['line']}: ") for r in rejects)
  assert "\\xe9" in next(r["raw"] for r in rejects if r["line"] == 2)  # The bytes, shown.
  assert summary["records_in_slice"] == 10 and summary["annotated"] == len(GOOD_IDS)
  assert sum(summary["rejected"].values()) == len(BAD_LINES)
  annotation_io.merge(tmp_path / "lenient", tmp_path / "merged.jsonl")
  assert [r["id"] for r in _json_lines(tmp_path / "merged.jsonl")] == GOOD_IDS


def test_corpus_through_evaluate_skips_and_counts_every_bad_row(teacher, monkeypatch):
  _, teacher_dir = teacher
  vocabulary = vocab.HFTokenizerVocabulary(str(teacher_dir))
  _, model = hf.import_checkpoint(teacher_dir)
  name = record_tasks.register_record_tasks("bad_input_corpus", vocabulary,
                                            eval_path=RECORDS)["eval"]
  with pytest.raises(Exception, match=rf"{RECORDS}:2: is not valid UTF-8"):
    evaluate.evaluate(model, vocabulary, [name], progress=False)
  monkeypatch.setattr(tasks, "SKIPS", sources.SkipLog())
  tasks.set_on_bad_row("skip")
  try:
    report = evaluate.evaluate(model, vocabulary, [name], progress=False)
  finally:
    tasks.set_on_bad_row("raise")
  # Rank classification needs an options list: good_2 (options in its question) is skipped.
  skipped_lines = sorted(int(message[len(str(RECORDS)) + 1:].split(":", 1)[0])
                         for message in tasks.SKIPS.examples.values())
  assert skipped_lines == [2, 3, 4, 5, 6, 7, 9] and tasks.SKIPS.total == 7
  # good_1 twice (line 8 repeats its id: evaluation scores rows, ids are labels only), good_3.
  assert report["num_examples"] == 3 and report["skipped_rows"] == 7


def test_empty_input_is_an_error_unless_allowed(teacher, tmp_path):
  _, teacher_dir = teacher
  with pytest.raises(annotation_io.InputError, match=r"empty.jsonl: the input holds no records.*"
                                                     r"allow_empty_input"):
    _annotate(CORPUS / "empty.jsonl", tmp_path / "empty", teacher_dir)
  summary = _annotate(CORPUS / "empty.jsonl", tmp_path / "allowed", teacher_dir,
                      allow_empty_input=True)
  assert summary["annotated"] == 0


def test_mmlu_row_with_three_options_names_the_missing_option():
  path = CORPUS / "anatomy_test.csv"
  with pytest.raises(sources.BadRow, match=r"anatomy_test.csv:3: field 'choice3' is missing: "
                                           r"the row has 3 options before its answer '0'"):
    list(sources.read_mmlu_csv(path))


def test_json_error_points_at_the_real_column(tmp_path):
  # Parsed with its newline, a line cut short used to be reported at "column 1" (of line 2).
  path = tmp_path / "x.jsonl"
  path.write_text('{"id": "a", "question": "q"\n{"id": "b", "question": "q" "answer": "B"}\n')
  skips = sources.SkipLog()
  list(sources.read_jsonl(path, skips=skips))
  messages = sorted(skips.examples.values())
  assert "x.jsonl:1: is not JSON (Expecting ',' delimiter at the end of the line" in messages[0]
  assert "x.jsonl:2: is not JSON (Expecting ',' delimiter at column 29" in messages[1]


# ---- vocabulary --------------------------------------------------------------------------

def test_tokenizer_larger_than_the_model_is_refused_naming_both(teacher, tmp_path):
  root, teacher_dir = teacher
  small = root / "small_vocab_model"
  make_hf_model("bloom", small, vocab_size=50, pad_token_id=3, eos_token_id=2)
  size = len(hf_tokenizers.load(teacher_dir))
  message = (rf"tokenizer hf:{teacher_dir} has {size} tokens but model {small}/config.json has "
             r"vocab_size=50")
  with pytest.raises(vocab.VocabularyMismatch, match=message):
    _annotate(RECORDS, tmp_path / "out", small, tokenizer=f"hf:{teacher_dir}")
  assert not (tmp_path / "out").exists()  # Refused before any work.
  _, model = hf.import_checkpoint(small)
  with pytest.raises(vocab.VocabularyMismatch, match=rf"tokenizer {teacher_dir} has {size} "
                                                     rf"tokens but model {small} has"):
    evaluate.evaluate(model, vocab.HFTokenizerVocabulary(str(teacher_dir)), ["creak"],
                      progress=False, model_source=str(small))


def test_train_refuses_a_task_vocabulary_larger_than_the_model():
  from teacherlm_jax.training import train_data
  # Registering reads nothing; its own name, so later tests register the real-data task.
  task = train_data.register_flan_cot_bytes_task("/nonexistent", name="flan_cot_bytes_vocab_check")
  size = train_data.get_task(task).output_features["targets"].vocabulary.vocab_size
  with pytest.raises(vocab.VocabularyMismatch, match=rf"has {size} tokens but model preset "
                                                     r"'tiny' has vocab_size=100"):
    train_data.check_vocabulary(task, 100, "preset 'tiny'")
  train_data.check_vocabulary(task, size, "preset 'tiny'")


# ---- non-finite numbers ------------------------------------------------------------------

def test_non_finite_log_probs_are_null_and_flagged_and_every_output_is_json(teacher, tmp_path):
  root, teacher_dir = teacher
  _, model = hf.import_checkpoint(teacher_dir)
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda x: jax.numpy.full_like(x, np.nan), params))
  broken = root / "nan_teacher"
  checkpoint_io.save_params(model, broken)
  output = tmp_path / "nan"
  summary = _annotate(RECORDS, output, broken, tokenizer=f"hf:{teacher_dir}",
                      reject_bad_input=True)
  assert summary["qc_flags"]["chain_of_thought"]["non_finite"] == len(GOOD_IDS)
  annotation_io.merge(output, tmp_path / "merged.jsonl")
  shard = annotation_io.shard_dir(output, 0, 1)
  outputs = [tmp_path / "merged.jsonl", shard / "rejects.jsonl", *shard.glob("chunk-*.jsonl")]
  for path in outputs:
    _json_lines(path)
  json.loads((shard / "manifest.json").read_text(),
             parse_constant=lambda name: pytest.fail(f"manifest: bare {name}"))
  for record in _json_lines(tmp_path / "merged.jsonl"):
    assert record["mean_logprob"]["chain_of_thought"] is None
    assert "non_finite" in record["qc"]["chain_of_thought"]


# ---- settings ----------------------------------------------------------------------------

@pytest.mark.parametrize("setting, message", [
    (dict(num_slots=0), r"annotate.num_slots=0: must be an integer >= 1"),
    (dict(chunk_size=0), r"annotate.chunk_size=0: must be an integer >= 1"),
    (dict(num_samples=0), r"annotate.num_samples=0: must be an integer >= 1"),
    (dict(sync_every=0), r"annotate.sync_every=0: must be an integer >= 1"),
    (dict(num_slots=3, mesh_shape=(2, 1, 4)), r"annotate.num_slots=3: must be a multiple of"),
])
def test_bad_annotate_settings_fail_at_start_with_the_binding_name(setting, message, tmp_path):
  with pytest.raises(ValueError, match=message):
    _annotate(RECORDS, tmp_path / "out", tmp_path / "no_teacher_needed", **setting)
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field, value, message", [
    ("temperature", -1.0, r"SamplingConfig.temperature=-1.0: must be a finite number >= 0"),
    ("temperature", float("nan"), r"SamplingConfig.temperature=nan: must be a finite"),
    ("temperature", float("inf"), r"SamplingConfig.temperature=inf: must be a finite"),
])
def test_bad_sampling_settings_name_their_binding(field, value, message):
  with pytest.raises(ValueError, match=message):
    decoding.SamplingConfig(**{field: value})


def test_slot_engine_refuses_settings_that_would_never_finish(teacher):
  _, teacher_dir = teacher
  _, model = hf.import_checkpoint(teacher_dir)
  decoder = decoding.Decoder(model, eos_id=2, pad_id=3)
  for kwargs in (dict(num_slots=0), dict(num_slots=2, sync_every=0)):
    with pytest.raises(ValueError, match="must be"):
      decoding.SlotEngine(decoder, SAMPLING, max_prompt_length=8, **kwargs)


# ---- errors that say what to do ----------------------------------------------------------

def test_disk_full_names_the_path_and_says_resume(teacher, tmp_path, monkeypatch):
  _, teacher_dir = teacher
  real_write = annotation_io.write_atomic

  def full_disk(path, text):
    if path.name.startswith("chunk-000001"):
      raise OSError(errno.ENOSPC, "No space left on device")
    return real_write(path, text)

  monkeypatch.setattr(annotation_io, "write_atomic", full_disk)
  with pytest.raises(OSError, match=r"chunk-000001-[0-9a-f]+.jsonl: cannot write \(No space "
                                    r"left on device\): the disk is full.*rerun with --resume"):
    _annotate(RECORDS, tmp_path / "out", teacher_dir, reject_bad_input=True, chunk_size=1)
  monkeypatch.setattr(annotation_io, "write_atomic", real_write)
  summary = _annotate(RECORDS, tmp_path / "out", teacher_dir, reject_bad_input=True,
                      chunk_size=1, resume=True)
  assert summary["skipped_already_committed"] == 1 and summary["committed_total"] == 3


def test_damaged_committed_chunk_says_how_to_recover(teacher, tmp_path):
  _, teacher_dir = teacher
  _annotate(RECORDS, tmp_path / "out", teacher_dir, reject_bad_input=True, chunk_size=1)
  (chunk,) = annotation_io.shard_dir(tmp_path / "out", 0, 1).glob("chunk-000001-*.jsonl")
  chunk.write_text(chunk.read_text()[:40] + "\n")
  with pytest.raises(ValueError, match=rf"{chunk}:1: is not JSON.*delete {chunk} and rerun "
                                       r"with --resume"):
    _annotate(RECORDS, tmp_path / "out", teacher_dir, reject_bad_input=True, chunk_size=1,
              resume=True)
  chunk.unlink()
  summary = _annotate(RECORDS, tmp_path / "out", teacher_dir, reject_bad_input=True,
                      chunk_size=1, resume=True)
  assert summary["annotated"] == 1 and summary["committed_total"] == 3
