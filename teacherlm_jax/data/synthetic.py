"""The embedded task of the tiny pipeline: multi-step arithmetic in the TeacherLM format.

Each question is `a op b op c` with + / - / x, four options (the answer and three distractors
that real mistakes produce), and programmatically written annotations a teacher is tuned on:
  fundamentals      the precedence / left-to-right rule the question rests on,
  chain_of_thought  the two steps with their intermediate result,
  common_mistakes   how each distractor arises.
So the pipeline runs with no data directory and no internet, and the annotations carry real
information about the answer (the premise TeacherLM tests).
"""
from __future__ import annotations

import json
import random
from typing import Dict, Iterator, List

from teacherlm_jax.data import prompts
from teacherlm_jax.storage import files

_SYMBOL = {"+": "+", "-": "-", "*": "x"}


def _apply(x: int, op: str, y: int) -> int:
  return x + y if op == "+" else x - y if op == "-" else x * y


def _solve(a, op1, b, op2, c):
  """(answer, first step text, second step text) honouring precedence."""
  if op2 == "*" and op1 != "*":
    inner = b * c
    return _apply(a, op1, inner), (f"{b} x {c} = {inner}", f"{a} {_SYMBOL[op1]} {inner} = "
                                   f"{_apply(a, op1, inner)}")
  first = _apply(a, op1, b)
  return _apply(first, op2, c), (f"{a} {_SYMBOL[op1]} {b} = {first}",
                                 f"{first} {_SYMBOL[op2]} {c} = {_apply(first, op2, c)}")


def make_example(rng: random.Random, index: int, split: str) -> Dict:
  """One question with its gold answer and the three reference annotations."""
  while True:
    op1, op2 = rng.choice("+-*"), rng.choice("+-*")
    a, b, c = rng.randint(2, 19), rng.randint(2, 9), rng.randint(2, 9)
    answer, (step1, step2) = _solve(a, op1, b, op2, c)
    mistakes = {}
    if op2 == "*" and op1 != "*":
      fundamentals = "Multiplication is done before addition and subtraction."
      left_to_right = _apply(_apply(a, op1, b), op2, c)
      mistakes[left_to_right] = (f"working strictly left to right, {a} {_SYMBOL[op1]} {b} first, "
                                 f"which gives {left_to_right}")
    else:
      fundamentals = ("Operations of the same precedence are done from left to right."
                      if (op1 == "*") == (op2 == "*") else
                      "Multiplication is done before addition and subtraction.")
      right_first = _apply(a, op1, _apply(b, op2, c))
      mistakes[right_first] = (f"doing {b} {_SYMBOL[op2]} {c} first, which gives {right_first}")
    sign_flip = _apply(_apply(a, op1, b), {"+": "-", "-": "+", "*": "+"}[op2], c)
    mistakes.setdefault(sign_flip, f"using the wrong operation in the last step, which gives "
                                   f"{sign_flip}")
    mistakes.setdefault(answer + 10, f"carrying a ten that is not there, which gives {answer + 10}")
    mistakes.setdefault(answer - 1, f"an off-by-one slip, which gives {answer - 1}")
    distractors = [v for v in mistakes if v != answer][:3]
    if len(distractors) == 3:
      break
  options = [answer] + distractors
  rng.shuffle(options)
  letter = prompts.option_letter(options.index(answer))
  question = f"What is {a} {_SYMBOL[op1]} {b} {_SYMBOL[op2]} {c}?"
  return {
      "id": f"arith-{split}-{index}",
      "question": question,
      "options": [str(o) for o in options],
      "answer": letter,
      prompts.FUNDAMENTALS: fundamentals,
      prompts.CHAIN_OF_THOUGHT: f"First, {step1}. Then, {step2}. So the answer is ({letter}).",
      prompts.COMMON_MISTAKES: " ".join(
          f"Answering ({prompts.option_letter(options.index(v))}) comes from {mistakes[v]}."
          for v in distractors),
  }


def generate(split: str, num_examples: int, seed: int) -> List[Dict]:
  rng = random.Random(f"{seed}:{split}")
  return [make_example(rng, i, split) for i in range(num_examples)]


def write_jsonl(records: List[Dict], path) -> files.Path:
  return files.write_atomic(path, "".join(json.dumps(record) + "\n" for record in records))


def iter_text(records: List[Dict]) -> Iterator[str]:
  """Every string a vocabulary must cover: samples, prompts and the annotations."""
  for r in records:
    question_text = prompts.format_question(r["question"], r["options"])
    yield prompts.sample_text(r["question"], r["options"], r["answer"])
    for kind in prompts.ANNOTATION_KINDS:
      yield prompts.teacher_prompt(question_text, r["answer"], kind) + " " + r[kind]


def make_splits(sizes: Dict[str, int], seed: int) -> Dict[str, List[Dict]]:
  """Disjoint splits: no question text of a later split occurs in an earlier one.

  `sizes` is ordered with the held-out split first (e.g. {'eval': 300, 'teacher': 1000,
  'student': 1000}); later splits draw until they have enough unseen questions.
  """
  seen = set()
  splits = {}
  for split, size in sizes.items():
    rng = random.Random(f"{seed}:{split}")
    records, index = [], 0
    while len(records) < size:
      record = make_example(rng, index, split)
      index += 1
      if record["question"] in seen:
        continue
      seen.add(record["question"])
      records.append(record)
      if index > 50 * size + 1000:
        raise ValueError(f"cannot draw {size} distinct '{split}' questions; lower the sizes")
    splits[split] = records
  return splits
