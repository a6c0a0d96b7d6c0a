"""seqio mixtures: evaluation groups, the teacher SFT mixture, student mixtures.

  mmlu            the 57 mmlu_{subject} tasks (reported as their macro average)
  teacherlm_eval  mmlu + creak + ecqa + strategyqa (macro average of the four)
  teacher_cot     teacher_cot_* over every FLAN CoT set, leakage-filtered

Student mixtures combine an original task with its annotated variant at chosen rates, per
dataset (`register_student_mixture`) or across datasets (`register_multitask_student_mixture`).
`register_all(vocabulary)` registers every task and fixed mixture; nothing happens at import.
"""
from __future__ import annotations

from typing import List, Mapping, Optional, Sequence, Tuple

import gin
import seqio

from teacherlm_jax.data import tasks

EVAL_MIXTURES = {"mmlu": tasks.MMLU_TASKS,
                 "teacherlm_eval": ("mmlu",) + tasks.QA_EVAL_TASKS}


def _add_mixture(name: str, parts: Sequence, default_rate=None) -> str:
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, list(parts), default_rate=default_rate)
  return name


def register_fixed_mixtures() -> List[str]:
  names = [_add_mixture("mmlu", EVAL_MIXTURES["mmlu"], default_rate=1.0),
           _add_mixture("teacherlm_eval", EVAL_MIXTURES["teacherlm_eval"], default_rate=1.0)]
  names.append(_add_mixture("teacher_cot", [f"teacher_cot_{n}" for n in tasks.FLAN_COT_NAMES],
                            default_rate=1.0))
  return names


@gin.configurable
def register_all(vocabulary: seqio.Vocabulary = gin.REQUIRED) -> List[str]:
  """Registers every fixed task and mixture for `vocabulary` (re-registers on change)."""
  return tasks.register_tasks(vocabulary) + register_fixed_mixtures()


def register_student_mixture(dataset: str, shard_pattern: str, fmt: str,
                             vocabulary: seqio.Vocabulary, *, original_rate: float = 1.0,
                             annotated_rate: float = 1.0, name: Optional[str] = None,
                             annotated_task: Optional[str] = None, seed: int = 0) -> str:
  """original_{dataset} + its annotated variant in format `fmt`, mixed at the given rates.

  `annotated_task` names the annotated task (default `student_{dataset}_{fmt}`): several
  annotation sets of one dataset (teacher, oracle, controls) need distinct names.
  """
  if original_rate < 0 or annotated_rate < 0 or original_rate + annotated_rate <= 0:
    raise ValueError(f"rates must be >= 0 and not both 0 (got original={original_rate}, "
                     f"annotated={annotated_rate})")
  annotated = tasks.register_student_task(dataset, shard_pattern, fmt, vocabulary,
                                          name=annotated_task, seed=seed)
  parts: List[Tuple[str, float]] = []
  if original_rate > 0:
    parts.append((tasks.get_task(f"original_{dataset}").name, original_rate))
  if annotated_rate > 0:
    parts.append((annotated, annotated_rate))
  return _add_mixture(name or f"student_mix_{dataset}_{fmt}", parts)


STUDENT_INPUT_MIXTURE = "student_input"


@gin.configurable
def student_input_mixture(annotations: str, dataset: str = gin.REQUIRED, fmt: str = "CMF",
                          vocabulary: seqio.Vocabulary = gin.REQUIRED, *,
                          original_rate: float = 1.0, annotated_rate: float = 1.0,
                          seed: int = 0) -> str:
  """`register_student_mixture` over one annotation run, named STUDENT_INPUT_MIXTURE (what
  `train.py --input` trains on). `annotations`: annotate.py's --output directory, read through
  its merged.jsonl (`annotate.py --merge`: every shard complete, each id once), or a JSONL glob."""
  if annotations.endswith(".jsonl"):
    pattern = annotations
  else:
    pattern = f"{annotations.rstrip('/')}/merged.jsonl"
  if original_rate > 0:
    tasks.register_original_tasks(vocabulary)
  return register_student_mixture(dataset, pattern, fmt, vocabulary, original_rate=original_rate,
                                  annotated_rate=annotated_rate, name=STUDENT_INPUT_MIXTURE,
                                  seed=seed)


def register_multitask_student_mixture(name: str, shards: Mapping[str, str], fmt: str,
                                       vocabulary: seqio.Vocabulary, *,
                                       original_rate: float = 1.0, annotated_rate: float = 1.0,
                                       seed: int = 0) -> str:
  """One mixture over several datasets ({dataset: shard pattern}), each original + annotated."""
  parts = [register_student_mixture(dataset, pattern, fmt, vocabulary,
                                    original_rate=original_rate, annotated_rate=annotated_rate,
                                    seed=seed)
           for dataset, pattern in sorted(shards.items())]
  return _add_mixture(name, parts, default_rate=1.0)


def leaf_tasks(name: str) -> List[str]:
  """Task names under a task or (nested) mixture name, in order."""
  if name in EVAL_MIXTURES:
    return [t for part in EVAL_MIXTURES[name] for t in leaf_tasks(part)]
  if name in seqio.MixtureRegistry.names():
    return [t.name for t in seqio.get_mixture_or_task(name).tasks]
  return [tasks.get_task(name).name]
