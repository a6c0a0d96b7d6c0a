"""The TeacherLM pipeline: teacher SFT -> annotation -> students -> evaluation -> report.

Every stage writes into one experiment directory and marks itself done with a `DONE.json`
holding its result; a rerun skips finished stages and resumes an unfinished one from its own
checkpoints (training) or committed chunks (annotation), so a killed pipeline loses at most the
work since the last checkpoint/chunk.

  {exp}/data/          records: eval.jsonl, teacher.jsonl, student.jsonl   (synthetic task)
  {exp}/vocab/         spm.model (SentencePiece trained on the data; only when the teacher
                       starts from random weights: a pretrained one brings its tokenizer)
  {exp}/teacher_multitask/  stage 1 (multi-task instruction data), when configured
  {exp}/teacher/       stage 2: the teacher tuned on all three annotation kinds
  {exp}/teacher_{kind}/     stage 3: one specialist per annotation kind, from stage 2
  {exp}/teacher_hf[_{kind}]/  the annotating teacher(s) exported as HF directories with
                       their tokenizer (what annotate.py and AutoTokenizer load)
  {exp}/annotations/   annotation shards + annotations.jsonl (merged, input order)
  {exp}/students/[{student}/]{variant}_seed{s}/   trainer model_dirs, variant = original |
                       annotated; one set per student checkpoint, each with its own tokenizer
  {exp}/eval/[{student}/]{variant}_seed{s}.json   rank-classification results
  {exp}/report/        report.md, loss.png, accuracy.png, report.json

Datasets: 'synthetic' (the embedded arithmetic task: no data directory or internet needed) or
'creak' (teacher CoT-tuned on leakage-filtered FLAN CoT data, CREAK train annotated, students
evaluated on CREAK dev and MMLU; reads ../shared/data or $TEACHERLM_DATA_DIR).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Dict, List, Mapping, Optional, Sequence

import gin
import jax
from absl import logging

from teacherlm_jax.annotation import annotate as annotate_lib
from teacherlm_jax.annotation import io as annotation_io
from teacherlm_jax.data import mixtures, prompts, record_tasks, synthetic, tasks, vocab
from teacherlm_jax.evaluation import evaluate as evaluate_lib
from teacherlm_jax.models import checkpoint_io, checkpoint_vocab, hf
from teacherlm_jax.pipeline import report as report_lib
from teacherlm_jax.training import train as train_lib

DONE = "DONE.json"
VARIANTS = ("original", "annotated")
# The paper's teacher: 1. multi-task, 2. personalisation on all three kinds, 3. one specialist
# per kind started from stage 2. Each has its gin scope for TrainConfig.
TEACHER_STAGES = ("multitask", "personalise", "specialise")
TEACHER_SCOPES = {"multitask": "teacher_multitask", "personalise": "teacher",
                  "specialise": "teacher_specialist"}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """What the pipeline runs (stage hyper-parameters live in the scoped TrainConfigs:
  `teacher/TrainConfig.*` and `student/TrainConfig.*`, and in `annotate.*`).

  Attributes:
    dataset: 'synthetic' or 'creak'.
    seeds: one student per seed and variant; the report gives mean ± std over seeds.
    synthetic_sizes: records per split of the synthetic task (eval first: later splits
      never repeat its questions).
    vocab_size: SentencePiece vocabulary size (trained on the experiment's own text).
    student_format: student format of the annotated data ('CMF', 'C', 'SHUFFLE', ...).
    original_rate, annotated_rate: mixture rates of the 'annotated' student's data (the
      'original' student trains on the original data alone).
    annotate_limit: annotate only the first N student records (None: all).
    eval_tasks: evaluation tasks/mixtures for the real-data configurations (synthetic uses
      its own held-out split).
    eval_max_examples: per-task cap (None: all).
    creak_train_records: CREAK train records to annotate and train students on (None: all).
    num_samples_in_report: sample annotations shown in the report.
    teacher_stages: which of TEACHER_STAGES the teacher goes through, in order; with
      'specialise' each annotation kind has its own teacher.
    teacher_checkpoint: the pretrained checkpoint (HF directory or ours) the first teacher
      stage starts from; its tokenizer is then the teacher's vocabulary and no SentencePiece
      model is trained. '' = random weights and a trained vocabulary.
    students: {name: checkpoint} of pretrained students, each trained (original and annotated,
      per seed) and evaluated with its own tokenizer; empty = one student from random weights
      (student/TrainConfig.model) with the teacher's vocabulary.
  """
  dataset: str = "synthetic"
  seeds: Sequence[int] = (0, 1, 2)
  synthetic_sizes: Dict[str, int] = dataclasses.field(
      default_factory=lambda: {"eval": 300, "teacher": 1500, "student": 1000})
  vocab_size: int = 800
  student_format: str = "CMF"
  original_rate: float = 1.0
  annotated_rate: float = 1.0
  annotate_limit: Optional[int] = None
  eval_tasks: Sequence[str] = ("creak",)
  eval_max_examples: Optional[int] = None
  creak_train_records: Optional[int] = None
  num_samples_in_report: int = 3
  teacher_stages: Sequence[str] = ("personalise",)
  teacher_checkpoint: str = ""
  students: Mapping[str, str] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.dataset not in ("synthetic", "creak"):
      raise ValueError(f"PipelineConfig.dataset={self.dataset!r}: expected 'synthetic' or 'creak'")
    if not self.seeds:
      raise ValueError("PipelineConfig.seeds is empty: give at least one seed")
    prompts.annotation_order(self.student_format)  # Validates the format name.
    stages = list(self.teacher_stages)
    if not stages or stages != [s for s in TEACHER_STAGES if s in stages]:
      raise ValueError(f"PipelineConfig.teacher_stages={tuple(self.teacher_stages)}: expected "
                       f"a non-empty subsequence of {TEACHER_STAGES}, in that order")


class Pipeline:
  """Runs the stages in order inside `experiment_dir`, skipping those already done."""

  def __init__(self, config: PipelineConfig, experiment_dir):
    self.config = config
    self.dir = pathlib.Path(experiment_dir).absolute()
    self.dir.mkdir(parents=True, exist_ok=True)
    self.timings: Dict[str, float] = {}

  # ---- stage bookkeeping ---------------------------------------------------------------

  def _stage(self, name: str, run):
    """Runs `run()` unless {exp}/{name}/DONE.json exists; returns the stage's result."""
    done = self.dir / name / DONE
    if done.exists():
      logging.info("stage %s: done already (%s), skipping", name, done)
      print(f"[pipeline] {name}: already done, skipped", flush=True)
      return json.loads(done.read_text())
    print(f"[pipeline] {name}: running", flush=True)
    start = time.time()
    result = run()
    self.timings[name] = time.time() - start
    if jax.process_index() == 0:
      done.parent.mkdir(parents=True, exist_ok=True)
      tmp = done.with_suffix(".tmp")
      tmp.write_text(json.dumps(result, indent=2, default=str))
      tmp.replace(done)
    print(f"[pipeline] {name}: done in {self.timings[name]:.0f} s", flush=True)
    return result

  # ---- stages --------------------------------------------------------------------------

  def data(self) -> dict:
    out = self.dir / "data"
    if self.config.dataset == "synthetic":
      splits = synthetic.make_splits(dict(self.config.synthetic_sizes), seed=0)
      paths = {name: str(synthetic.write_jsonl(records, out / f"{name}.jsonl"))
               for name, records in splits.items()}
      return {"paths": paths, "sizes": {k: len(v) for k, v in splits.items()}}
    records = list(tasks.creak_records("train"))
    if self.config.creak_train_records is not None:
      records = records[:self.config.creak_train_records]
    path = synthetic.write_jsonl(records, out / "student.jsonl")
    return {"paths": {"student": str(path)}, "sizes": {"student": len(records)}}

  def vocabulary(self, data: dict) -> dict:
    out = self.dir / "vocab"
    texts = self._vocab_texts(data)
    # Rank classification scores the letter after 'The answer is (' tokenised on its own, so
    # '(' and ')' are always their own pieces and no dummy space is put before a text: the
    # letter then tokenises the same in training text and in evaluation.
    model = vocab.train_sentencepiece(texts, str(out / "spm"), self.config.vocab_size, "bpe",
                                      user_defined_symbols=["(", ")"], add_dummy_prefix=False,
                                      remove_extra_whitespaces=False)
    return {"spm": model}

  def _vocab_texts(self, data: dict):
    if self.config.dataset == "synthetic":
      records = [r for name in ("teacher", "student", "eval")
                 for r in record_tasks.read_records(data["paths"][name])]
      return list(synthetic.iter_text(records)) + [
          prompts.sample_text(r["question"], r["options"], r["answer"]) for r in records]
    texts = [ex["inputs"] + ex["targets"] for name in tasks.FLAN_COT_NAMES
             for ex in map(tasks.teacher_example, tasks.flan_records(name))]
    texts += [prompts.sample_text(r["question"], r["options"], r["answer"])
              for r in tasks.creak_records("train")]
    return texts

  def register(self, data: dict, spec: str, annotations: Optional[str] = None
               ) -> Dict[str, str]:
    """Registers this experiment's seqio tasks for the vocabulary `spec` ('hf:<dir>' or
    'spm:<model>'); each student re-registers them for its own tokenizer before it runs."""
    vocabulary = vocab.get_vocabulary(spec)
    names = {}
    if self.config.dataset == "synthetic":
      names.update(record_tasks.register_record_tasks(
          "synthetic", vocabulary, eval_path=data["paths"]["eval"],
          teacher_path=data["paths"]["teacher"], student_path=data["paths"]["student"]))
      names["eval_tasks"] = [names.pop("eval")]
    else:
      mixtures.register_all(vocabulary)
      names["teacher"] = "teacher_cot"
      names.update({"original": record_tasks.register_record_tasks(
          "creak_subset", vocabulary, student_path=data["paths"]["student"])["original"]})
      names["eval_tasks"] = list(self.config.eval_tasks)
    if annotations is not None:
      # An annotation the QC flagged as empty cannot be rendered in a student format: such
      # rows are skipped and counted (tasks.SKIPS, shown in the report), never silently.
      tasks.set_on_bad_row("skip")
      dataset = "synthetic" if self.config.dataset == "synthetic" else "creak_subset"
      names["annotated"] = mixtures.register_student_mixture(
          dataset, annotations, self.config.student_format, vocabulary,
          original_rate=self.config.original_rate, annotated_rate=self.config.annotated_rate,
          name=f"student_mix_{dataset}")
    return names

  def teacher_vocabulary(self, data: dict) -> str:
    """The teacher's vocabulary spec: its pretrained checkpoint's tokenizer, else a
    SentencePiece model trained on the experiment's text (the 'vocab' stage)."""
    checkpoint = self.config.teacher_checkpoint
    if not checkpoint:
      return "spm:" + self._stage("vocab", lambda: self.vocabulary(data))["spm"]
    return _tokenizer_of(checkpoint, "PipelineConfig.teacher_checkpoint")

  def teacher_task(self, data: dict, spec: str, stage: str, kind: Optional[str] = None) -> str:
    """The seqio task or mixture of one teacher stage (a specialist's: its `kind` only)."""
    vocabulary = vocab.get_vocabulary(spec)
    if self.config.dataset == "synthetic":
      teacher = data["paths"]["teacher"]
      if stage == "multitask":  # Plain question answering and chains of thought.
        qa = record_tasks.register_record_tasks("synthetic_teacher_qa", vocabulary,
                                                student_path=teacher)["original"]
        cot = record_tasks.register_record_tasks(
            "synthetic_cot", vocabulary, teacher_path=teacher,
            kinds=(prompts.CHAIN_OF_THOUGHT,))["teacher"]
        return mixtures.add_mixture("teacher_multitask_synthetic", [qa, cot], default_rate=1.0)
      kinds = prompts.ANNOTATION_KINDS if kind is None else (kind,)
      return record_tasks.register_record_tasks(f"synthetic_{kind or 'all'}", vocabulary,
                                                teacher_path=teacher, kinds=kinds)["teacher"]
    mixtures.register_all(vocabulary)
    if stage == "multitask":
      name, skipped = mixtures.register_teacher_multitask(vocabulary)
      for collection, reason in skipped.items():
        print(f"[pipeline] teacher_multitask: {collection} skipped: {reason}", flush=True)
      return name
    if kind not in (None, prompts.CHAIN_OF_THOUGHT):
      raise ValueError(f"dataset {self.config.dataset!r} has teacher data for chains of "
                       f"thought only (FLAN CoT), so no {kind} specialist can be trained; set "
                       "annotate.kinds = ('chain_of_thought',)")
    return "teacher_cot"

  def teachers(self, data: dict, spec: str) -> Dict[str, dict]:
    """Runs the teacher stages in order, each started from the previous one (the first from
    PipelineConfig.teacher_checkpoint); returns {kind: the stage result of its teacher}."""
    stages = list(self.config.teacher_stages)
    kinds = _annotation_kinds()
    start = self.config.teacher_checkpoint
    result = None
    for stage in stages:
      if stage == "specialise":
        return {kind: self._stage(f"teacher_{kind}", lambda kind=kind: self.teacher(
            stage, self.teacher_task(data, spec, stage, kind), spec, start,
            f"teacher_{kind}", export=f"teacher_hf_{kind}")) for kind in kinds}
      name = "teacher" if stage == "personalise" else "teacher_multitask"
      last = stage == stages[-1]
      result = self._stage(name, lambda: self.teacher(
          stage, self.teacher_task(data, spec, stage), spec, start, name,
          export="teacher_hf" if last else None))
      start = result["model_dir"]
    return {kind: result for kind in kinds}

  def teacher(self, stage: str, task: str, spec: str, start: str, name: str,
              export: Optional[str] = None) -> dict:
    with gin.config_scope(TEACHER_SCOPES[stage]):
      config = train_lib.TrainConfig()
    # The held-out measurements of this pipeline are annotation QC and student accuracy; the
    # trainer's periodic eval reads a few batches of the training split as a sanity check.
    config = self._started_from(
        config.replace(train_task=task, eval_task=task, eval_split="train"), start, spec)
    model_dir = self.dir / name
    result = train_lib.train(config, str(model_dir))
    out = {"final_step": result["step"], "model_dir": str(model_dir),
           "final_loss": _last_loss(model_dir)}
    if export:
      # The exported teacher carries its tokenizer (an HF one), so AutoTokenizer loads it.
      tokenizer = checkpoint_vocab.spec_path(spec) if spec.startswith("hf:") else None
      hf.export_checkpoint(checkpoint_io.load_model(model_dir), self.dir / export,
                           tokenizer_dir=tokenizer)
      out["hf_dir"] = str(self.dir / export)
    return out

  def _started_from(self, config, checkpoint: str, spec: str):
    """`config` started from `checkpoint` (HF or ours), or from random weights sized for the
    vocabulary `spec` when there is none."""
    if not checkpoint:
      return self._with_vocab(config, spec)
    if checkpoint_io.is_hf_directory(checkpoint):
      return config.replace(init_hf_checkpoint=checkpoint, init_checkpoint="")
    return config.replace(init_checkpoint=checkpoint, init_hf_checkpoint="")

  def _with_vocab(self, config, spec: str):
    vocabulary = vocab.get_vocabulary(spec)
    return config.replace(model_overrides={
        **dict(config.model_overrides), "vocab_size": vocabulary.vocab_size,
        "pad_token_id": vocabulary.pad_id, "eos_token_id": vocabulary.eos_id,
        "bos_token_id": vocabulary.eos_id})

  def annotation(self, data: dict, spec: str, teachers: Dict[str, dict]) -> dict:
    out = self.dir / "annotations"
    summary = annotate_lib.annotate(
        data["paths"]["student"], str(out),
        teachers={kind: result["hf_dir"] for kind, result in teachers.items()},
        tokenizer=spec, limit=self.config.annotate_limit, resume=True)
    merged = out / "annotations.jsonl"
    count = annotation_io.merge(out, merged)
    kinds = prompts.annotation_order(self.config.student_format)
    usable = sum(all(isinstance(row.get(k), str) and row[k].strip() for k in kinds)
                 for row in annotation_io.read_jsonl(merged))
    if not usable:
      raise RuntimeError(
          f"{merged}: none of the {count} annotations has non-empty {list(kinds)} text, so the "
          "annotated student would have no data; train the teacher longer "
          "(teacher/TrainConfig.num_steps) or check its loss in "
          f"{self.dir / 'teacher' / 'metrics.jsonl'}")
    return {"summary": summary, "merged": str(merged), "records": count,
            "usable_for_student_format": usable}

  def students(self, teacher_spec: str) -> Dict[str, tuple]:
    """{name: (checkpoint, vocabulary spec)}: each pretrained student with its own tokenizer,
    or one student '' from random weights with the teacher's vocabulary."""
    if not self.config.students:
      return {"": ("", teacher_spec)}
    return {name: (checkpoint, _tokenizer_of(checkpoint, f"PipelineConfig.students[{name!r}]"))
            for name, checkpoint in self.config.students.items()}

  def student(self, variant: str, seed: int, task: str, spec: str, checkpoint: str,
              model_dir: pathlib.Path) -> dict:
    with gin.config_scope("student"):
      config = train_lib.TrainConfig()
    config = self._started_from(config.replace(train_task=task, eval_task=task,
                                               eval_split="train", seed=seed, data_seed=seed),
                                checkpoint, spec)
    result = train_lib.train(config, str(model_dir))
    return {"final_step": result["step"], "model_dir": str(model_dir),
            "losses": _loss_curve(model_dir)}

  def evaluation(self, model_dir: str, eval_tasks: Sequence[str], spec: str) -> dict:
    model = checkpoint_io.load_model(model_dir)
    result = evaluate_lib.evaluate(model, vocab.get_vocabulary(spec), eval_tasks,
                                   max_examples=self.config.eval_max_examples, progress=False,
                                   model_source=str(model_dir))
    return result

  # ---- the whole run -------------------------------------------------------------------

  def run(self) -> pathlib.Path:
    start = time.time()
    data = self._stage("data", self.data)
    spec = self.teacher_vocabulary(data)
    teachers = self.teachers(data, spec)
    annotation = self._stage("annotations", lambda: self.annotation(data, spec, teachers))
    accuracy: Dict[str, Dict[str, List[float]]] = {}
    curves: Dict[str, List] = {}
    for student, (checkpoint, student_spec) in self.students(spec).items():
      names = self.register(data, student_spec, annotations=annotation["merged"])
      prefix = f"{student}/" if student else ""
      for seed in self.config.seeds:
        for variant in VARIANTS:
          name, arm = f"{prefix}{variant}_seed{seed}", f"{prefix}{variant}"
          trained = self._stage(f"students/{name}", lambda: self.student(
              variant, seed, names[variant], student_spec, checkpoint,
              self.dir / "students" / name))
          curves.setdefault(arm, []).append(trained["losses"])
          result = self._stage(f"eval/{name}", lambda: self.evaluation(
              trained["model_dir"], names["eval_tasks"], student_spec))
          for task, metrics in result["tasks"].items():
            accuracy.setdefault(arm, {}).setdefault(task, []).append(metrics["accuracy"] / 100.0)
          for task, value in result.get("macro", {}).items():
            accuracy.setdefault(arm, {}).setdefault(task, []).append(value / 100.0)
    path = self.write_report(accuracy, curves, annotation, next(iter(teachers.values())))
    print(f"[pipeline] finished in {time.time() - start:.0f} s; report: {path}", flush=True)
    return path

  def write_report(self, accuracy, curves, annotation: dict, teacher: dict) -> pathlib.Path:
    summary = annotation["summary"]
    annotation_summary = {
        "records annotated": annotation["records"],
        f"records usable in format {self.config.student_format} (all its kinds non-empty)":
            annotation.get("usable_for_student_format"),
        "generated tokens": summary.get("generated_tokens"),
        "annotation records/s": summary.get("records_per_s"),
        "generated tokens/s": summary.get("tokens_per_s"),
        "stopped at EOS (per kind)": summary.get("stopped_at_eos"),
        "QC flags (per kind)": summary.get("qc_flags"),
        "teacher final training loss": teacher.get("final_loss"),
        "annotated rows skipped by the student task (empty annotation)": tasks.SKIPS.total,
    }
    samples = []
    rows = annotation_io.read_jsonl(pathlib.Path(annotation["merged"]))
    for row in rows[:self.config.num_samples_in_report]:
      sample = {"id": row.get("id"),
                "prompt": prompts.sample_text(row["question"], row["options"], row["answer"])}
      for kind in prompts.ANNOTATION_KINDS:
        if kind in row:
          sample[kind] = row[kind]
      samples.append(sample)
    notes = [f"Dataset: {self.config.dataset}; students: {len(self.config.seeds)} seeds per "
             f"variant; annotated student format {self.config.student_format} mixed with the "
             f"original data at rates {self.config.original_rate}:{self.config.annotated_rate}.",
             "Accuracy: zero-shot rank classification over the option letters "
             "(mean ± std over seeds, n = seeds). Chance is 1 / number of options."]
    path = report_lib.write_report(self.dir / "report", title="TeacherLM pipeline report",
                                   accuracy=accuracy, loss_curves=curves,
                                   annotation_summary=annotation_summary,
                                   sample_annotations=samples, notes=notes)
    print(report_lib.comparison_table(accuracy), flush=True)
    return path


def _tokenizer_of(checkpoint: str, binding: str) -> str:
  spec = checkpoint_vocab.tokenizer_spec(checkpoint)
  if spec is None:
    raise ValueError(f"{binding} = {checkpoint}: no tokenizer beside the checkpoint "
                     "(tokenizer.json or spm.model); a pretrained model trains and is evaluated "
                     "with its own tokenizer, so save it there")
  return spec


def _annotation_kinds() -> Sequence[str]:
  """The kinds the annotation job writes (gin's annotate.kinds): one teacher each."""
  try:
    return tuple(gin.query_parameter("annotate.kinds"))
  except ValueError:
    return prompts.ANNOTATION_KINDS


def _metrics_rows(model_dir: pathlib.Path) -> List[dict]:
  path = model_dir / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _loss_curve(model_dir: pathlib.Path) -> List[List[float]]:
  return [[row["step"], row["loss"]] for row in _metrics_rows(pathlib.Path(model_dir))
          if row.get("split") == "train" and "loss" in row]


def _last_loss(model_dir: pathlib.Path) -> Optional[float]:
  curve = _loss_curve(model_dir)
  return curve[-1][1] if curve else None
