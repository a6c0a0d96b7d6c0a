"""seqio tasks and mixtures yield real TeacherLM examples; leakage filter; bad input."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import seqio

from conftest import REPO_ROOT
from teacherlm_jax.data import mixtures
from teacherlm_jax.data import prompts
from teacherlm_jax.data import sources
from teacherlm_jax.data import tasks
from teacherlm_jax.data import vocab


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory):
  texts = [prompts.eval_prompt_qa(f"Is {w} a word? (A) True (B) False") for w in
           ("water", "fire", "a cat", "the answer", "Q", "common mistakes", "fundamental")]
  directory = vocab.build_bpe_tokenizer(texts * 3, 400, tmp_path_factory.mktemp("tok"))
  v = vocab.HFTokenizerVocabulary(str(directory))
  mixtures.register_all(v)
  return v


def _first(task_name, split):
  ds = seqio.get_mixture_or_task(task_name).get_dataset(
      sequence_length=None, split=split, shuffle=False)
  return next(ds.as_numpy_iterator())


def test_import_registers_nothing_and_needs_no_data():
  code = ("import seqio; from teacherlm_jax.data import mixtures, tasks; "
          "assert not [n for n in seqio.TaskRegistry.names() if n.startswith('mmlu_')]; "
          "from teacherlm_jax.data import sources; sources.set_data_dir('/nonexistent'); "
          "from teacherlm_jax.data import vocab; "
          "names = mixtures.register_all(vocab.HFTokenizerVocabulary('/nonexistent')); "
          "assert len(names) == 57 + 3 + 7 + 3 + 3 + 3, len(names); print('ok')")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=REPO_ROOT, check=False)
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_every_task_yields_real_examples(shared_data, vocabulary):
  for name in tasks.MMLU_TASKS + tasks.QA_EVAL_TASKS:
    ex = _first(name, "test")
    options = [o.decode() for o in ex["options"]]
    assert options == list("ABCDE"[:len(options)]) and 0 <= ex["label"] < len(options)
    prompt = ex["inputs_pretokenized"].decode()
    assert prompt.endswith(" A: The answer is (")
    assert ex["inputs"].tolist() == vocabulary.encode(prompt)
    assert ex["targets_pretokenized"].decode() == options[ex["label"]]
  assert _first("mmlu_anatomy", "dev")["id"].decode() == "anatomy_dev_2"
  for name in [f"teacher_cot_{n}" for n in tasks.FLAN_COT_NAMES]:
    ex = _first(name, "train")
    assert ex["inputs_pretokenized"].decode().endswith(" Let's think step by step.")
    assert ex["targets_pretokenized"].decode().startswith(" ")
    assert ex["targets"][-1] == vocabulary.eos_id
  ex = _first("original_creak", "train")
  assert (ex["inputs_pretokenized"] + ex["targets_pretokenized"]).decode() == (
      "Q: Determine the correctness of the following sentence. Only people named Floyd "
      "wearing pink are allowed to attend Pink Floyd concerts. (A) True (B) False "
      "A: The answer is (B).")
  ex = _first("records_ecqa", "train")  # untokenised: the annotation engine's input
  assert set(ex) == {"id", "question", "options", "answer"}
  assert list(tasks.task_records("records_ecqa"))[0] == next(tasks.original_records("ecqa"))
  ex = _first("teacher_cot_ecqa", "train")
  assert ex["inputs_pretokenized"].decode() == (
      "Q: What might a person see at the scene of a brutal killing? (A) bloody mess "
      "(B) pleasure (C) being imprisoned (D) feeling of guilt (E) cake A: The answer is (A). "
      "Let's think step by step.")
  ex = _first("teacher_cot_sensemaking", "train")
  assert "A: The answer is (A)." in ex["inputs_pretokenized"].decode()


def test_eval_set_sizes(shared_data):
  assert sum(1 for s in tasks.MMLU_SUBJECTS for _ in tasks.mmlu_examples(s)) == 14042
  sizes = {n: sum(1 for _ in tasks.qa_eval_examples(n)) for n in tasks.QA_EVAL_TASKS}
  assert sizes == {"creak": 1371, "ecqa": 2194, "strategyqa": 228}
  assert mixtures.leaf_tasks("teacherlm_eval") == list(tasks.MMLU_TASKS) + ["creak", "ecqa",
                                                                          "strategyqa"]


def test_leakage_filter_removes_exactly_the_overlap(shared_data):
  def norm(s):
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", s.lower()).split())
  evals = {"strategyqa": ("strategy_qa/strategy_qa.jsonl", "origin_question"),
           "ecqa": ("ecqa/ecqa.jsonl", "q_text")}
  for name, (file, field) in evals.items():
    with open(shared_data / "teacherlm_eval" / file, encoding="utf-8") as f:
      eval_questions = {norm(json.loads(line)[field]) for line in f}
    rows = list(sources.read_flan_tsv(shared_data / "flan_cot_data" / f"{name}_train.tsv"))
    overlapping = {f"flan_{name}_{r['_line']}" for r in rows
                   if norm(r["question"].split("\nOptions:")[0]) in eval_questions}
    kept = {r["id"] for r in tasks.flan_records(name)}
    assert tasks.LEAKAGE_REMOVED[name] == len(overlapping) == {"strategyqa": 202, "ecqa": 32}[name]
    assert kept == {f"flan_{name}_{r['_line']}" for r in rows} - overlapping
  assert sum(1 for _ in tasks.flan_records("creak")) == 6915
  assert tasks.LEAKAGE_REMOVED["creak"] == 0
  unfiltered = sum(1 for _ in tasks.flan_records("strategyqa", drop_eval_overlap=False))
  assert unfiltered == 2061


def _write_shard(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_student_tasks_and_mixtures(shared_data, vocabulary, tmp_path):
  records = [r for _, r in zip(range(6), tasks.creak_records("train"))]
  notes = lambda i: {"fundamentals": f"fact {i}.", "chain_of_thought": f"step {i}.",
                     "common_mistakes": f"mistake {i}."}
  _write_shard(tmp_path / "creak-00000.jsonl", [{"id": r["id"], **notes(i)}
                                                for i, r in enumerate(records[:3])])
  # The second shard carries the input fields itself (no join needed).
  _write_shard(tmp_path / "creak-00001.jsonl", [{**r, **notes(i + 3)}
                                                for i, r in enumerate(records[3:])])
  name = tasks.register_student_task("creak", str(tmp_path / "creak-*.jsonl"), "CM", vocabulary)
  got = list(seqio.get_mixture_or_task(name).get_dataset(
      sequence_length=None, split="train", shuffle=False).as_numpy_iterator())
  assert [g["id"].decode() for g in got] == [r["id"] for r in records]
  for i, (g, r) in enumerate(zip(got, records)):
    text = (g["inputs_pretokenized"] + g["targets_pretokenized"]).decode()
    sample = prompts.sample_text(r["question"], r["options"], r["answer"])
    assert text == f"{sample} Let's think step by step. step {i}. The common mistakes are: mistake {i}."
  mix = mixtures.register_student_mixture("creak", str(tmp_path / "creak-*.jsonl"), "FCM",
                                          vocabulary, original_rate=1.0, annotated_rate=3.0)
  mixture = seqio.get_mixture_or_task(mix)
  assert [t.name for t in mixture.tasks] == ["original_creak", "student_creak_FCM"]
  assert mixture.get_rate(mixture.tasks[1]) == 3.0
  ds = mixture.get_dataset(sequence_length={"inputs": 256, "targets": 256}, split="train",
                           shuffle=False, seed=0)
  texts = [vocabulary.decode(ex["targets"]) for ex in ds.take(40).as_numpy_iterator()]
  assert any("fundamental" in t for t in texts) and any("fundamental" not in t for t in texts)
  multi = mixtures.register_multitask_student_mixture(
      "students_all", {"creak": str(tmp_path / "creak-*.jsonl")}, "C", vocabulary)
  assert mixtures.leaf_tasks(multi) == ["original_creak", "student_creak_C"]


def test_annotated_tfds_builder(shared_data, vocabulary, tmp_path):
  import tensorflow_datasets as tfds
  from teacherlm_jax.data import annotated_tfds
  records = [r for _, r in zip(range(10), tasks.creak_records("train"))]
  _write_shard(tmp_path / "creak-00000.jsonl",
               [{"id": r["id"], "fundamentals": f"f{i}", "chain_of_thought": f"c{i}",
                 "common_mistakes": f"m{i}"} for i, r in enumerate(records)])
  builder = annotated_tfds.prepare("creak", str(tmp_path / "creak-*.jsonl"),
                                   str(tmp_path / "tfds"), validation_percent=30)
  train = list(tfds.as_numpy(builder.as_dataset(split="train")))
  validation = list(tfds.as_numpy(builder.as_dataset(split="validation")))
  assert len(train) + len(validation) == 10 and validation
  assert str(builder.version) == "1.0.0"
  # A prepared run loads like any TFDS data, and renders as a student task.
  loaded = tfds.load("teacherlm_annotated/creak", split="train", data_dir=str(tmp_path / "tfds"))
  assert sorted(ex["id"] for ex in tfds.as_numpy(loaded)) == sorted(ex["id"] for ex in train)
  name = annotated_tfds.register_student_task("teacherlm_annotated/creak:1.0.0", "C", vocabulary,
                                               data_dir=str(tmp_path / "tfds"))
  got = list(seqio.get_mixture_or_task(name).get_dataset(
      sequence_length=None, split="train", shuffle=False).as_numpy_iterator())
  by_id = {r["id"]: (i, r) for i, r in enumerate(records)}
  assert len(got) == len(train)
  for ex in got:
    i, r = by_id[ex["id"].decode()]
    sample = prompts.sample_text(r["question"], r["options"], r["answer"])
    assert (ex["inputs_pretokenized"] + ex["targets_pretokenized"]).decode() == (
        f"{sample} Let's think step by step. c{i}")


def test_bad_input(shared_data, vocabulary, tmp_path):
  tasks.set_on_bad_row("raise")  # Process-wide: a student mixture built earlier leaves 'skip'.
  _write_shard(tmp_path / "bad.jsonl", [{"id": "nope", "chain_of_thought": "x"}])
  with open(tmp_path / "bad.jsonl", "a") as f:
    f.write("{broken\n")
  tasks.register_student_task("creak", str(tmp_path / "bad.jsonl"), "C", vocabulary, name="bad")

  def rows():  # The rows are read when the dataset is built (a source tf.data can save).
    return list(seqio.get_mixture_or_task("bad").get_dataset(
        sequence_length=None, split="train", shuffle=False).as_numpy_iterator())

  with pytest.raises(Exception, match=r"bad.jsonl:1: field 'id' 'nope' is not in the creak"):
    rows()
  tasks.set_on_bad_row("skip")
  try:
    before = tasks.SKIPS.total
    assert rows() == []
    assert tasks.SKIPS.total - before == 2
    assert "bad.jsonl:2: is not JSON" in tasks.SKIPS.summary()
  finally:
    tasks.set_on_bad_row("raise")
  with pytest.raises(ValueError, match="unknown task 'mmlu_astrology'"):
    tasks.get_task("mmlu_astrology")
  with pytest.raises(ValueError, match="unknown student format"):
    tasks.register_student_task("creak", "x", "CX", vocabulary)
  # An evaluation answer outside the options names file, line and field.
  bad_dir = tmp_path / "data"
  (bad_dir / "teacherlm_eval" / "creak").mkdir(parents=True)
  (bad_dir / "teacherlm_eval" / "creak" / "creak.jsonl").write_text(
      json.dumps({"ex_id": "x", "question": "q (A) True (B) False", "answer": "(C)"}) + "\n")
  sources.set_data_dir(str(bad_dir))
  try:
    with pytest.raises(ValueError, match=r"creak.jsonl:1: field 'answer' is invalid: .*outside"):
      list(tasks.qa_eval_examples("creak"))
  finally:
    sources.set_data_dir(None)


def test_accuracy_metric():
  scores = [np.array([0.1, 0.9]), np.array([-1.0, -2.0, -0.5]), np.array([3.0, 1.0])]
  assert tasks.accuracy_from_scores([1, 2, 1], scores) == {
      "accuracy": pytest.approx(200 / 3), "gold_score": pytest.approx((0.9 - 0.5 + 1.0) / 3),
      "num_examples": 3}
