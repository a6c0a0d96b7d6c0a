"""The annotation job: records in, teacher prompts, decoding, quality checks, sharded output.

For each input record and each requested kind (fundamentals, chain_of_thought,
common_mistakes) the TeacherLM prompt (`data/prompts.py`: the solved sample + one space + the
kind's trigger) is decoded by that kind's teacher with the slot engine (`decoding.py`), and one
output record is written with:

  the input fields, id, input_index,
  one field per kind: the text after the trigger (null when QC action='drop' removed it),
  all:              {kind: prompt + generation, decoded}  (the reference's `all`),
  generated_tokens: {kind: count},  stopped_at_eos: {kind: bool},
  mean_logprob:     {kind: mean token log-prob of the kept sample},
  qc:               {kind: [flags]},  teacher: {kind: checkpoint id},
  decoding:         the sampling settings,  seed.

Each process annotates its contiguous slice of the input into its own shard
(`annotation_io.py`); chunks are committed atomically, so `resume=True` continues a killed run
with every id exactly once, and `annotation_io.merge` concatenates the shards in input order.
Sampling keys depend on (seed, input index, kind, sample) only, so results do not depend on
the number of processes, slots or chunks.
"""
from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import math
import time
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import gin
import jax
from absl import logging

from teacherlm_jax.annotation import decoding
from teacherlm_jax.annotation import io as annotation_io
from teacherlm_jax.annotation import quality as annotation_quality
from teacherlm_jax.data import prompts
from teacherlm_jax.data import sources
from teacherlm_jax.data import vocab
from teacherlm_jax.models import checkpoint_io
from teacherlm_jax.models import checkpoint_vocab
from teacherlm_jax.models import reconfigure
from teacherlm_jax.runtime import kernels
from teacherlm_jax.runtime import partitioning
from teacherlm_jax.storage import files

ANNOTATION_KINDS = prompts.ANNOTATION_KINDS


# ---- tokenizers --------------------------------------------------------------------------

class Tokenizer:
  """The annotation job's view of a `data/vocab.py` vocabulary (HF or SentencePiece).

  An HF tokenizer tokenises a prompt as `tokenizer(prompt)` does before `generate` in the
  reference (`add_special_tokens=True`: BLOOM adds nothing, OPT prepends its BOS) and decodes
  without special tokens; its pad id is the tokenizer's own (None falls back to the model's).
  """

  def __init__(self, vocabulary, name: str, add_special_tokens: bool = True):
    self.vocabulary, self.name = vocabulary, name
    self.add_special_tokens = add_special_tokens
    self._hf = isinstance(vocabulary, vocab.HFTokenizerVocabulary)

  def encode(self, text: str) -> List[int]:
    if self._hf:
      return self.vocabulary.encode_prompt(text, self.add_special_tokens)
    return list(self.vocabulary.encode(text))

  @property
  def size(self) -> int:
    return self.vocabulary.vocab_size  # HF: added tokens included, the ids a text can get.

  def decode(self, ids: Sequence[int]) -> str:
    if self._hf:
      return self.vocabulary.decode_text(ids)
    return self.vocabulary.decode([int(i) for i in ids])

  @property
  def eos_id(self) -> Optional[int]:
    return self.vocabulary.eos_id

  @property
  def pad_id(self) -> Optional[int]:
    if self._hf:
      return self.vocabulary.tokenizer.pad_token_id
    return self.vocabulary.pad_id


def load_tokenizer(spec: str, add_special_tokens: bool = True) -> Tokenizer:
  """'hf:<dir>' (or a plain directory) or 'spm:<model>', through `vocab.get_vocabulary`."""
  kind, sep, _ = spec.partition(":")
  if not (sep and kind in ("hf", "spm")):
    spec = f"hf:{spec}"
  vocabulary = vocab.get_vocabulary(spec)
  name = f"hf:{vocabulary.tokenizer_dir}" if spec.startswith("hf:") else spec
  return Tokenizer(vocabulary, name, add_special_tokens)


# ---- prompts -----------------------------------------------------------------------------

def gold_letter(answer) -> Optional[str]:
  """'B' for answers '(B)' or 'B'; None for open answers."""
  try:
    return prompts.OPTION_LETTERS[prompts.letter_index(str(answer))]
  except ValueError:
    return None


def teacher_prompt(fields: Mapping, kind: str, *, question_field: str, answer_field: str,
                   options_field: Optional[str]) -> str:
  """The TeacherLM prompt of one record for one annotation kind (via data/prompts.py)."""
  question = str(fields[question_field])
  if question.startswith("Q: "):
    question = question[3:]  # ECQA-style questions carry the prefix already
  options = fields.get(options_field) if options_field else None
  answer = str(fields[answer_field])
  letter = gold_letter(answer)
  return prompts.teacher_prompt(prompts.format_question(question, options or ()),
                                letter or answer, kind)


# ---- the job -----------------------------------------------------------------------------

@dataclasses.dataclass
class _Task:
  record: annotation_io.InputRecord
  prompts: Dict[str, List[int]]


@dataclasses.dataclass(frozen=True)
class _Fields:
  """Which record fields hold the id, question, answer and options."""
  id: Optional[str]
  question: str
  answer: str
  options: Optional[str]


@dataclasses.dataclass
class _Teachers:
  """The loaded teachers: checkpoint per kind, its id in the output, a Decoder per checkpoint."""
  path_of: Dict[str, str]
  id_of: Dict[str, str]
  decoders: Dict[str, decoding.Decoder]


def _teacher_paths(teachers: Union[str, Mapping[str, str]], kinds: Sequence[str]
                   ) -> Dict[str, str]:
  if isinstance(teachers, str):
    return {kind: teachers for kind in kinds}
  missing = [k for k in kinds if k not in teachers]
  if missing:
    raise ValueError(f"no teacher checkpoint for kinds {missing}; teachers={dict(teachers)}")
  return {kind: str(teachers[kind]) for kind in kinds}


class Progress:
  """Records done, records/s, generated tokens/s and ETA in the log (at most every
  `every_secs`: a pod's log files take lines, not a redrawn bar), plus the totals."""

  def __init__(self, total: int, enabled: bool, every_secs: float = 30.0):
    self.total, self.enabled, self.every_secs = total, enabled, every_secs
    self.start = time.time()
    self.records = 0
    self.tokens = 0

  def update(self, records: int, tokens: int):
    self.records += records
    self.tokens += tokens
    if not self.enabled:
      return
    elapsed = max(time.time() - self.start, 1e-9)
    eta = (self.total - self.records) * elapsed / max(self.records, 1)
    logging.log_every_n_seconds(
        logging.INFO, "annotate: %d/%d records, %.2f records/s, %.1f generated tokens/s, "
        "ETA %s", self.every_secs, self.records, self.total, self.records / elapsed,
        self.tokens / elapsed, datetime.timedelta(seconds=round(eta)))

  def close(self):
    return time.time() - self.start


def _check_settings(kinds: Sequence[str], num_samples: int, num_slots: int, chunk_size: int,
                    sync_every: int, mesh) -> None:
  """Refuses settings that would crash late or never finish, naming the gin binding."""
  unknown = [k for k in kinds if k not in ANNOTATION_KINDS]
  if unknown or not kinds:
    raise ValueError(f"annotate.kinds={list(kinds)}: expected a non-empty subset of "
                     f"{ANNOTATION_KINDS}")
  for name, value in (("num_samples", num_samples), ("num_slots", num_slots),
                      ("chunk_size", chunk_size), ("sync_every", sync_every)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"annotate.{name}={value!r}: must be an integer >= 1")
  dp = int(mesh.shape["data"] * mesh.shape["fsdp"]) if mesh is not None else 1
  if num_slots % dp:
    raise ValueError(f"annotate.num_slots={num_slots}: must be a multiple of the mesh's data "
                     f"parallelism {dp} (annotate.mesh_shape)")


def _model_source(path: str) -> str:
  """The file that sets a teacher's vocab_size (for error messages)."""
  ours = files.resolve(path) / checkpoint_io.MODEL_CONFIG_FILE
  return str(ours if files.exists(ours) else files.resolve(path) / "config.json")


def _check_tokenizer_fits(tok, teacher_of: Dict[str, str]) -> None:
  """Every teacher's vocab_size (read from its config, no weights loaded) covers the tokenizer."""
  for path in sorted(set(teacher_of.values())):
    source = _model_source(path)
    try:
      model_config = json.loads(files.read_text(source))
      vocab_size = int(model_config["vocab_size"])
    except (OSError, ValueError, KeyError):
      continue  # An unreadable config is reported with its own message when the model loads.
    vocab.check_fits_model(tok.size, tok.name, vocab_size, source,
                           {"eos": tok.eos_id, "pad": tok.pad_id})
    checkpoint_vocab.check_special_ids(tok.name, checkpoint_vocab.tokenizer_special_ids(tok),
                                       source, checkpoint_vocab.model_special_ids(model_config))


def _load_teachers(teacher_of: Dict[str, str], tok, mesh, dtype: str,
                   attention_impl: str = "") -> _Teachers:
  """One Decoder per distinct checkpoint, attending with this platform's choice (not the one
  the checkpoint was trained with)."""
  decoders = {}
  attention = kernels.attention_options(attention_impl, jax.local_devices()[0])
  for path in sorted(set(teacher_of.values())):
    # An HF directory, or a trainer model_dir / params directory of ours (no export needed).
    model = reconfigure.with_config_fields(checkpoint_io.load_any(path, dtype=dtype),
                                           **attention)
    eos_id = tok.eos_id if tok.eos_id is not None else model.config.eos_token_id
    pad_id = tok.pad_id if tok.pad_id is not None else model.config.pad_token_id
    decoders[path] = decoding.Decoder(model, mesh=mesh, eos_id=eos_id, pad_id=pad_id)
  return _Teachers(teacher_of, {k: str(files.resolve(p)) for k, p in teacher_of.items()},
                   decoders)


def _prompt_tasks(records: Sequence[annotation_io.InputRecord], kinds: Sequence[str], tok,
                  teachers: _Teachers, fields: _Fields, sampling: decoding.SamplingConfig,
                  input_path, rejects: Optional[List[annotation_io.Reject]]) -> List[_Task]:
  """Every record's prompt per kind, tokenised; records whose prompt does not fit are rejected
  (or raise `path:line: ...`)."""
  tasks = []
  for record in records:
    try:
      token_ids = {}
      for kind in kinds:
        text = teacher_prompt(record.fields, kind, question_field=fields.question,
                              answer_field=fields.answer, options_field=fields.options)
        token_ids[kind] = tok.encode(text)
        decoder = teachers.decoders[teachers.path_of[kind]]
        vocab.check_ids_fit_model(token_ids[kind], decoder.config.vocab_size,
                                  f"{input_path}:{record.line}", tok.name,
                                  _model_source(teachers.path_of[kind]))
        try:
          decoder.check_length(len(token_ids[kind]), sampling.max_new_tokens)
        except ValueError as e:
          raise sources.BadRow(input_path, record.line, None, f"{kind} {e}", "too_long") from None
    except sources.BadRow as e:
      if rejects is None:
        raise
      rejects.append(annotation_io.Reject.of(
          e, json.dumps(record.fields, ensure_ascii=False)))
      continue
    tasks.append(_Task(record, token_ids))
  return tasks


@gin.configurable(denylist=["input_path", "output_dir", "resume", "process_index",
                            "process_count"])
def annotate(input_path, output_dir, *,
             teachers: Union[str, Mapping[str, str]] = gin.REQUIRED,
             kinds: Sequence[str] = ANNOTATION_KINDS,
             tokenizer: Optional[str] = None,
             add_special_tokens: bool = True,
             sampling: Optional[decoding.SamplingConfig] = None,
             num_samples: int = 1,
             seed: int = 0,
             num_slots: int = 16,
             chunk_size: int = 64,
             sync_every: int = 16,
             mesh_shape: Optional[Tuple[int, int, int]] = None,
             dtype: str = "float32",
             attention_impl: str = "",
             id_field: Optional[str] = "id",
             question_field: str = "question",
             answer_field: str = "answer",
             options_field: Optional[str] = "options",
             reject_bad_input: bool = False,
             allow_empty_input: bool = False,
             limit: Optional[int] = None,
             quality: Optional[annotation_quality.QualityConfig] = None,
             resume: bool = False,
             process_index: Optional[int] = None,
             process_count: Optional[int] = None,
             progress: bool = True) -> dict:
  """Annotates this process's slice of `input_path` into its shard of `output_dir`.

  Args:
    input_path: JSONL records with `question_field`, `answer_field` (and optional options),
      or 'seqio:<task>[:<split>]' for a seqio task's examples with those fields, e.g.
      'seqio:records_creak' (the CREAK training records of the student tasks).
    output_dir: annotation directory (one shard-* subdirectory per process).
    teachers: one checkpoint directory for every kind, or {kind: directory}; each an HF
      directory, a trainer model_dir (latest checkpoint) or a `save_params` directory.
    kinds: annotation kinds to produce.
    tokenizer: 'hf:<dir>' or 'spm:<model>'; default the tokenizer saved beside the first
      teacher (an HF directory's, or the one our trainer saved with its checkpoints).
    add_special_tokens: HF tokenizers only: add the tokenizer's special tokens (e.g. OPT BOS).
    sampling: max_new_tokens, temperature (0 = greedy), top_k, top_p; default
      `SamplingConfig()`, i.e. the gin bindings `SamplingConfig.*` (gin/annotate.gin binds the
      reference's: HF generate(do_sample=True, max_new_tokens=2048), top-k 50).
    num_samples: samples per prompt; the most confident one passing QC is kept.
    seed: sampling seed.
    num_slots: rows of the slot engine's cache (continuous batching).
    chunk_size: records per atomically committed chunk.
    sync_every: decode steps between host checks for finished rows.
    mesh_shape: (data, fsdp, tensor) over this process's devices; None = one device.
    dtype: compute dtype of the teachers.
    attention_impl: 'xla', 'pallas' (TPU) or 'cudnn' (GPU) for prefill and decoding; '' = this
      platform's default (runtime/kernels.py), whatever the checkpoint was trained with.
    id_field: unique id field (None = line number).
    question_field, answer_field, options_field: record fields the prompt is built from.
    reject_bad_input: write bad records to the shard's rejects.jsonl (counted) instead of
      raising an error that names file, line and field.
    allow_empty_input: an input without records is an error unless this is set.
    limit: annotate only the first `limit` input records (quick runs).
    quality: QC thresholds (default QualityConfig()).
    resume: continue a killed run: ids in committed chunks are skipped.
    process_index, process_count: this process's slice (default jax.process_index/count).
    progress: log progress lines (process 0).

  Returns:
    The summary dict (also stored in the shard's manifest).
  """
  sampling = sampling or decoding.SamplingConfig()
  mesh = (partitioning.make_mesh(*mesh_shape, devices=jax.local_devices())
          if mesh_shape else None)
  _check_settings(kinds, num_samples, num_slots, chunk_size, sync_every, mesh)
  kinds = tuple(kinds)
  fields = _Fields(id_field, question_field, answer_field, options_field)
  quality = quality or annotation_quality.QualityConfig()
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  teacher_of = _teacher_paths(teachers, kinds)
  if not tokenizer:
    first = teacher_of[kinds[0]]
    tokenizer = checkpoint_vocab.tokenizer_spec(first)
    if tokenizer is None:
      raise ValueError(f"no tokenizer given and teacher {first} has none beside it (an HF "
                       "directory's tokenizer.json, or the one our trainer saves); set "
                       "tokenizer='hf:<dir>' or 'spm:<model>'")
  tok = load_tokenizer(tokenizer, add_special_tokens)
  _check_tokenizer_fits(tok, teacher_of)

  # Reading: this process's slice, bad records rejected (or raised) with file, line and field.
  rejects: Optional[List[annotation_io.Reject]] = [] if reject_bad_input else None
  records = annotation_io.read_records(
      input_path, id_field=id_field, required_fields=[question_field, answer_field],
      answer_field=answer_field, options_field=options_field, process_index=process_index,
      process_count=process_count, limit=limit, rejects=rejects, allow_empty=allow_empty_input)
  loaded = _load_teachers(teacher_of, tok, mesh, dtype, attention_impl)
  tasks = _prompt_tasks(records, kinds, tok, loaded, fields, sampling, input_path, rejects)

  decoding_settings = {**dataclasses.asdict(sampling), "num_samples": num_samples}
  source = (str(input_path) if annotation_io.is_task_source(input_path)
            else str(files.resolve(input_path)))
  run_settings = {"input": source, "limit": limit, "kinds": list(kinds),
                  "teachers": loaded.id_of, "tokenizer": tok.name, "decoding": decoding_settings,
                  "seed": seed, "quality": dataclasses.asdict(quality),
                  "fields": [id_field, question_field, answer_field, options_field]}
  writer = annotation_io.ShardWriter(output_dir, process_index, process_count, run_settings,
                                     resume=resume)
  if rejects is not None:
    writer.write_rejects(rejects)
  todo = [t for t in tasks if t.record.id not in writer.committed_ids]

  counts, qc_counts, progress_report, seconds = _decode_and_commit(
      todo, kinds, tok, loaded, quality, writer, sampling=sampling,
      decoding_settings=decoding_settings, num_samples=num_samples, seed=seed,
      num_slots=num_slots, sync_every=sync_every, chunk_size=chunk_size,
      answer_field=answer_field, progress=progress and process_index == 0)
  summary = {
      "process_index": process_index, "process_count": process_count,
      "records_in_slice": len(records) + sum(1 for r in rejects or () if r.reason != "too_long"),
      "rejected": dict(collections.Counter(r.reason for r in rejects or ())),
      "skipped_already_committed": len(tasks) - len(todo),
      "annotated": len(todo),
      "committed_total": len(writer.committed_ids),
      "generated_tokens": progress_report.tokens,
      "seconds": round(seconds, 3),
      "records_per_s": round(len(todo) / seconds, 3) if seconds else None,
      "tokens_per_s": round(progress_report.tokens / seconds, 3) if seconds else None,
      "stopped_at_eos": {k: counts[f"eos/{k}"] for k in kinds},
      "qc_flags": {k: dict(v) for k, v in qc_counts.items()},
      "qc_dropped": {k: counts[f"dropped/{k}"] for k in kinds},
      "qc_action": quality.action,
  }
  writer.finish(summary)
  logging.info("annotation summary: %s", json.dumps(summary, sort_keys=True))
  if jax.process_count() > 1:
    # The barrier before any merge: every process of the job has committed its shard.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("teacherlm annotation: every shard committed")
  return summary


def _decode_and_commit(todo: Sequence[_Task], kinds, tok, teachers: _Teachers, quality, writer,
                       *, sampling, decoding_settings, num_samples: int, seed: int,
                       num_slots: int, sync_every: int, chunk_size: int, answer_field: str,
                       progress: bool):
  """Decodes `todo` a chunk at a time and commits each chunk's records; returns the counts
  (EOS, dropped), the QC flag counts per kind, the progress totals and the seconds taken."""
  engines = _engines(todo, kinds, teachers, sampling, num_slots, sync_every)
  counts = collections.Counter()
  qc_counts = {kind: collections.Counter() for kind in kinds}
  progress_report = Progress(len(todo), progress)
  for start in range(0, len(todo), chunk_size):
    chunk = todo[start:start + chunk_size]
    generations = _decode_chunk(chunk, kinds, teachers.path_of, engines, num_samples, seed)
    out = [_output_record(task, generations, kinds, tok, quality, teachers.id_of,
                          decoding_settings, seed, num_samples, answer_field, qc_counts, counts)
           for task in chunk]
    writer.commit(out)
    progress_report.update(len(chunk), sum(sum(r["generated_tokens"].values()) for r in out))
  return counts, qc_counts, progress_report, progress_report.close()


def _engines(todo: Sequence[_Task], kinds, teachers: _Teachers, sampling, num_slots: int,
             sync_every: int) -> Dict[str, decoding.SlotEngine]:
  """A slot engine per teacher that has prompts to decode, sized for its longest prompt."""
  engines = {}
  for path, decoder in teachers.decoders.items():
    lengths = [len(t.prompts[k]) for t in todo for k in kinds if teachers.path_of[k] == path]
    if lengths:
      engines[path] = decoding.SlotEngine(decoder, sampling, num_slots=num_slots,
                                          max_prompt_length=max(lengths),
                                          sync_every=sync_every)
  return engines


def _uid(record: annotation_io.InputRecord, kind: str, sample: int, num_samples: int) -> int:
  return (record.index * len(ANNOTATION_KINDS) + ANNOTATION_KINDS.index(kind)) * num_samples + sample


def _decode_chunk(chunk: Sequence[_Task], kinds, teacher_of, engines, num_samples: int, seed: int
                  ) -> Dict[int, decoding.Generation]:
  """Every (record, kind, sample) of the chunk decoded, keyed by uid."""
  generations = {}
  for path, engine in engines.items():
    requests = [decoding.Request(_uid(t.record, kind, s, num_samples), t.prompts[kind])
                for t in chunk for kind in kinds if teacher_of[kind] == path
                for s in range(num_samples)]
    for generation in engine.run(requests, seed=seed):
      generations[generation.uid] = generation
  return generations


def _finite_or_none(value: float) -> Optional[float]:
  """JSON has no NaN or Inf: a non-finite value is written as null (and QC-flagged)."""
  return round(value, 6) if math.isfinite(value) else None


def _output_record(task: _Task, generations, kinds, tok, quality, teacher_ids,
                   decoding_settings, seed, num_samples, answer_field, qc_counts, counts) -> dict:
  record = task.record
  gold = gold_letter(record.fields[answer_field])
  out = {**record.fields, "id": record.id, "input_index": record.index}
  for key in ("all", "generated_tokens", "stopped_at_eos", "mean_logprob", "qc", "teacher"):
    out[key] = {}
  for kind in kinds:
    samples = [generations[_uid(record, kind, s, num_samples)] for s in range(num_samples)]
    texts, flags = [], []
    for g in samples:
      ids = g.tokens[:-1] if g.stopped_at_eos else g.tokens
      texts.append(tok.decode(ids).strip())
      flags.append(annotation_quality.check(texts[-1], kind=kind, stopped_at_eos=g.stopped_at_eos,
                                            gold_letter=gold, config=quality,
                                            mean_logprob=g.mean_logprob))
    best = annotation_quality.pick_sample(flags, [g.mean_logprob for g in samples])
    g = samples[best]
    kept_ids = g.tokens[:-1] if g.stopped_at_eos else g.tokens
    dropped = bool(flags[best]) and quality.action == "drop"
    out[kind] = None if dropped else texts[best]
    out["all"][kind] = tok.decode(list(task.prompts[kind]) + list(kept_ids))
    out["generated_tokens"][kind] = g.num_tokens
    out["stopped_at_eos"][kind] = g.stopped_at_eos
    out["mean_logprob"][kind] = _finite_or_none(g.mean_logprob)
    out["qc"][kind] = flags[best]
    out["teacher"][kind] = teacher_ids[kind]
    qc_counts[kind].update(flags[best])
    counts[f"eos/{kind}"] += int(g.stopped_at_eos)
    counts[f"dropped/{kind}"] += int(dropped)
  out["decoding"] = decoding_settings
  out["seed"] = seed
  return out
