"""The embedded arithmetic task: answers are right, distractors are real mistakes, splits disjoint."""
from teacherlm_jax.data import prompts, synthetic


def _evaluate(question: str) -> int:
  expression = question.removeprefix("What is ").removesuffix("?").replace(" x ", " * ")
  return eval(expression)  # pylint: disable=eval-used  (our own generated arithmetic)


def test_gold_option_is_the_value_of_the_expression():
  for record in synthetic.generate("train", 300, seed=1):
    answer_index = prompts.letter_index(record["answer"], len(record["options"]))
    assert int(record["options"][answer_index]) == _evaluate(record["question"])
    assert len(set(record["options"])) == 4
    assert record["chain_of_thought"].endswith(f"So the answer is ({record['answer']}).")
    for letter in "ABCD":
      if letter != record["answer"]:
        assert f"({letter})" in record["common_mistakes"]


def test_splits_are_disjoint_and_deterministic():
  sizes = {"eval": 100, "teacher": 200, "student": 200}
  splits = synthetic.make_splits(sizes, seed=3)
  questions = [set(r["question"] for r in splits[s]) for s in sizes]
  assert all(len(q) == n for q, n in zip(questions, sizes.values()))
  assert not questions[0] & questions[1] and not questions[0] & questions[2]
  assert not questions[1] & questions[2]
  assert synthetic.make_splits(sizes, seed=3) == splits
  assert synthetic.make_splits(sizes, seed=4) != splits
