"""seqio tasks over a records JSONL file (the embedded synthetic task, or your own data).

A records file holds one JSON object a line: {'id', 'question', 'options': [...], 'answer':
'B'} and, for teacher instruction tuning, one field per annotation kind ('fundamentals',
'chain_of_thought', 'common_mistakes'). From one such file this module registers the same
task families that `tasks.py` registers for the paper's datasets, with the same features
and prompt strings (all from `prompts.py`):

  {name}_eval        rank classification: 'Q: .. (A) .. A: The answer is (' -> option letters
  teacher_{name}     teacher SFT: prompt + trigger -> the record's annotation, every kind
  original_{name}    student text in the 'original' format
  records_{name}     the student records as they are (annotation input 'seqio:records_{name}')

Annotated student tasks and mixtures over the annotation engine's shards then come from
`tasks.register_student_task` / `mixtures.register_student_mixture` with `dataset=name`.
"""
from __future__ import annotations

import functools
from typing import Dict, Iterator, Sequence

import seqio

from teacherlm_jax.data import prompts
from teacherlm_jax.data import sources
from teacherlm_jax.data import tasks
from teacherlm_jax.storage import files

_RECORD_FIELDS = ("id", "question", "options", "answer")


def read_records(path, required: Sequence[str] = _RECORD_FIELDS) -> Iterator[Dict]:
  """Records of a JSONL file; a row without a required field raises 'path:line: field ..'."""
  for row in sources.read_jsonl(path, required=required, skips=tasks.skip_log()):
    if not isinstance(row["options"], list) or not row["options"]:
      tasks.handle_bad_row(sources.BadRow(path, row["_line"], "options",
                                          "must be a non-empty list of strings"))
      continue
    try:
      prompts.letter_index(row["answer"], len(row["options"]))
    except ValueError as e:
      tasks.handle_bad_row(sources.BadRow(path, row["_line"], "answer", str(e)))
      continue
    yield row


def eval_example(record: Dict) -> Dict:
  question = prompts.format_question(record["question"], record["options"])
  options = prompts.eval_options(len(record["options"]))
  label = prompts.letter_index(record["answer"], len(options))
  return {"id": str(record["id"]), "inputs": prompts.eval_prompt_qa(question),
          "targets": options[label], "options": list(options), "label": label}


def teacher_examples(record: Dict, kinds: Sequence[str]) -> Iterator[Dict]:
  """One teacher SFT example per kind, its target the record's own text of that kind."""
  for kind in kinds:
    yield {**tasks.teacher_example(record, kind, text_field=kind), "id": f"{record['id']}/{kind}"}


def register_record_tasks(name: str, vocabulary: seqio.Vocabulary, *, eval_path=None,
                          teacher_path=None, student_path=None,
                          kinds: Sequence[str] = prompts.ANNOTATION_KINDS) -> Dict[str, str]:
  """Registers the tasks whose paths are given; returns {role: task name}."""
  names = {}
  if eval_path is not None:
    make = functools.partial(lambda split, p: map(eval_example, read_records(p)),
                             p=files.resolve(eval_path))
    names["eval"] = tasks.add_task(
        f"{name}_eval", tasks.generator_source(make, ("test",), tasks.EVAL_SIGNATURE),
        vocabulary, evaluation=True).name
  if teacher_path is not None:
    required = _RECORD_FIELDS + tuple(kinds)
    make = functools.partial(
        lambda split, p: (ex for r in read_records(p, required) for ex in teacher_examples(r, kinds)),
        p=files.resolve(teacher_path))
    names["teacher"] = tasks.add_task(
        f"teacher_{name}", tasks.generator_source(make, ("train",), tasks.TRAIN_SIGNATURE),
        vocabulary, evaluation=False).name
  if student_path is not None:
    make = functools.partial(
        lambda split, p: (tasks.student_example(r, {}, "original") for r in read_records(p)),
        p=files.resolve(student_path))
    names["original"] = tasks.add_task(
        f"original_{name}", tasks.generator_source(make, ("train",), tasks.TRAIN_SIGNATURE),
        vocabulary, evaluation=False).name
    names["records"] = tasks.add_records_task(
        f"records_{name}", functools.partial(lambda split, p: read_records(p),
                                             p=files.resolve(student_path))).name
  return names
