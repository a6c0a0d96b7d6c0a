"""seqio mixtures: evaluation groups, the teacher SFT mixture, student mixtures.

  mmlu            the 57 mmlu_{subject} tasks (reported as their macro average)
  teacherlm_eval  mmlu + creak + ecqa + strategyqa (macro average of the four)
  teacher_cot     teacher_cot_* over every FLAN CoT set, leakage-filtered
  teacher_multitask  the teacher's stage 1 (multi-task): FLAN CoT, plus P3-Sense and Muffin
                  once their data is in the data directory (`register_teacher_multitask`)

Student mixtures combine an original task with its annotated variant at chosen rates, per
dataset (`register_student_mixture`) or across datasets (`register_multitask_student_mixture`);
`student_mixture` (gin-configurable) does it for any annotation job's output directory, so a
student trains from annotations with no pipeline (scripts/train.py).
`register_all(vocabulary)` registers every task and fixed mixture; nothing happens at import.
"""
from __future__ import annotations

import pathlib
from typing import List, Mapping, Optional, Sequence, Tuple

import gin
import seqio

from teacherlm_jax.data import sources
from teacherlm_jax.data import tasks

EVAL_MIXTURES = {"mmlu": tasks.MMLU_TASKS,
                 "teacherlm_eval": ("mmlu",) + tasks.QA_EVAL_TASKS}


def add_mixture(name: str, parts: Sequence, default_rate=None) -> str:
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, list(parts), default_rate=default_rate)
  return name


def register_fixed_mixtures() -> List[str]:
  names = [add_mixture("mmlu", EVAL_MIXTURES["mmlu"], default_rate=1.0),
           add_mixture("teacherlm_eval", EVAL_MIXTURES["teacherlm_eval"], default_rate=1.0)]
  names.append(add_mixture("teacher_cot", [f"teacher_cot_{n}" for n in tasks.FLAN_COT_NAMES],
                            default_rate=1.0))
  return names


@gin.configurable
def register_all(vocabulary: seqio.Vocabulary = gin.REQUIRED) -> List[str]:
  """Registers every fixed task and mixture for `vocabulary` (re-registers on change)."""
  return tasks.register_tasks(vocabulary) + register_fixed_mixtures()


# The teacher's stage-1 collections (the paper: P3-Sense, Muffin and CoT data). Those with no
# reader of their own are JSONL files of {'inputs', 'targets'} in the data directory.
MULTITASK_COLLECTIONS = {"flan_cot": "teacher_cot", "p3_sense": "p3_sense/train.jsonl",
                         "muffin": "muffin/train.jsonl"}


def _inputs_targets_task(name: str, path: pathlib.Path, vocabulary: seqio.Vocabulary) -> str:
  def make(split):
    del split
    for row in sources.read_jsonl(path, required=("inputs", "targets")):
      yield {"id": f"{name}/{row['_line']}", "inputs": row["inputs"], "targets": row["targets"]}
  return tasks.add_task(name, tasks.generator_source(make, ("train",), tasks.TRAIN_SIGNATURE),
                        vocabulary, evaluation=False).name


def register_teacher_multitask(vocabulary: seqio.Vocabulary,
                               name: str = "teacher_multitask") -> Tuple[str, dict]:
  """(mixture name, {collection: reason skipped}): the teacher's stage-1 mixture of every
  collection whose data is present, at equal rates; absent ones are skipped with the reason."""
  parts, skipped = [], {}
  for collection, source in MULTITASK_COLLECTIONS.items():
    if collection == "flan_cot":
      register_all(vocabulary)
      parts.append(source)
      continue
    path = sources.data_dir() / source
    if not path.exists():
      skipped[collection] = f"no data at {path} (JSONL of inputs/targets; not distributed here)"
      continue
    parts.append(_inputs_targets_task(f"teacher_{collection}", path, vocabulary))
  return add_mixture(name, parts, default_rate=1.0), skipped


def register_student_mixture(dataset: str, shard_pattern: str, fmt: str,
                             vocabulary: seqio.Vocabulary, *, original_rate: float = 1.0,
                             annotated_rate: float = 1.0, name: Optional[str] = None,
                             seed: int = 0) -> str:
  """original_{dataset} + its annotated variant in format `fmt`, mixed at the given rates."""
  if original_rate < 0 or annotated_rate < 0 or original_rate + annotated_rate <= 0:
    raise ValueError(f"rates must be >= 0 and not both 0 (got original={original_rate}, "
                     f"annotated={annotated_rate})")
  annotated = tasks.register_student_task(dataset, shard_pattern, fmt, vocabulary, seed=seed)
  parts: List[Tuple[str, float]] = []
  if original_rate > 0:
    parts.append((tasks.get_task(f"original_{dataset}").name, original_rate))
  if annotated_rate > 0:
    parts.append((annotated, annotated_rate))
  return add_mixture(name or f"student_mix_{dataset}_{fmt}", parts)


# The annotation job's merged file, else its committed chunks (annotation/io.py's layout).
_MERGED_FILES = ("annotations.jsonl", "merged.jsonl")
_CHUNKS = "shard-*-of-*/chunk-*.jsonl"
QC_ACTIONS = ("keep", "skip")


def annotation_shards(annotations: str) -> str:
  """The JSONL file pattern of an annotation job's output (a directory, a file or a glob)."""
  path = pathlib.Path(annotations)
  if not path.is_dir():
    return str(path)
  for name in _MERGED_FILES:
    if (path / name).exists():
      return str(path / name)
  return str(path / _CHUNKS)


@gin.configurable(denylist=["vocabulary"])
def student_mixture(vocabulary: seqio.Vocabulary, *, annotations: Optional[str] = None,
                    format: str = "CMF",  # pylint: disable=redefined-builtin
                    original_rate: float = 1.0, annotated_rate: float = 1.0,
                    qc_action: str = "keep", name: str = "student_annotations",
                    seed: int = 0) -> Optional[str]:
  """The student mixture of an annotation job's output, registered for `vocabulary` (the
  student's own tokenizer); None when `annotations` is unset.

  Args:
    vocabulary: the student checkpoint's vocabulary.
    annotations: the annotation output directory (merged file or committed chunks), a JSONL
      file or a glob of them; its rows carry question, options and answer.
    format: student format of the annotated part ('CMF', 'C', 'SHUFFLE', ...).
    original_rate, annotated_rate: mixture rates of the same records in the original format
      and in `format` (0 leaves a part out).
    qc_action: 'keep' trains on every annotation; 'skip' leaves out rows whose annotations in
      `format` carry a quality flag (counted in tasks.SKIPS). Rows with an annotation the
      job dropped (null) are skipped and counted either way.
    name: the mixture's name (its two tasks are named after it).
    seed: SHUFFLE's per-example order.
  """
  if annotations is None:
    return None
  if qc_action not in QC_ACTIONS:
    raise ValueError(f"student_mixture.qc_action={qc_action!r}: expected one of {QC_ACTIONS}")
  if original_rate < 0 or annotated_rate < 0 or original_rate + annotated_rate <= 0:
    raise ValueError("student_mixture.original_rate and annotated_rate must be >= 0 and not "
                     f"both 0 (got {original_rate} and {annotated_rate})")
  pattern = annotation_shards(annotations)
  tasks.set_on_bad_row("skip")
  parts: List[Tuple[str, float]] = []
  for fmt, rate in (("original", original_rate), (format, annotated_rate)):
    if rate > 0:
      parts.append((tasks.register_student_task(
          name, pattern, fmt, vocabulary, name=f"{name}_{fmt}", seed=seed,
          skip_flagged=qc_action == "skip" and fmt == format), rate))
  return add_mixture(name, parts)


def register_multitask_student_mixture(name: str, shards: Mapping[str, str], fmt: str,
                                       vocabulary: seqio.Vocabulary, *,
                                       original_rate: float = 1.0, annotated_rate: float = 1.0,
                                       seed: int = 0) -> str:
  """One mixture over several datasets ({dataset: shard pattern}), each original + annotated."""
  parts = [register_student_mixture(dataset, pattern, fmt, vocabulary,
                                    original_rate=original_rate, annotated_rate=annotated_rate,
                                    seed=seed)
           for dataset, pattern in sorted(shards.items())]
  return add_mixture(name, parts, default_rate=1.0)


def leaf_tasks(name: str) -> List[str]:
  """Task names under a task or (nested) mixture name, in order."""
  if name in EVAL_MIXTURES:
    return [t for part in EVAL_MIXTURES[name] for t in leaf_tasks(part)]
  if name in seqio.MixtureRegistry.names():
    return [t.name for t in seqio.get_mixture_or_task(name).tasks]
  return [tasks.get_task(name).name]
