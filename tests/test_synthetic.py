"""The embedded creatures task: gold answers follow the creature's kind, the evaluation asks what
the students' records never did, and the options alone do not give the answer away."""
import collections
import itertools

import pytest

from teacherlm_jax.data import prompts, synthetic

SPLITS = synthetic.make_splits(128, seed=0)


def _gold_value(record) -> str:
  return record["options"][prompts.letter_index(record["answer"], len(record["options"]))]


def test_gold_option_is_the_kinds_value_and_annotations_state_the_kind():
  for record in itertools.chain(*SPLITS.values()):
    assert _gold_value(record) == synthetic.value_of(record["kind"], record["property"])
    assert record["chain_of_thought"].startswith(f"It is a {record['kind']}.")
    assert record["chain_of_thought"].endswith(f"So the answer is ({record['answer']}).")
    assert record["fundamentals"] == synthetic.kind_table(record["kind"])
    for letter in "ABCD":
      assert (f"({letter})" in record["common_mistakes"]) == (letter != record["answer"])


def test_evaluation_asks_what_the_students_records_say_nothing_about():
  pair = lambda r: (r["creature"], r["property"])
  student, teacher = set(map(pair, SPLITS["student"])), set(map(pair, SPLITS["teacher"]))
  held_out = set(map(pair, SPLITS["eval"]))
  assert (len(student), len(held_out), len(teacher)) == (256, 128, 384)
  assert not student & held_out and not teacher & held_out and student < teacher
  taught = collections.defaultdict(set)
  for creature, prop in student:
    taught[creature].add(synthetic.PROPERTIES[prop][0])
  for creature, prop in held_out:
    # The evaluated property hangs on the factor the students' records never show.
    assert taught[creature] == {1 - synthetic.PROPERTIES[prop][0]}
  # Every kind x property pair equally often: the taught factor says nothing of the other.
  counts = collections.Counter((r["kind"], r["property"]) for r in SPLITS["eval"])
  assert len(counts) == 16 * 4 and set(counts.values()) == {2}
  assert synthetic.make_splits(128, seed=0) == SPLITS
  assert synthetic.make_splits(128, seed=1) != SPLITS


def test_a_creatures_letter_on_one_property_differs_on_its_sibling():
  for kind in synthetic.KINDS:
    for a, b in (("color", "size"), ("home", "food")):
      assert (synthetic.PROPERTIES[a][1].index(synthetic.value_of(kind, a)) !=
              synthetic.PROPERTIES[b][1].index(synthetic.value_of(kind, b)))


def test_options_only_baseline_is_at_chance():
  chance = 100.0 / 4
  for train in (SPLITS["student"], SPLITS["student"] + SPLITS["teacher"]):
    assert synthetic.options_only_accuracy(train, SPLITS["eval"]) == pytest.approx(chance, abs=5)


def test_options_only_baseline_finds_a_shortcut_when_there_is_one():
  """The old arithmetic task's flaw, in miniature: the gold option is always listed first."""
  leaky = lambda records: [{**r, "answer": "A", "options": [_gold_value(r)] +
                            [o for o in r["options"] if o != _gold_value(r)]} for r in records]
  assert synthetic.options_only_accuracy(leaky(SPLITS["student"]), leaky(SPLITS["eval"])) == 100


def test_shuffled_annotations_come_from_another_record():
  rows = SPLITS["student"][:50]
  shuffled = synthetic.shuffled_annotations(rows, prompts.ANNOTATION_KINDS, seed=0)
  by_id = {r["id"]: r for r in rows}
  for row, original in zip(shuffled, rows):
    assert row["id"] == original["id"] and row["answer"] == original["answer"]
    assert row["annotations_from"] != row["id"]
    assert row["chain_of_thought"] == by_id[row["annotations_from"]]["chain_of_thought"]
  assert sorted(r["annotations_from"] for r in shuffled) == sorted(by_id)
