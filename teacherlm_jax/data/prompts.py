"""The TeacherLM strings: question format, teacher triggers, student formats, eval prompts.

This module is the one place that spells out the paper's text formats, byte for byte as the
reference code (hahaplus/TeacherLM: enhance/data_prepare.py, evaluate/lm_eval/tasks/*.py) builds
them. Everything that writes a prompt (teacher SFT tasks, the annotation engine, student tasks,
evaluation) imports it from here; nothing here tokenises.

  sample        Q: {question} (A) {a} (B) {b} A: The answer is ({X}).
  teacher       {sample} {trigger}                       (double spaces collapsed)
  student C     {sample} Let's think step by step. {chain_of_thought}
  eval (QA)     Q: {question} A: The answer is (
  eval (MMLU)   The following are multiple choice questions (with answers) about {subject}.
                Q: {question} (A) .. (D) .. A: The answer is (      (one line)

Rank classification scores the option letters "A", "B", ... as continuations of the eval prompt.
"""
from __future__ import annotations

import hashlib
import random
from typing import Mapping, Optional, Sequence

# Teacher triggers, appended after one space to a solved sample.
FUNDAMENTALS_TRIGGER = "The fundamental of this question is:"
CHAIN_OF_THOUGHT_TRIGGER = "Let's think step by step."
COMMON_MISTAKES_TRIGGER = "The common mistakes are:"

FUNDAMENTALS = "fundamentals"
CHAIN_OF_THOUGHT = "chain_of_thought"
COMMON_MISTAKES = "common_mistakes"
# The annotation kinds, in the paper's F, C, M naming; the values are also the annotation
# shards' field names.
ANNOTATION_KINDS = (FUNDAMENTALS, CHAIN_OF_THOUGHT, COMMON_MISTAKES)
TRIGGERS = {
    FUNDAMENTALS: FUNDAMENTALS_TRIGGER,
    CHAIN_OF_THOUGHT: CHAIN_OF_THOUGHT_TRIGGER,
    COMMON_MISTAKES: COMMON_MISTAKES_TRIGGER,
}

# Student formats from the paper: annotations concatenated after the answer in this order.
# SHUFFLE uses all three in a random order per example (seeded, see `student_text`).
STUDENT_FORMATS = {
    "original": (),
    "C": (CHAIN_OF_THOUGHT,),
    "CM": (CHAIN_OF_THOUGHT, COMMON_MISTAKES),
    "CMF": (CHAIN_OF_THOUGHT, COMMON_MISTAKES, FUNDAMENTALS),
    "F": (FUNDAMENTALS,),
    "M": (COMMON_MISTAKES,),
    "FCM": (FUNDAMENTALS, CHAIN_OF_THOUGHT, COMMON_MISTAKES),
    "SHUFFLE": (FUNDAMENTALS, CHAIN_OF_THOUGHT, COMMON_MISTAKES),
}

OPTION_LETTERS = "ABCDEFGHIJ"
ANSWER_PREFIX = "A: The answer is ("
# The reference MMLU task adds a final '.' unless the question ends with one of these.
_MMLU_END_PUNCTUATION = (".", ",", "?", "!", '"')
MMLU_HEADER = "The following are multiple choice questions (with answers) about {subject}. "


def collapse_spaces(text: str) -> str:
  """The reference's `remove_duplicated_block`: one pass of '  ' -> ' ', trailing spaces cut.

  Kept exactly (including its single pass, so three spaces become two) because the teacher
  models were trained on text cleaned this way.
  """
  text = text.replace("  ", " ")
  if text and text[-1] == " ":
    text = text.strip(" ")
  return text


def option_letter(index: int) -> str:
  if not 0 <= index < len(OPTION_LETTERS):
    raise ValueError(f"option index {index} is outside 0..{len(OPTION_LETTERS) - 1}")
  return OPTION_LETTERS[index]


def format_options(options: Sequence[str]) -> str:
  """'(A) a (B) b ...'."""
  return " ".join(f"({option_letter(i)}) {option}" for i, option in enumerate(options))


def format_question(question: str, options: Sequence[str] = ()) -> str:
  """'Q: {question} (A) {a} (B) {b} ...' (no options: 'Q: {question}')."""
  text = f"Q: {question}"
  if options:
    text += " " + format_options(options)
  return text


def format_answer(answer: str) -> str:
  """'A: The answer is (X).' for an option letter, 'A: The answer is {answer}.' otherwise."""
  if len(answer) == 1 and answer in OPTION_LETTERS:
    return f"{ANSWER_PREFIX}{answer})."
  return f"A: The answer is {answer}."


def sample_text(question: str, options: Sequence[str], answer: str) -> str:
  """A solved sample: 'Q: {question} (A) .. A: The answer is (X).' (reference `text` field)."""
  return f"{format_question(question, options)} {format_answer(answer)}"


def teacher_prompt(question_text: str, answer: str, kind: str) -> str:
  """The prompt a TeacherLM-{kind} model continues.

  Args:
    question_text: `format_question(...)` output ('Q: ... (A) .. (B) ..').
    answer: the option letter ('B') or, for open questions, the answer text.
    kind: one of ANNOTATION_KINDS.
  """
  if kind not in TRIGGERS:
    raise ValueError(f"unknown annotation kind {kind!r}; expected one of {ANNOTATION_KINDS}")
  return collapse_spaces(f"{question_text} {format_answer(answer)} {TRIGGERS[kind]}")


def annotation_order(fmt: str, example_id: str = "", seed: int = 0) -> tuple[str, ...]:
  """The annotation kinds a student format appends, in order.

  SHUFFLE draws a permutation per example from (seed, example_id), so it is the same on every
  host and every epoch for a given example.
  """
  if fmt not in STUDENT_FORMATS:
    raise ValueError(f"unknown student format {fmt!r}; expected one of {sorted(STUDENT_FORMATS)}")
  kinds = list(STUDENT_FORMATS[fmt])
  if fmt == "SHUFFLE":
    digest = hashlib.sha256(f"{seed}:{example_id}".encode("utf-8")).digest()
    random.Random(int.from_bytes(digest[:8], "little")).shuffle(kinds)
  return tuple(kinds)


def student_text(sample: str, annotations: Mapping[str, str], fmt: str, *,
                 example_id: str = "", seed: int = 0) -> str:
  """A student training text: the solved sample, then each annotation after its trigger.

  Args:
    sample: `sample_text(...)` output ('Q: ... A: The answer is (X).').
    annotations: kind -> generated text (the annotation shard's fields).
    fmt: a key of STUDENT_FORMATS ('original', 'C', 'CM', 'CMF', 'F', 'M', 'FCM', 'SHUFFLE').
    example_id, seed: pick SHUFFLE's order.

  Returns:
    e.g. for 'CM': "{sample} Let's think step by step. {cot} The common mistakes are: {m}",
    cleaned with `collapse_spaces` as the reference does for its `cot_tail` field.
  """
  parts = [sample]
  for kind in annotation_order(fmt, example_id, seed):
    if kind not in annotations:
      raise ValueError(f"student format {fmt!r} needs annotation {kind!r}, which is missing")
    parts.append(f"{TRIGGERS[kind]} {annotations[kind].strip()}")
  return collapse_spaces(" ".join(parts))


def eval_prompt_qa(question: str) -> str:
  """CREAK / ECQA / StrategyQA rank-classification prompt: 'Q: {question} A: The answer is ('.

  ECQA's `question` field already starts with 'Q: ' (its `test` field is `question +
  " A: The answer is ("`); the prefix is not doubled.
  """
  if not question.startswith("Q: "):
    question = f"Q: {question}"
  return f"{question} {ANSWER_PREFIX}"


def eval_prompt_mmlu(subject: str, question: str, options: Sequence[str]) -> str:
  """Zero-shot MMLU prompt, as the reference `Mmlu.doc_to_text` builds it.

  The final '.' is added before newlines become spaces, as in the reference.
  """
  if not question:
    raise ValueError("MMLU question is empty")
  if question[-1] not in _MMLU_END_PUNCTUATION:
    question += "."
  question = question.replace("\n", " ")
  options = [option.replace("\n", " ") for option in options]
  header = MMLU_HEADER.format(subject=subject.replace("_", " "))
  return f"{header}Q: {question} {format_options(options)} {ANSWER_PREFIX}"


def eval_options(num_options: int) -> tuple[str, ...]:
  """The continuations rank classification scores: 'A', 'B', ... (no parenthesis)."""
  return tuple(option_letter(i) for i in range(num_options))


def letter_index(answer: str, num_options: Optional[int] = None) -> int:
  """'(B)' or 'B' -> 1; raises when outside the options."""
  letter = answer.strip()
  if len(letter) == 3 and letter[0] == "(" and letter[2] == ")":
    letter = letter[1]
  if len(letter) != 1 or letter not in OPTION_LETTERS:
    raise ValueError(f"answer {answer!r} is not an option letter")
  index = OPTION_LETTERS.index(letter)
  if num_options is not None and index >= num_options:
    raise ValueError(f"answer {answer!r} is outside the {num_options} options")
  return index
