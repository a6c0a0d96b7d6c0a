"""seqio tasks: evaluation sets, teacher instruction tuning, original and annotated student data.

Nothing is registered at import. `register_tasks(vocabulary)` (gin-configurable; scripts call it
with the model's vocabulary) registers, re-registering when the vocabulary changes:

  evaluation      mmlu_{subject} x57, creak, ecqa, strategyqa           split 'test' (+ mmlu 'dev')
  teacher SFT     teacher_cot_{aqua,creak,ecqa,gsm8k,qasc,sensemaking,strategyqa}    'train'
  original        original_{creak,ecqa,strategyqa}                                     'train'
  records         records_{creak,ecqa,strategyqa}  (untokenised; the annotation input) 'train'

and `register_student_task(...)` adds an annotated task over annotation shards in a chosen
student format (see `mixtures.py` for the mixtures). The data directory is resolved only when a
dataset is read, so registering needs no data.

Every example carries string features `id`, `inputs`, `targets` (tokenised by the task's
vocabulary, no EOS on evaluation targets) and, for evaluation tasks, `options` (the
continuations to rank, e.g. ['A', 'B']) and `label` (index of the gold option). Training
texts are split so that `inputs + targets` is the whole TeacherLM text; `targets` starts with
the space that joins them, so byte-level BPE tokenises the boundary as in the full text.

Records (the shape the annotation engine also consumes) are dicts
{'id', 'question', 'options', 'answer'} with `answer` an option letter, or the answer text for
open questions (gsm8k). The `records_*` tasks hold them as they are, with no vocabulary and no
preprocessing (`register_records_tasks`); the annotation engine reads any seqio task whose
examples carry these fields (`task_records`, input 'seqio:<task>[:<split>]').

Bad rows raise `path:line: field ...`; with `set_on_bad_row('skip')` (scripts' --skip_bad_rows)
they are counted in `SKIPS` and logged instead.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence

from absl import logging
import gin
import numpy as np
import seqio
import tensorflow as tf

from teacherlm_jax.data import prompts
from teacherlm_jax.data import sources
from teacherlm_jax.storage import files

MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
    "college_biology", "college_chemistry", "college_computer_science", "college_mathematics",
    "college_medicine", "college_physics", "computer_security", "conceptual_physics",
    "econometrics", "electrical_engineering", "elementary_mathematics", "formal_logic",
    "global_facts", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics",
    "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history",
    "high_school_world_history", "human_aging", "human_sexuality", "international_law",
    "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing",
    "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law",
    "professional_medicine", "professional_psychology", "public_relations", "security_studies",
    "sociology", "us_foreign_policy", "virology", "world_religions")
MMLU_TASKS = tuple(f"mmlu_{s}" for s in MMLU_SUBJECTS)
QA_EVAL_TASKS = ("creak", "ecqa", "strategyqa")
# Options the reference harness ranks per QA evaluation set.
QA_NUM_OPTIONS = {"creak": 2, "ecqa": 5, "strategyqa": 2}
_QA_EVAL_FILES = {"creak": ("teacherlm_eval", "creak", "creak.jsonl"),
                  "ecqa": ("teacherlm_eval", "ecqa", "ecqa.jsonl"),
                  "strategyqa": ("teacherlm_eval", "strategy_qa", "strategy_qa.jsonl")}
_QA_EVAL_ID_FIELD = {"creak": "ex_id", "ecqa": "q_no", "strategyqa": "qid"}
FLAN_COT_NAMES = ("aqua", "creak", "ecqa", "gsm8k", "qasc", "sensemaking", "strategyqa")
ORIGINAL_DATASETS = ("creak", "ecqa", "strategyqa")
CREAK_QUESTION = "Determine the correctness of the following sentence. "

SKIPS = sources.SkipLog()
# Rows removed from FLAN-derived tasks because their question is in an evaluation set.
LEAKAGE_REMOVED: Dict[str, int] = {}
_ON_BAD_ROW = "raise"


@gin.configurable
def set_on_bad_row(mode: str = "raise") -> None:
  """'raise' (default) or 'skip' (count in SKIPS and log) for bad input rows."""
  global _ON_BAD_ROW
  if mode not in ("raise", "skip"):
    raise ValueError(f"on_bad_row={mode!r}: expected 'raise' or 'skip'")
  _ON_BAD_ROW = mode


def skip_log() -> Optional[sources.SkipLog]:
  """The log readers count bad rows in when skipping, else None (readers then raise)."""
  return SKIPS if _ON_BAD_ROW == "skip" else None


def handle_bad_row(error: sources.BadRow) -> None:
  """Counts `error` in SKIPS when skipping bad rows, else raises it."""
  if _ON_BAD_ROW == "skip":
    SKIPS.add(error)
  else:
    raise error


# ------------------------------------------------------------------------------------------
# Records


def mmlu_examples(subject: str, split: str = "test") -> Iterator[Dict[str, Any]]:
  """Evaluation examples of one MMLU subject ('test' or 'dev')."""
  path = sources.data_path("mmlu", split, f"{subject}_{split}.csv")
  for row in sources.read_mmlu_csv(path, skips=skip_log()):
    yield {"id": f"{subject}_{split}_{row['_line']}",
           "inputs": prompts.eval_prompt_mmlu(subject, row["question"], row["options"]),
           "options": list(prompts.eval_options(len(row["options"]))),
           "label": row["answer"]}


def qa_eval_examples(name: str) -> Iterator[Dict[str, Any]]:
  """CREAK / ECQA / StrategyQA evaluation examples (the TeacherLM paper's sets)."""
  path = sources.data_path(*_QA_EVAL_FILES[name])
  num_options = QA_NUM_OPTIONS[name]
  id_field = _QA_EVAL_ID_FIELD[name]
  for row in sources.read_jsonl(path, required=("question", "answer", id_field), skips=skip_log()):
    try:
      label = prompts.letter_index(row["answer"], num_options)
    except ValueError as e:
      handle_bad_row(sources.BadRow(path, row["_line"], "answer", f"is invalid: {e}"))
      continue
    yield {"id": str(row[id_field]), "inputs": prompts.eval_prompt_qa(row["question"]),
           "options": list(prompts.eval_options(num_options)), "label": label}


def _normalize(text: str) -> str:
  """Lower-case alphanumerics separated by single spaces: the leakage match key."""
  return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


@functools.lru_cache(maxsize=None)
def eval_question_keys(data_root: str) -> frozenset:
  """Normalised questions of every QA evaluation set (CREAK sentences, ECQA question texts,
  StrategyQA original questions); `data_root` keys the cache."""
  del data_root
  keys = set()
  fields = {"creak": "sentence", "ecqa": "q_text", "strategyqa": "origin_question"}
  for name, field in fields.items():
    for row in sources.read_jsonl(sources.data_path(*_QA_EVAL_FILES[name]), required=(field,)):
      keys.add(_normalize(row[field]))
  return frozenset(keys)


def flan_question_keys(question: str) -> List[str]:
  """Match keys of a FLAN question: its stem, and any quoted claim (FLAN CREAK quotes it)."""
  stem = question.split("\nOptions:")[0]
  keys = [_normalize(stem)]
  keys.extend(_normalize(quoted) for quoted in re.findall(r'"([^"]+)"', stem))
  return keys


def _parse_flan_options(question: str, answer: str, path, line: int):
  """FLAN 'stem\\nOptions:\\n- a\\n- b' -> (stem, options, answer letter or open answer)."""
  stem, has_options, option_block = question.partition("\nOptions:")
  stem = " ".join(stem.split())
  if not has_options:
    if answer in ("yes", "no"):
      return stem, ["yes", "no"], "A" if answer == "yes" else "B"
    return stem, [], answer
  options = []
  for option_line in option_block.split("\n"):
    option_line = option_line.strip()
    if not option_line:
      continue
    option_line = re.sub(r"^- ", "", option_line)
    match = re.match(r"^\(([A-J])\) ?(.*)$", option_line)
    options.append(match.group(2) if match else option_line)
  if not options:
    raise sources.BadRow(path, line, "question", "has an empty Options: list")
  if re.fullmatch(r"\([A-J]\)", answer):
    letter = answer[1]
    prompts.letter_index(letter, len(options))
    return stem, options, letter
  for i, option in enumerate(options):
    # Sense-making answers name the option ('Sentence A') whose text is 'Sentence A: "..."'.
    if option == answer or option.startswith(answer + ":"):
      return stem, options, prompts.option_letter(i)
  raise sources.BadRow(path, line, "answer", f"{answer!r} is not one of the options {options}")


def flan_records(name: str, *, drop_eval_overlap: bool = True) -> Iterator[Dict[str, Any]]:
  """FLAN CoT rows as records plus 'rationale', without questions of any evaluation set.

  The number of removed rows is logged and kept in LEAKAGE_REMOVED[name].
  """
  path = sources.data_path("flan_cot_data", f"{name}_train.tsv")
  keys = eval_question_keys(str(sources.data_dir())) if drop_eval_overlap else frozenset()
  removed = 0
  for row in sources.read_flan_tsv(path, skips=skip_log()):
    if any(k in keys for k in flan_question_keys(row["question"])):
      removed += 1
      continue
    try:
      stem, options, answer = _parse_flan_options(row["question"], row["answer"], path,
                                                  row["_line"])
    except sources.BadRow as e:
      handle_bad_row(e)
      continue
    except ValueError as e:
      handle_bad_row(sources.BadRow(path, row["_line"], "answer", str(e)))
      continue
    yield {"id": f"flan_{name}_{row['_line']}", "question": stem, "options": options,
           "answer": answer, "rationale": row["rationale"]}
  LEAKAGE_REMOVED[name] = removed
  logging.info("%s: removed %d rows whose question is in an evaluation set", path, removed)


def creak_records(split: str = "train") -> Iterator[Dict[str, Any]]:
  """CREAK (official) rows as records: 'Determine the correctness ... (A) True (B) False'."""
  path = sources.data_path("creak_official", f"{split}.json")
  for row in sources.read_jsonl(path, required=("ex_id", "sentence", "label"), skips=skip_log()):
    if row["label"] not in ("true", "false"):
      handle_bad_row(sources.BadRow(path, row["_line"], "label", f"is {row['label']!r}, not true/false"))
      continue
    yield {"id": row["ex_id"], "question": CREAK_QUESTION + row["sentence"],
           "options": ["True", "False"], "answer": "A" if row["label"] == "true" else "B"}


def original_records(dataset: str) -> Iterator[Dict[str, Any]]:
  """The training records student tasks (and the annotation engine) start from."""
  if dataset == "creak":
    return creak_records("train")
  if dataset in ("ecqa", "strategyqa"):
    return ({k: r[k] for k in ("id", "question", "options", "answer")}
            for r in flan_records(dataset))
  raise ValueError(f"unknown original dataset {dataset!r}; expected one of {ORIGINAL_DATASETS}")


def split_text(full_text: str) -> Dict[str, str]:
  """Splits a TeacherLM text before ' A: The answer is' into inputs / targets."""
  cut = full_text.find(" A: The answer is")
  if cut < 0:
    raise ValueError(f"text has no ' A: The answer is': {full_text[:80]!r}")
  return {"inputs": full_text[:cut], "targets": full_text[cut:]}


def teacher_example(record: Mapping[str, Any], kind: str = prompts.CHAIN_OF_THOUGHT,
                    text_field: str = "rationale"):
  """Teacher SFT example: the record's prompt + `kind`'s trigger -> its `text_field` text."""
  question = prompts.format_question(record["question"], record["options"])
  return {"id": record["id"], "inputs": prompts.teacher_prompt(question, record["answer"], kind),
          "targets": " " + " ".join(str(record[text_field]).split())}


def student_example(record: Mapping[str, Any], annotations: Mapping[str, str], fmt: str,
                    seed: int = 0) -> Dict[str, str]:
  sample = prompts.sample_text(record["question"], record["options"], record["answer"])
  text = prompts.student_text(sample, annotations, fmt, example_id=record["id"], seed=seed)
  return {"id": record["id"], **split_text(text)}


def annotated_records(dataset: str, shard_pattern: str, kinds: Sequence[str], *,
                      skip_flagged: bool = False) -> Iterator[tuple]:
  """(record, annotations) for every annotation shard row (JSONL: id + kind fields).

  Rows that carry question/options/answer are used as they are; others are joined by id with
  `original_records(dataset)`. `skip_flagged`: rows whose `kinds` carry a quality flag (the
  annotation job's `qc` field) are skipped and counted in `SKIPS`.
  """
  paths = files.glob(shard_pattern)
  if not paths:
    raise FileNotFoundError(f"no annotation shards match {shard_pattern!r}")
  originals = None
  for path in paths:
    for row in sources.read_jsonl(path, required=("id", *kinds), skips=skip_log()):
      flagged = [k for k in kinds if (row.get("qc") or {}).get(k)]
      if skip_flagged and flagged:
        SKIPS.add(sources.BadRow(path, row["_line"], "qc", f"quality flags on {flagged}"))
        continue
      if all(k in row for k in ("question", "options", "answer")):
        record = {k: row[k] for k in ("id", "question", "options", "answer")}
      else:
        if originals is None:
          originals = {r["id"]: r for r in original_records(dataset)}
        record = originals.get(row["id"])
        if record is None:
          handle_bad_row(sources.BadRow(path, row["_line"], "id",
                                 f"{row['id']!r} is not in the {dataset} training data"))
          continue
      yield record, {k: row[k] for k in kinds}


# ------------------------------------------------------------------------------------------
# seqio plumbing

_TEXT_SPEC = tf.TensorSpec((), tf.string)
EVAL_SIGNATURE = {"id": _TEXT_SPEC, "inputs": _TEXT_SPEC, "targets": _TEXT_SPEC,
                  "options": tf.TensorSpec((None,), tf.string),
                  "label": tf.TensorSpec((), tf.int32)}
TRAIN_SIGNATURE = {"id": _TEXT_SPEC, "inputs": _TEXT_SPEC, "targets": _TEXT_SPEC}
RECORD_SIGNATURE = {"id": _TEXT_SPEC, "question": _TEXT_SPEC,
                    "options": tf.TensorSpec((None,), tf.string), "answer": _TEXT_SPEC}


def _eval_row(example: Dict[str, Any]) -> Dict[str, Any]:
  example = dict(example)
  example["targets"] = example["options"][example["label"]]
  return example


def generator_source(make_examples: Callable[[str], Iterator[Dict[str, Any]]],
                      splits: Sequence[str], signature) -> seqio.FunctionDataSource:
  """A seqio source over a python generator of examples.

  Sources of scalar features (the training tasks) are read into tensors when the dataset is
  built: tf.data can then checkpoint an iterator's position, so training resumes without
  replaying its input. Sources with list features (evaluation options) stay generators, read
  as they are iterated; evaluation always starts from the beginning.
  """
  scalar = all(spec.shape.rank == 0 for spec in signature.values())

  def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None) -> tf.data.Dataset:
    del shuffle_files, seed  # one file per split: order is shuffled later by seqio if asked.
    if not scalar:
      return tf.data.Dataset.from_generator(lambda: make_examples(split),
                                            output_signature=signature)
    rows = list(make_examples(split))
    return tf.data.Dataset.from_tensor_slices(
        {name: tf.constant([row[name] for row in rows], dtype=spec.dtype, shape=(len(rows),))
         for name, spec in signature.items()})

  return seqio.FunctionDataSource(dataset_fn, splits=list(splits))


def accuracy_from_scores(targets: Sequence[int], scores: Sequence[np.ndarray]) -> Dict[str, Any]:
  """seqio score metric for rank classification: `scores[i]` holds one score per option of
  example i (higher is better), `targets[i]` the gold option index.

  `gold_score` is the mean score of the gold option: its log-probability for the paper's
  one-token letters, a measure that moves before accuracy does.
  """
  if len(targets) != len(scores):
    raise ValueError(f"{len(targets)} targets but {len(scores)} scores")
  correct = [int(np.argmax(s) == t) for t, s in zip(targets, scores)]
  gold = [float(s[t]) for t, s in zip(targets, scores)]
  return {"accuracy": 100.0 * float(np.mean(correct)) if correct else float("nan"),
          "gold_score": float(np.mean(gold)) if gold else float("nan"),
          "num_examples": len(correct)}


def _label_postprocessor(output, example=None, is_target=False):
  """Targets of evaluation tasks become the gold option index (for the score metric)."""
  if is_target and example is not None and "label" in example:
    return int(example["label"])
  return output


def _features(vocabulary: seqio.Vocabulary, target_eos: bool) -> Dict[str, seqio.Feature]:
  return {"inputs": seqio.Feature(vocabulary, add_eos=False, required=False),
          "targets": seqio.Feature(vocabulary, add_eos=target_eos)}


def add_task(name: str, source, vocabulary: seqio.Vocabulary, *, evaluation: bool) -> seqio.Task:
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
      name, source=source,
      preprocessors=[seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
                     seqio.preprocessors.append_eos_after_trim],
      output_features=_features(vocabulary, target_eos=not evaluation),
      postprocess_fn=_label_postprocessor if evaluation else None,
      metric_fns=[accuracy_from_scores] if evaluation else [])


def register_eval_tasks(vocabulary: seqio.Vocabulary) -> List[str]:
  names = []
  for subject in MMLU_SUBJECTS:
    make = functools.partial(lambda split, s: map(_eval_row, mmlu_examples(s, split)), s=subject)
    names.append(add_task(f"mmlu_{subject}", generator_source(make, ("test", "dev"), EVAL_SIGNATURE),
                      vocabulary, evaluation=True).name)
  for name in QA_EVAL_TASKS:
    make = functools.partial(lambda split, n: map(_eval_row, qa_eval_examples(n)), n=name)
    names.append(add_task(name, generator_source(make, ("test",), EVAL_SIGNATURE), vocabulary,
                      evaluation=True).name)
  return names


def register_teacher_tasks(vocabulary: seqio.Vocabulary) -> List[str]:
  names = []
  for flan_name in FLAN_COT_NAMES:
    make = functools.partial(lambda split, n: map(teacher_example, flan_records(n)), n=flan_name)
    names.append(add_task(f"teacher_cot_{flan_name}",
                      generator_source(make, ("train",), TRAIN_SIGNATURE), vocabulary,
                      evaluation=False).name)
  return names


def register_original_tasks(vocabulary: seqio.Vocabulary) -> List[str]:
  names = []
  for dataset in ORIGINAL_DATASETS:
    make = functools.partial(
        lambda split, d: (student_example(r, {}, "original") for r in original_records(d)),
        d=dataset)
    names.append(add_task(f"original_{dataset}", generator_source(make, ("train",), TRAIN_SIGNATURE),
                      vocabulary, evaluation=False).name)
  return names


def add_records_task(name: str, make_records: Callable[[str], Iterator[Dict[str, Any]]],
                     splits: Sequence[str] = ("train",)) -> seqio.Task:
  """A task of records (their RECORD_SIGNATURE fields): no vocabulary, no tokenisation."""

  def make(split):
    for record in make_records(split):
      yield {**{k: record[k] for k in RECORD_SIGNATURE}, "id": str(record["id"])}

  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(name, source=generator_source(make, splits, RECORD_SIGNATURE),
                                preprocessors=[], output_features={})


def register_records_tasks() -> List[str]:
  """records_{creak,ecqa,strategyqa}: the training records the original/annotated tasks use."""
  return [add_records_task(f"records_{dataset}",
                           functools.partial(lambda split, d: original_records(d), d=dataset)).name
          for dataset in ORIGINAL_DATASETS]


def _python_value(value):
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray):
    return [_python_value(v) for v in value.tolist()]
  if isinstance(value, list):
    return [_python_value(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def task_records(name: str, split: str = "train") -> Iterator[Dict[str, Any]]:
  """The examples of task `name`'s `split`, in order, as python dicts (text as str, arrays as
  lists): what the annotation engine reads for input 'seqio:<name>:<split>'."""
  task = get_task(name)
  if split not in task.splits:
    raise ValueError(f"task {name!r} has no split {split!r} (splits: {list(task.splits)})")
  dataset = task.get_dataset(sequence_length=None, split=split, shuffle=False, use_cached=False)
  return ({key: _python_value(value) for key, value in example.items()}
          for example in dataset.as_numpy_iterator())


def register_student_task(dataset: str, shard_pattern: str, fmt: str,
                          vocabulary: seqio.Vocabulary, *, name: Optional[str] = None,
                          seed: int = 0, skip_flagged: bool = False) -> str:
  """An annotated student task: `shard_pattern` JSONL shards rendered in student format `fmt`
  (rows with quality flags on its kinds skipped if `skip_flagged`)."""
  kinds = prompts.annotation_order(fmt)  # validates fmt; SHUFFLE needs all three kinds
  name = name or f"student_{dataset}_{fmt}"

  def make(split):
    del split
    for record, texts in annotated_records(dataset, shard_pattern, kinds,
                                           skip_flagged=skip_flagged):
      yield student_example(record, texts, fmt, seed)

  return add_task(name, generator_source(make, ("train",), TRAIN_SIGNATURE), vocabulary,
              evaluation=False).name


@gin.configurable
def register_tasks(vocabulary: seqio.Vocabulary = gin.REQUIRED) -> List[str]:
  """Registers every fixed task (evaluation, teacher SFT, original, records) for `vocabulary`."""
  return (register_eval_tasks(vocabulary) + register_teacher_tasks(vocabulary)
          + register_original_tasks(vocabulary) + register_records_tasks())


def get_task(name: str) -> seqio.Task:
  """The registered task `name`; a clear error for unknown names."""
  if name not in seqio.TaskRegistry.names():
    known = sorted(seqio.TaskRegistry.names())
    raise ValueError(f"unknown task {name!r} (registered: {len(known)} tasks, e.g. "
                     f"{known[:5]}; call tasks.register_tasks(vocabulary) first)")
  return seqio.TaskRegistry.get(name)
