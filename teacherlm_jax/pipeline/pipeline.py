"""The TeacherLM pipeline: teacher (up to three stages) -> annotation -> students -> evaluation
-> report.

Every stage writes into one experiment directory and marks itself done with a `DONE.json`
holding its result; a rerun skips finished stages and resumes an unfinished one from its own
checkpoints (training) or committed chunks (annotation), so a killed pipeline loses at most the
work since the last checkpoint/chunk.

  {exp}/data/          records: eval.jsonl, teacher.jsonl, student.jsonl   (synthetic task)
  {exp}/vocab/         spm.model (SentencePiece trained on the data; only when the teacher
                       starts from random weights: a pretrained one brings its tokenizer)
  {exp}/teacher_multitask/  stage 1 (multi-task instruction data), when configured
  {exp}/teacher/       stage 2: trainer model_dir (the teacher tuned on the annotation kinds
                       that `student_format` uses)
  {exp}/teacher_{kind}/     stage 3: one specialist per annotation kind, from stage 2
  {exp}/teacher_hf[_{kind}]/  the annotating teacher(s) exported as HF directories with
                       their tokenizer (what annotate.py and AutoTokenizer load)
  {exp}/annotations/   annotation shards + annotations.jsonl (merged, input order) and
                       shuffled.jsonl (the same annotations, each on another record)
  {exp}/students/[{student}/]{arm}_seed{s}/   trainer model_dirs, one per arm and seed (and
                       per pretrained student checkpoint, each with its own tokenizer)
  {exp}/eval/[{student}/]{arm}_seed{s}/       rank-classification results
  {exp}/report/[{student}/]  report.md, report.json, accuracy.png, loss.png, teacher_loss.png

Student arms (ARMS), paired by seed (same initialisation and data order seed):
  original           the records in the original format;
  teacher_annotated  the records with the teacher's annotations in `student_format`;
  oracle             the records with the reference annotations (synthetic task only): the
                     ceiling a perfect teacher would reach;
  shuffled           each record with another record's teacher annotations: the same words
                     and facts, not about the question.
With `student_epochs` set, every arm trains for that many passes over its own data, so
longer annotated texts get proportionally more steps.

Datasets: 'synthetic' (the embedded creatures task, data/synthetic.py: no data directory or
internet needed) or 'creak' (teacher CoT-tuned on leakage-filtered FLAN CoT data, CREAK train
annotated, students evaluated on CREAK dev and MMLU; reads ../shared/data or
$TEACHERLM_DATA_DIR).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
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
from teacherlm_jax.training import metrics as metrics_lib
from teacherlm_jax.storage import files
from teacherlm_jax.training import train as train_lib
from teacherlm_jax.training import train_data

DONE = "DONE.json"
ARMS = ("original", "teacher_annotated", "oracle", "shuffled")
# The paper's teacher: 1. multi-task, 2. personalisation on the annotation kinds, 3. one
# specialist per kind started from stage 2. Each has its gin scope for TrainConfig.
TEACHER_STAGES = ("multitask", "personalise", "specialise")
TEACHER_SCOPES = {"multitask": "teacher_multitask", "personalise": "teacher",
                  "specialise": "teacher_specialist"}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """What the pipeline runs (stage hyper-parameters live in the scoped TrainConfigs:
  `teacher_multitask/`, `teacher/`, `teacher_specialist/` and `student/TrainConfig.*`, and in
  `annotate.*`).

  Attributes:
    dataset: 'synthetic' or 'creak'.
    seeds: one student per seed and arm; the report gives mean ± std over seeds and each
      arm's paired difference to 'original' with a 95% confidence interval.
    arms: the students trained per seed (a subset of ARMS, 'original' first).
    student_epochs: passes over each arm's training data (None: student/TrainConfig.num_steps
      steps for every arm).
    synthetic_creatures: creatures of the synthetic task (a multiple of 64): two questions
      each in the students' records, one in the evaluation, one in the teacher's records.
    vocab_size: SentencePiece vocabulary size (trained on the experiment's own text).
    student_format: student format of the annotated data ('CMF', 'C', 'SHUFFLE', ...).
    original_rate, annotated_rate: mixture rates of the annotated arms' data (the
      'original' arm trains on the original data alone).
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
    students: {name: checkpoint} of pretrained students, each trained (every arm, per seed)
      and evaluated with its own tokenizer, with a report of its own; empty = one student
      from random weights (student/ModelSettings.preset) with the teacher's vocabulary.
  """
  dataset: str = "synthetic"
  seeds: Sequence[int] = (0, 1, 2)
  arms: Sequence[str] = ARMS
  student_epochs: Optional[float] = None
  synthetic_creatures: int = 128
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
    unknown = [arm for arm in self.arms if arm not in ARMS]
    if unknown or not self.arms or self.arms[0] != "original":
      raise ValueError(f"PipelineConfig.arms={tuple(self.arms)}: expected 'original' first, "
                       f"then any of {ARMS[1:]}")
    if "oracle" in self.arms and self.dataset != "synthetic":
      raise ValueError("PipelineConfig.arms: 'oracle' needs reference annotations, which only "
                       "the 'synthetic' dataset has")
    if self.student_epochs is not None and self.student_epochs <= 0:
      raise ValueError(f"PipelineConfig.student_epochs={self.student_epochs}: must be > 0")
    prompts.annotation_order(self.student_format)  # Validates the format name.
    stages = list(self.teacher_stages)
    if not stages or stages != [s for s in TEACHER_STAGES if s in stages]:
      raise ValueError(f"PipelineConfig.teacher_stages={tuple(self.teacher_stages)}: expected "
                       f"a non-empty subsequence of {TEACHER_STAGES}, in that order")


class Pipeline:
  """Runs the stages in order inside `experiment_dir`, skipping those already done."""

  def __init__(self, config: PipelineConfig, experiment_dir):
    self.config = config
    self.dir = files.makedirs(experiment_dir)  # Local or gs://, never a local 'gs:' folder.
    self.timings: Dict[str, float] = {}

  @property
  def annotation_kinds(self) -> tuple:
    """The kinds the student format uses: the teacher learns and writes these only."""
    needed = prompts.annotation_order(self.config.student_format)
    return tuple(kind for kind in prompts.ANNOTATION_KINDS if kind in needed)

  # ---- stage bookkeeping ---------------------------------------------------------------

  def _stage(self, name: str, run):
    """Runs `run()` unless {exp}/{name}/DONE.json exists; returns the stage's result."""
    done = self.dir / name / DONE
    if files.exists(done):
      logging.info("stage %s: already done, skipped (%s)", name, done)
      return json.loads(files.read_text(done))
    logging.info("stage %s: running", name)
    start = time.time()
    result = run()
    self.timings[name] = time.time() - start
    if jax.process_index() == 0:
      files.write_atomic(done, json.dumps(result, indent=2, default=str))
    logging.info("stage %s: done in %.0f s", name, self.timings[name])
    return result

  # ---- stages --------------------------------------------------------------------------

  def data(self) -> dict:
    out = self.dir / "data"
    if self.config.dataset == "synthetic":
      splits = synthetic.make_splits(self.config.synthetic_creatures, seed=0)
      paths = {name: str(synthetic.write_jsonl(records, out / f"{name}.jsonl"))
               for name, records in splits.items()}
      # What a model that reads only the options would score: the task must not give the
      # answer away without the question.
      shortcut = synthetic.options_only_accuracy(splits["student"], splits["eval"])
      return {"paths": paths, "sizes": {k: len(v) for k, v in splits.items()},
              "shortcut_baseline_accuracy": shortcut,
              "chance": 100.0 * sum(1 / len(r["options"]) for r in splits["eval"])
                        / len(splits["eval"])}
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

  def register(self, data: dict, spec: str, annotations: Optional[Mapping[str, str]] = None
               ) -> Dict[str, str]:
    """Registers this experiment's seqio tasks for the vocabulary `spec` ('hf:<dir>' or
    'spm:<model>'); each student re-registers them for its own tokenizer before it runs."""
    vocabulary = vocab.get_vocabulary(spec)
    names = {}
    if self.config.dataset == "synthetic":
      names.update(record_tasks.register_record_tasks(
          "synthetic", vocabulary, eval_path=data["paths"]["eval"],
          teacher_path=data["paths"]["teacher"], student_path=data["paths"]["student"],
          kinds=self.annotation_kinds))
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
      for arm, path in annotations.items():
        names[arm] = mixtures.register_student_mixture(
            dataset, path, self.config.student_format, vocabulary,
            original_rate=self.config.original_rate, annotated_rate=self.config.annotated_rate,
            name=f"student_mix_{dataset}_{arm}", annotated_task=f"student_{dataset}_{arm}")
    return names

  def annotation_sets(self, data: dict, annotation: dict) -> Dict[str, str]:
    """Arm -> the annotation file its student task reads. The shuffled control is derived
    from the teacher's annotations once (deterministic), so pipelines running other seeds in
    the same directory read, never rewrite, it."""
    paths = {"teacher_annotated": annotation["merged"],
             "oracle": data["paths"].get("student")}
    shuffled = self.dir / "annotations" / "shuffled.jsonl"
    if "shuffled" in self.config.arms and not files.exists(shuffled):
      rows = annotation_io.read_jsonl(annotation["merged"])
      synthetic.write_jsonl(synthetic.shuffled_annotations(rows, self.annotation_kinds, seed=0),
                            shuffled)
    paths["shuffled"] = str(shuffled)
    return {arm: paths[arm] for arm in self.config.arms if arm != "original"}

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
      if kind is None:
        return self.register(data, spec)["teacher"]
      return record_tasks.register_record_tasks(f"synthetic_{kind}", vocabulary,
                                                teacher_path=teacher, kinds=(kind,))["teacher"]
    mixtures.register_all(vocabulary)
    if stage == "multitask":
      name, skipped = mixtures.register_teacher_multitask(vocabulary)
      for collection, reason in skipped.items():
        logging.info("teacher_multitask: %s skipped: %s", collection, reason)
      return name
    if kind not in (None, prompts.CHAIN_OF_THOUGHT):
      raise ValueError(f"dataset {self.config.dataset!r} has teacher data for chains of "
                       f"thought only (FLAN CoT), so no {kind} specialist can be trained; set "
                       "PipelineConfig.student_format = 'C'")
    return "teacher_cot"

  def teachers(self, data: dict, spec: str) -> Dict[str, dict]:
    """Runs the teacher stages in order, each started from the previous one (the first from
    PipelineConfig.teacher_checkpoint); returns {kind: the stage result of its teacher}."""
    stages = list(self.config.teacher_stages)
    start = self.config.teacher_checkpoint
    result = None
    for stage in stages:
      if stage == "specialise":
        return {kind: self._stage(f"teacher_{kind}", lambda kind=kind: self.teacher(
            stage, self.teacher_task(data, spec, stage, kind), spec, start,
            f"teacher_{kind}", export=f"teacher_hf_{kind}")) for kind in self.annotation_kinds}
      name = "teacher" if stage == "personalise" else "teacher_multitask"
      last = stage == stages[-1]
      result = self._stage(name, lambda: self.teacher(
          stage, self.teacher_task(data, spec, stage), spec, start, name,
          export="teacher_hf" if last else None))
      start = result["model_dir"]
    return {kind: result for kind in self.annotation_kinds}

  def teacher(self, stage: str, task: str, spec: str, start: str, name: str,
              export: Optional[str] = None) -> dict:
    with gin.config_scope(TEACHER_SCOPES[stage]):
      config = train_lib.TrainConfig()
    # The held-out measurements of this pipeline are annotation QC and student accuracy; the
    # trainer's periodic eval reads a few batches of the training split as a sanity check.
    config = self._started_from(
        config.replace(data=dict(train_task=task, eval_task=task, eval_split="train")), start,
        spec)
    model_dir = self.dir / name
    result = train_lib.train(config, str(model_dir))
    out = {"final_step": result["step"], "model_dir": str(model_dir),
           "final_loss": _last_loss(model_dir)}
    if export:
      # The exported teacher carries its tokenizer (an HF one), so AutoTokenizer loads it.
      tokenizer = str(checkpoint_vocab.spec_path(spec)) if spec.startswith("hf:") else None
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
      return config.replace(model=dict(init_hf_checkpoint=checkpoint, init_checkpoint=""))
    return config.replace(model=dict(init_checkpoint=checkpoint, init_hf_checkpoint=""))

  def _with_vocab(self, config, spec: str):
    vocabulary = vocab.get_vocabulary(spec)
    return config.replace(model=dict(overrides={
        **dict(config.model.overrides), "vocab_size": vocabulary.vocab_size,
        "pad_token_id": vocabulary.pad_id, "eos_token_id": vocabulary.eos_id,
        "bos_token_id": vocabulary.eos_id}))

  def annotation(self, data: dict, spec: str, teachers: Dict[str, dict]) -> dict:
    out = self.dir / "annotations"
    summary = annotate_lib.annotate(
        data["paths"]["student"], str(out),
        teachers={kind: result["hf_dir"] for kind, result in teachers.items()},
        tokenizer=spec, kinds=self.annotation_kinds, limit=self.config.annotate_limit,
        resume=True)
    merged = out / "annotations.jsonl"
    # annotate() ended with a barrier: every shard is committed. One process merges.
    if jax.process_index() == 0:
      annotation_io.merge(out, merged)
    _barrier("annotations merged")
    count = len(annotation_io.read_jsonl(merged))
    kinds = prompts.annotation_order(self.config.student_format)
    usable = sum(all(isinstance(row.get(k), str) and row[k].strip() for k in kinds)
                 for row in annotation_io.read_jsonl(merged))
    if not usable:
      raise RuntimeError(
          f"{merged}: none of the {count} annotations has non-empty {list(kinds)} text, so the "
          "annotated student would have no data; train the teacher longer "
          "(teacher/TrainConfig.num_steps) or check its loss in TensorBoard: "
          f"{metrics_lib.tensorboard_dir(str(self.dir / 'teacher'))}")
    return {"summary": summary, "merged": str(merged), "records": count,
            "usable_for_student_format": usable}

  def students(self, teacher_spec: str) -> Dict[str, tuple]:
    """{name: (checkpoint, vocabulary spec)}: each pretrained student with its own tokenizer,
    or one student '' from random weights with the teacher's vocabulary."""
    if not self.config.students:
      return {"": ("", teacher_spec)}
    return {name: (checkpoint, _tokenizer_of(checkpoint, f"PipelineConfig.students[{name!r}]"))
            for name, checkpoint in self.config.students.items()}

  def student(self, arm: str, seed: int, task: str, spec: str, checkpoint: str,
              model_dir) -> dict:
    with gin.config_scope("student"):
      config = train_lib.TrainConfig()
    config = config.replace(seed=seed, data=dict(train_task=task, eval_task=task,
                                                  eval_split="train", seed=seed))
    config = self._started_from(config, checkpoint, spec)
    batches_per_epoch = None
    if self.config.student_epochs is not None:
      batches_per_epoch = _batches_per_epoch(task, config)
      config = config.replace(num_steps=max(
          1, math.ceil(self.config.student_epochs * batches_per_epoch)))
    result = train_lib.train(config, str(model_dir))
    return {"final_step": result["step"], "model_dir": str(model_dir),
            "batches_per_epoch": batches_per_epoch, "losses": _loss_curve(model_dir)}

  def evaluation(self, model_dir: str, eval_tasks: Sequence[str], spec: str) -> dict:
    model = checkpoint_io.load_model(model_dir)
    result = evaluate_lib.evaluate(model, vocab.get_vocabulary(spec), eval_tasks,
                                   max_examples=self.config.eval_max_examples, progress=False,
                                   model_source=str(model_dir))
    return result

  # ---- the whole run -------------------------------------------------------------------

  def run(self) -> files.Path:
    start = time.time()
    # Every student compiles the same programs: a persistent cache compiles them once.
    jax.config.update("jax_compilation_cache_dir", str(self.dir / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    data = self._stage("data", self.data)
    spec = self.teacher_vocabulary(data)
    teachers = self.teachers(data, spec)
    teacher = next(iter(teachers.values()))
    annotation = self._stage("annotations", lambda: self.annotation(data, spec, teachers))
    annotation_sets = self.annotation_sets(data, annotation)
    paths = []
    for student, (checkpoint, student_spec) in self.students(spec).items():
      names = self.register(data, student_spec, annotations=annotation_sets)
      paths.append(self.run_students(student, checkpoint, student_spec, names, data,
                                     annotation, teacher))
    logging.info("finished in %.0f s; report: %s", time.time() - start,
                 ", ".join(map(str, paths)))
    return paths[0]

  def run_students(self, student: str, checkpoint: str, spec: str, names: Dict[str, str],
                   data: dict, annotation: dict, teacher: dict) -> files.Path:
    """Every arm and seed of one student (its checkpoint and tokenizer), then its report: the
    paired differences compare arms of the same student only."""
    prefix = f"{student}/" if student else ""
    arms = list(self.config.arms)
    accuracy: Dict[str, Dict[str, List[float]]] = {arm: {} for arm in arms}
    gold_scores: Dict[str, Dict[str, List[float]]] = {arm: {} for arm in arms}
    curves: Dict[str, List] = {arm: [] for arm in arms}
    steps: Dict[str, List[int]] = {arm: [] for arm in arms}
    for seed in self.config.seeds:
      for arm in arms:
        name = f"{prefix}{arm}_seed{seed}"
        trained = self._stage(f"students/{name}", lambda: self.student(
            arm, seed, names[arm], spec, checkpoint, self.dir / "students" / name))
        curves[arm].append(trained["losses"])
        steps[arm].append(trained["final_step"])
        result = self._stage(f"eval/{name}", lambda: self.evaluation(
            trained["model_dir"], names["eval_tasks"], spec))
        for task, metrics in result["tasks"].items():
          accuracy[arm].setdefault(task, []).append(metrics["accuracy"] / 100.0)
          gold_scores[arm].setdefault(task, []).append(metrics.get("gold_score"))
        for task, value in result.get("macro", {}).items():
          accuracy[arm].setdefault(task, []).append(value / 100.0)
    return self.write_report(data, accuracy, gold_scores, curves, steps, annotation, teacher,
                             primary_task=names["eval_tasks"][0], student=student)

  def write_report(self, data: dict, accuracy, gold_scores, curves, steps, annotation: dict,
                   teacher: dict, primary_task: str, student: str = "") -> files.Path:
    summary = annotation["summary"]
    rows = annotation_io.read_jsonl(annotation["merged"])
    annotation_summary = {
        "records annotated": annotation["records"],
        f"records usable in format {self.config.student_format} (all its kinds non-empty)":
            annotation.get("usable_for_student_format"),
        "generated tokens": summary.get("generated_tokens"),
        "annotation records/s": summary.get("records_per_s"),
        "generated tokens/s": summary.get("tokens_per_s"),
        "stopped at EOS (per kind)": summary.get("stopped_at_eos"),
        "QC flags (per kind)": summary.get("qc_flags"),
        "records flagged wrong_answer (any kind)": sum(_wrong_answer(row) for row in rows),
        "teacher final training loss": teacher.get("final_loss"),
        "annotated rows skipped by the student task (empty annotation)": tasks.SKIPS.total,
    }
    if self.config.dataset == "synthetic":
      annotation_summary["annotations equal to the reference (per kind)"] = (
          _reference_matches(rows, data["paths"]["student"], self.annotation_kinds))
    samples = []
    for row in rows[:self.config.num_samples_in_report]:
      sample = {"id": row.get("id"),
                "prompt": prompts.sample_text(row["question"], row["options"], row["answer"])}
      for kind in self.annotation_kinds:
        sample[kind] = row.get(kind)
      samples.append(sample)
    epochs = (f"{self.config.student_epochs:g} epochs over each arm's own data (steps per "
              f"arm: {', '.join(f'{a} {s[0]}' for a, s in steps.items() if s)})"
              if self.config.student_epochs is not None else "the same number of steps")
    notes = [f"Dataset: {self.config.dataset}; students"
             + (f" from {self.config.students[student]}" if student else "")
             + f": {len(self.config.seeds)} seeds per "
             f"arm, paired by seed; annotated arms in student format "
             f"{self.config.student_format}, mixed with the original data at rates "
             f"{self.config.original_rate}:{self.config.annotated_rate}; every student trains "
             f"for {epochs}.",
             "Accuracy: zero-shot rank classification over the option letters "
             "(mean ± std over seeds, n = seeds). Δ: arm minus 'original' on the same seed, "
             "mean and 95% confidence interval (paired t over seeds)."]
    chance = data.get("chance", _chance(primary_task))
    path = report_lib.write_report(
        self.dir / "report" / student if student else self.dir / "report",
        title="TeacherLM pipeline report" + (f": student {student}" if student else ""),
        accuracy=accuracy, loss_curves=curves, annotation_summary=annotation_summary,
        sample_annotations=samples, notes=notes, primary_task=primary_task,
        gold_scores=gold_scores, chance=chance,
        shortcut_baseline_accuracy=data.get("shortcut_baseline_accuracy"),
        wrong_answer_rate=annotation_summary["records flagged wrong_answer (any kind)"]
                          / max(len(rows), 1),
        teacher_loss=_loss_curve(teacher.get("model_dir", self.dir / "teacher")),
        steps=steps)
    logging.info("accuracy (rank classification):\n%s", report_lib.comparison_table(accuracy))
    logging.info("effect of the annotations:\n%s",
                 report_lib.delta_table(accuracy, gold_scores, primary_task))
    return path


def _tokenizer_of(checkpoint: str, binding: str) -> str:
  spec = checkpoint_vocab.tokenizer_spec(checkpoint)
  if spec is None:
    raise ValueError(f"{binding} = {checkpoint}: no tokenizer beside the checkpoint "
                     "(tokenizer.json or spm.model); a pretrained model trains and is evaluated "
                     "with its own tokenizer, so save it there")
  return spec


def _batches_per_epoch(task: str, config: train_lib.TrainConfig) -> int:
  """Packed training rows of one pass over `task` (each part of a mixture once), in batches."""
  data = config.data
  rows = _packed_rows(task, data.train_split, data.seq_len, data.loss_on, data.pack)
  return math.ceil(rows / data.batch_size)


@functools.lru_cache(maxsize=None)
def _packed_rows(task: str, split: str, seq_len: int, loss_on: str, pack: bool) -> int:
  # Unshuffled, so the same for every seed of an arm: counted once (a pass costs seconds).
  rows = 0
  for leaf in mixtures.leaf_tasks(task):
    one_pass = train_data.SeqioBatches(leaf, split, seq_len, 1, loss_on=loss_on, pack=pack,
                                       shuffle=False, repeat=False)
    rows += sum(1 for _ in one_pass())
  return rows


def _wrong_answer(row: dict) -> bool:
  return any("wrong_answer" in flags for flags in (row.get("qc") or {}).values())


def _reference_matches(rows: Sequence[dict], reference_path: str, kinds: Sequence[str]
                       ) -> Dict[str, str]:
  """Per kind, how many annotations equal the reference text of their record."""
  reference = {r["id"]: r for r in record_tasks.read_records(reference_path)}
  matches = {}
  for kind in kinds:
    texts = [(row[kind], reference[row["id"]].get(kind)) for row in rows
             if isinstance(row.get(kind), str) and row["id"] in reference]
    if texts:
      matches[kind] = f"{sum(a.strip() == b for a, b in texts)} of {len(texts)}"
  return matches


def _chance(task: str) -> Optional[float]:
  """Chance accuracy (%) of a real-data evaluation task (None when unknown)."""
  if task in tasks.QA_NUM_OPTIONS:
    return 100.0 / tasks.QA_NUM_OPTIONS[task]
  return 25.0 if task.startswith("mmlu") else None


def _loss_curve(model_dir) -> List[List[float]]:
  """[step, training loss] pairs from the trainer's TensorBoard event files (none when the
  trainer ran with tensorboard=False)."""
  logdir = metrics_lib.tensorboard_dir(str(model_dir))
  if not files.exists(logdir):
    return []
  losses = metrics_lib.read_scalars(logdir)
  return [[step, loss] for step, loss in sorted(losses.get("train/loss", {}).items())]


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"teacherlm pipeline: {name}")


def _last_loss(model_dir) -> Optional[float]:
  curve = _loss_curve(model_dir)
  return curve[-1][1] if curve else None
