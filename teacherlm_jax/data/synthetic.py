"""The embedded task of the tiny pipeline: invented creatures whose hidden kind fixes their traits.

Each creature (an invented name, e.g. 'bako') belongs to one of 16 invented kinds ('glimmer',
...). A kind is a pair of hidden factors: the first fixes a creature's color and size, the
second its home and food. A question asks one property of one creature, in the TeacherLM
multiple-choice format:

  Q: What is the home of the bako? (A) cave (B) tree (C) lake (D) dune A: The answer is (B).

The students' records ask two properties of each of their creatures, both fixed by the same
factor (color and size, or home and food); the held-out evaluation asks one property fixed by
the other factor. Plain answers therefore carry nothing about an evaluated answer: the original
student can only guess. The teacher is tuned on every question but the evaluation's (the
students' two and the fourth property of every creature), with the reference annotations, so
it knows each creature's kind. The reference annotations hold the
missing link (what a teacher knows beyond the student's data):
  fundamentals      the kind's whole table ('A glimmer has color red, size tiny, home cave and
                    food seeds.'),
  chain_of_thought  the creature's kind and the asked trait ('It is a glimmer. ...'),
  common_mistakes   which other kind each distractor belongs to.
They refer to the creature as 'it': an annotation moved onto another question (the shuffled
control) then says something false about that question's creature.

Options are listed in one fixed order per property (like True/False tasks). Every kind x
property pair is equally frequent in the evaluation, so no option-only rule beats chance.
"""
from __future__ import annotations

import collections
import json
import math
import random
from typing import Dict, Iterator, List, Mapping, Sequence

from teacherlm_jax.data import prompts
from teacherlm_jax.storage import files

KINDS = ("glimmer", "thornback", "fenwing", "dusker", "mirelark", "quillon", "rockhop",
         "sableen", "tiderun", "vexling", "wispet", "brambler", "cinderkit", "dapplemaw",
         "frostnib", "gloamer")
# Property -> (the kind factor it depends on, its options in their fixed order).
PROPERTIES = {
    "color": (0, ("red", "blue", "green", "yellow")),
    "size": (0, ("tiny", "small", "large", "huge")),
    "home": (1, ("cave", "tree", "lake", "dune")),
    "food": (1, ("fruit", "fish", "seeds", "roots")),
}
# Property -> the option index of each value of its factor; the two properties of a factor
# never share a letter, so a creature's letter on one says nothing about the other.
_LETTER_OF_FACTOR = {"color": (0, 1, 2, 3), "size": (1, 0, 3, 2), "home": (0, 1, 2, 3),
                     "food": (2, 3, 1, 0)}
_FACTOR_VALUES = 4
_SYLLABLES = ("ba", "ko", "ri", "mu", "ze", "ta", "lo", "ni", "fe", "du", "sa", "pi", "go",
              "we", "ha", "ju", "vo", "ke", "ra", "nu")


def factors(kind: str) -> tuple:
  index = KINDS.index(kind)
  return index // _FACTOR_VALUES, index % _FACTOR_VALUES


def value_of(kind: str, prop: str) -> str:
  factor, options = PROPERTIES[prop]
  return options[_LETTER_OF_FACTOR[prop][factors(kind)[factor]]]


def kind_table(kind: str) -> str:
  """The fundamentals of a kind: all its properties in one sentence."""
  return (f"A {kind} has color {value_of(kind, 'color')}, size {value_of(kind, 'size')}, "
          f"home {value_of(kind, 'home')} and food {value_of(kind, 'food')}.")


def make_record(name: str, kind: str, prop: str, split: str) -> Dict:
  """One question with its gold letter and the three reference annotations."""
  options = list(PROPERTIES[prop][1])
  answer = value_of(kind, prop)
  letter = prompts.option_letter(options.index(answer))
  mistakes = []
  for other in KINDS:
    wrong = value_of(other, prop)
    # One kind per distractor: the nearest, differing from `kind` in the asked factor only.
    if wrong != answer and all(m[0] != options.index(wrong) for m in mistakes) and (
        factors(other)[1 - PROPERTIES[prop][0]] == factors(kind)[1 - PROPERTIES[prop][0]]):
      mistakes.append((options.index(wrong),
                       f"Answering ({prompts.option_letter(options.index(wrong))}) comes from "
                       f"taking it for a {other}, whose {prop} is {wrong}."))
  return {
      "id": f"creature-{split}-{name}-{prop}",
      "question": f"What is the {prop} of the {name}?",
      "options": options,
      "answer": letter,
      "creature": name,
      "kind": kind,
      "property": prop,
      prompts.FUNDAMENTALS: kind_table(kind),
      prompts.CHAIN_OF_THOUGHT: (f"It is a {kind}. The {prop} of a {kind} is {answer}. "
                                 f"So the answer is ({letter})."),
      prompts.COMMON_MISTAKES: " ".join(text for _, text in sorted(mistakes)),
  }


def creatures(num_creatures: int, seed: int) -> List[tuple]:
  """(name, kind) pairs: distinct invented names, kinds equally frequent, in random order."""
  if num_creatures % (4 * len(KINDS)) or num_creatures > len(_SYLLABLES) ** 2:
    raise ValueError(f"num_creatures={num_creatures}: must be a multiple of {4 * len(KINDS)} "
                     f"and at most {len(_SYLLABLES) ** 2}")
  rng = random.Random(f"{seed}:creatures")
  names = rng.sample([a + b for a in _SYLLABLES for b in _SYLLABLES], num_creatures)
  return [(name, KINDS[i % len(KINDS)]) for i, name in enumerate(names)]


def make_splits(num_creatures: int, seed: int) -> Dict[str, List[Dict]]:
  """Records of the 'eval', 'student' and 'teacher' splits, one property of a creature each.

  The creature of rank r within its kind: its students' records ask the two properties of
  factor r mod 2; 'eval' asks one property of the other factor (the first or second by
  (r // 2) mod 2); 'teacher' asks the other three. Every kind x property pair is then equally
  frequent in 'eval', and no evaluation pair is in another split.
  """
  by_factor = [[p for p, (f, _) in PROPERTIES.items() if f == factor] for factor in (0, 1)]
  rank = collections.Counter()
  splits = {"eval": [], "student": [], "teacher": []}
  for name, kind in creatures(num_creatures, seed):
    r = rank[kind]
    rank[kind] += 1
    taught, other = by_factor[r % 2], by_factor[1 - r % 2]
    held_out = other[(r // 2) % 2]
    splits["student"] += [make_record(name, kind, p, "student") for p in taught]
    splits["eval"].append(make_record(name, kind, held_out, "eval"))
    splits["teacher"] += [make_record(name, kind, p, "teacher") for p in taught + other
                          if p != held_out]
  for records in splits.values():
    random.Random(f"{seed}:order").shuffle(records)
  return splits


def options_only_accuracy(train: Sequence[Mapping], held_out: Sequence[Mapping]) -> float:
  """Accuracy (%) of a baseline that sees only the options of a question, never its text.

  Trained by counting on `train`, it scores each option by how often its text, its letter and
  its text among these very options were the gold answer (add-one smoothed log-odds, summed)
  and picks the best: any rule that reads the answer off the options alone shows up here.
  """
  gold, seen = collections.Counter(), collections.Counter()

  def features(record, i):
    option = record["options"][i]
    return [("text", option), ("letter", i), ("text_in_set", option, tuple(record["options"]))]

  for record in train:
    answer = prompts.letter_index(record["answer"], len(record["options"]))
    for i in range(len(record["options"])):
      for feature in features(record, i):
        seen[feature] += 1
        gold[feature] += int(i == answer)

  def score(record, i):
    return sum(math.log((gold[f] + 1) / (seen[f] - gold[f] + 1)) for f in features(record, i))

  correct = 0
  for record in held_out:
    scores = [score(record, i) for i in range(len(record["options"]))]
    correct += int(scores.index(max(scores)) ==
                   prompts.letter_index(record["answer"], len(record["options"])))
  return 100.0 * correct / len(held_out)


def shuffled_annotations(rows: Sequence[Mapping], kinds: Sequence[str], seed: int) -> List[Dict]:
  """Each row with the `kinds` texts of another row (a random derangement): the control that
  keeps the annotations' words and facts but breaks their link to the question."""
  order = list(range(len(rows)))
  rng = random.Random(f"{seed}:shuffle")
  while len(rows) > 1 and any(i == j for i, j in enumerate(order)):
    rng.shuffle(order)
  return [{**row, **{k: rows[j][k] for k in kinds}, "annotations_from": rows[j]["id"]}
          for row, j in zip(rows, order)]


def write_jsonl(records: Sequence[Dict], path) -> files.Path:
  return files.write_atomic(path, "".join(json.dumps(record) + "\n" for record in records))


def iter_text(records: Sequence[Dict]) -> Iterator[str]:
  """Every string a vocabulary must cover: samples, prompts and the annotations."""
  for r in records:
    question_text = prompts.format_question(r["question"], r["options"])
    yield prompts.sample_text(r["question"], r["options"], r["answer"])
    for kind in prompts.ANNOTATION_KINDS:
      yield prompts.teacher_prompt(question_text, r["answer"], kind) + " " + r[kind]
