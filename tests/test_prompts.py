"""The TeacherLM strings equal the reference data byte for byte."""
import json

import pytest

from teacherlm_jax.data import prompts

CREAK_QUESTION = "Determine the correctness of the following sentence. "


def _jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def enhance_rows():
  from conftest import data_dir
  path = data_dir() / "teacherlm_enhance_creak_validation" / "creak_validation.jsonl"
  if not path.exists():
    pytest.skip(f"{path} is absent")
  return _jsonl(path)


def test_teacher_prompts_equal_reference_fields(enhance_rows):
  assert len(enhance_rows) == 1371
  for row in enhance_rows:
    letter = "A" if row["label"] == "true" else "B"
    question = prompts.format_question(CREAK_QUESTION + row["sentence"], ["True", "False"])
    assert prompts.sample_text(CREAK_QUESTION + row["sentence"], ["True", "False"],
                               letter) == row["text"]
    assert prompts.teacher_prompt(question, letter, prompts.CHAIN_OF_THOUGHT) == row["cot_text"]
    assert prompts.teacher_prompt(question, letter, prompts.COMMON_MISTAKES) == row["error_text"]
    assert prompts.teacher_prompt(question, letter,
                                  prompts.FUNDAMENTALS) == row["fundamental_text"]


def test_teacher_prompt_collapses_double_spaces_like_reference():
  question = prompts.format_question("Is  this  fine? ", ["yes", "no"])
  got = prompts.teacher_prompt(question, "A", prompts.FUNDAMENTALS)
  assert got == ("Q: Is this fine? (A) yes (B) no A: The answer is (A). "
                 "The fundamental of this question is:")
  with pytest.raises(ValueError, match="unknown annotation kind"):
    prompts.teacher_prompt(question, "A", "summary")


def test_eval_prompts_equal_reference_forms(shared_data):
  ecqa = _jsonl(shared_data / "teacherlm_eval" / "ecqa" / "ecqa.jsonl")
  for row in ecqa:
    assert prompts.eval_prompt_qa(row["question"]) == row["test"]
  for name in ("creak/creak.jsonl", "strategy_qa/strategy_qa.jsonl"):
    for row in _jsonl(shared_data / "teacherlm_eval" / name):
      assert not row["question"].startswith("Q: ")
      assert prompts.eval_prompt_qa(row["question"]) == f"Q: {row['question']} A: The answer is ("
  row = _jsonl(shared_data / "teacherlm_eval" / "creak" / "creak.jsonl")[0]
  assert prompts.eval_prompt_qa(row["question"]) == (
      "Q: Determine the correctness of the following sentence. Eating soup means eating only "
      "solids. (A) True (B) False A: The answer is (")


def test_mmlu_prompt():
  got = prompts.eval_prompt_mmlu(
      "abstract_algebra", "Find the degree of Q(sqrt(2)) over Q", ["0", "4", "2", "6"])
  assert got == ("The following are multiple choice questions (with answers) about abstract "
                 "algebra. Q: Find the degree of Q(sqrt(2)) over Q. (A) 0 (B) 4 (C) 2 (D) 6 "
                 "A: The answer is (")
  # Newlines become spaces; the '.' test happens first, so a trailing newline still gets one.
  got = prompts.eval_prompt_mmlu("x_y", "Line one\nline two?", ["a\nb", "c", "d", "e"])
  assert got.endswith("about x y. Q: Line one line two? (A) a b (B) c (C) d (D) e "
                      "A: The answer is (")
  assert prompts.eval_prompt_mmlu("s", 'He said "no"', list("abcd")).count('"no" (A)') == 1


def test_student_formats():
  sample = prompts.sample_text("Is water wet?", ["True", "False"], "A")
  notes = {prompts.FUNDAMENTALS: " water is a liquid.", prompts.CHAIN_OF_THOUGHT: "Water wets.",
           prompts.COMMON_MISTAKES: "Confusing  wet and damp. "}
  assert prompts.student_text(sample, notes, "original") == sample
  assert prompts.student_text(sample, notes, "C") == sample + " Let's think step by step. Water wets."
  assert prompts.student_text(sample, notes, "CM") == (
      sample + " Let's think step by step. Water wets. The common mistakes are: Confusing wet "
      "and damp.")
  cmf = prompts.student_text(sample, notes, "CMF")
  assert cmf.endswith("The fundamental of this question is: water is a liquid.")
  fcm = prompts.student_text(sample, notes, "FCM")
  assert fcm.index("fundamental") < fcm.index("step by step") < fcm.index("common mistakes")
  assert prompts.student_text(sample, notes, "F").count("The fundamental") == 1
  assert prompts.student_text(sample, notes, "M").endswith("Confusing wet and damp.")
  # SHUFFLE: fixed per (seed, id), different across ids, always all three.
  orders = {prompts.annotation_order("SHUFFLE", f"id{i}") for i in range(40)}
  assert len(orders) > 3 and all(sorted(o) == sorted(prompts.ANNOTATION_KINDS) for o in orders)
  assert prompts.annotation_order("SHUFFLE", "id7") == prompts.annotation_order("SHUFFLE", "id7")
  assert (prompts.student_text(sample, notes, "SHUFFLE", example_id="id3")
          == prompts.student_text(sample, notes, "SHUFFLE", example_id="id3"))
  with pytest.raises(ValueError, match="needs annotation 'common_mistakes'"):
    prompts.student_text(sample, {prompts.CHAIN_OF_THOUGHT: "x"}, "CM")
  with pytest.raises(ValueError, match="unknown student format"):
    prompts.student_text(sample, notes, "XYZ")


def test_letters():
  assert prompts.letter_index("(C)") == 2 and prompts.letter_index("D", 4) == 3
  assert prompts.eval_options(4) == ("A", "B", "C", "D")
  with pytest.raises(ValueError, match="outside the 2 options"):
    prompts.letter_index("(C)", 2)
  with pytest.raises(ValueError, match="not an option letter"):
    prompts.letter_index("maybe")
