"""seqio mixtures: evaluation groups, the teacher SFT mixture, student mixtures.

  mmlu            the 57 mmlu_{subject} tasks (reported as their macro average)
  teacherlm_eval  mmlu + creak + ecqa + strategyqa (macro average of the four)
  teacher_cot     teacher_cot_* over every FLAN CoT set, leakage-filtered
  teacher_multitask  the teacher's stage 1 (multi-task): FLAN CoT, plus P3-Sense and Muffin
                  once their data is in the data directory (`register_teacher_multitask`)

Student mixtures combine an original task with its annotated variant at chosen rates, per
dataset (`register_student_mixture`) or across datasets (`register_multitask_student_mixture`);
`student_input_mixture` (gin-configurable) does it for any annotation job's output directory,
so a student trains from annotations with no pipeline (scripts/train.py --input).
`register_all(vocabulary)` registers every task and fixed mixture; nothing happens at import.
"""
from __future__ import annotations

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


def _inputs_targets_task(name: str, path, vocabulary: seqio.Vocabulary) -> str:
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
                             annotated_task: Optional[str] = None, seed: int = 0,
                             skip_flagged: bool = False) -> str:
  """original_{dataset} + its annotated variant in format `fmt`, mixed at the given rates.

  `annotated_task` names the annotated task (default `student_{dataset}_{fmt}`): several
  annotation sets of one dataset (teacher, oracle, controls) need distinct names.
  `skip_flagged` leaves out annotated rows whose kinds in `fmt` carry a quality flag.
  """
  if original_rate < 0 or annotated_rate < 0 or original_rate + annotated_rate <= 0:
    raise ValueError(f"rates must be >= 0 and not both 0 (got original={original_rate}, "
                     f"annotated={annotated_rate})")
  annotated = tasks.register_student_task(dataset, shard_pattern, fmt, vocabulary,
                                          name=annotated_task, seed=seed,
                                          skip_flagged=skip_flagged)
  parts: List[Tuple[str, float]] = []
  if original_rate > 0:
    parts.append((tasks.get_task(f"original_{dataset}").name, original_rate))
  if annotated_rate > 0:
    parts.append((annotated, annotated_rate))
  return add_mixture(name or f"student_mix_{dataset}_{fmt}", parts)


QC_ACTIONS = ("keep", "skip")


STUDENT_INPUT_MIXTURE = "student_input"


@gin.configurable
def student_input_mixture(annotations: str, dataset: Optional[str] = gin.REQUIRED,
                          fmt: str = "CMF", vocabulary: seqio.Vocabulary = gin.REQUIRED, *,
                          original_rate: float = 1.0, annotated_rate: float = 1.0,
                          qc_action: str = "keep", seed: int = 0) -> str:
  """One annotation run as a student mixture named STUDENT_INPUT_MIXTURE (what
  `train.py --input` trains on), so a student trains from annotations with no pipeline.

  Args:
    annotations: annotate.py's --output directory, read through its merged.jsonl
      (`annotate.py --merge`: every shard complete, each id once), or a JSONL file or glob.
    dataset: the original dataset mixed in (original_{dataset}); None: the annotated records
      themselves in the original format (any annotation output, e.g. the synthetic task's).
    fmt: student format of the annotated part ('CMF', 'C', 'SHUFFLE', ...).
    vocabulary: the student's vocabulary (scripts/train.py passes the student checkpoint's
      tokenizer when gin leaves this unbound).
    original_rate, annotated_rate: mixture rates of the original and the annotated part (0
      leaves a part out).
    qc_action: 'keep' trains on every annotation; 'skip' leaves out rows whose annotations in
      `fmt` carry a quality flag (counted in tasks.SKIPS). Rows with an annotation the job
      dropped (null) are skipped and counted either way.
    seed: SHUFFLE's per-example order.
  """
  if qc_action not in QC_ACTIONS:
    raise ValueError(f"student_input_mixture.qc_action={qc_action!r}: expected one of "
                     f"{QC_ACTIONS}")
  if ".jsonl" in annotations.rpartition("/")[2]:
    pattern = annotations
  else:
    pattern = f"{annotations.rstrip('/')}/merged.jsonl"
  tasks.set_on_bad_row("skip")
  if dataset is None:
    if original_rate < 0 or annotated_rate < 0 or original_rate + annotated_rate <= 0:
      raise ValueError(f"rates must be >= 0 and not both 0 (got original={original_rate}, "
                       f"annotated={annotated_rate})")
    name = STUDENT_INPUT_MIXTURE
    parts: List[Tuple[str, float]] = []
    for part_fmt, rate in (("original", original_rate), (fmt, annotated_rate)):
      if rate > 0:
        parts.append((tasks.register_student_task(
            name, pattern, part_fmt, vocabulary, name=f"{name}_{part_fmt}", seed=seed,
            skip_flagged=qc_action == "skip" and part_fmt == fmt), rate))
    return add_mixture(name, parts)
  if original_rate > 0:
    tasks.register_original_tasks(vocabulary)
  return register_student_mixture(dataset, pattern, fmt, vocabulary, original_rate=original_rate,
                                  annotated_rate=annotated_rate, name=STUDENT_INPUT_MIXTURE,
                                  seed=seed, skip_flagged=qc_action == "skip")


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
