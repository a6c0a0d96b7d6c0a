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
import json
import pathlib
import sys
import time
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import gin
import jax
import tqdm
from absl import logging

from teacherlm_jax.annotation import decoding
from teacherlm_jax.annotation import io as annotation_io
from teacherlm_jax.annotation import quality as annotation_quality
from teacherlm_jax.data import hf_tokenizers
from teacherlm_jax.data import prompts
from teacherlm_jax.models import checkpoint_io
from teacherlm_jax.runtime import partitioning

ANNOTATION_KINDS = prompts.ANNOTATION_KINDS


# ---- tokenizers --------------------------------------------------------------------------

class HFTokenizer:
  """An HF tokenizer from a local directory (the one saved with an HF checkpoint).

  `add_special_tokens=True` tokenises as `tokenizer(prompt)` does before `generate` in the
  reference (BLOOM adds nothing, OPT prepends its BOS).
  """

  def __init__(self, directory, add_special_tokens: bool = True):
    self.tokenizer = hf_tokenizers.load(directory)
    self.add_special_tokens = add_special_tokens
    self.name = f"hf:{directory}"

  def encode(self, text: str) -> List[int]:
    return list(self.tokenizer.encode(text, add_special_tokens=self.add_special_tokens))

  def decode(self, ids: Sequence[int]) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  @property
  def eos_id(self) -> Optional[int]:
    return self.tokenizer.eos_token_id

  @property
  def pad_id(self) -> Optional[int]:
    return self.tokenizer.pad_token_id


class SeqioTokenizer:
  """Any `seqio.Vocabulary` (e.g. SentencePiece from `data/vocab.py`)."""

  def __init__(self, vocabulary, name: str = ""):
    self.vocabulary, self.name = vocabulary, name or repr(vocabulary)

  def encode(self, text: str) -> List[int]:
    return list(self.vocabulary.encode(text))

  def decode(self, ids: Sequence[int]) -> str:
    return self.vocabulary.decode([int(i) for i in ids])

  @property
  def eos_id(self) -> Optional[int]:
    return self.vocabulary.eos_id

  @property
  def pad_id(self) -> Optional[int]:
    return self.vocabulary.pad_id


def load_tokenizer(spec: str, add_special_tokens: bool = True):
  """'hf:<dir>' (or a plain directory) -> HFTokenizer; 'spm:<model>' -> SeqioTokenizer."""
  kind, sep, path = spec.partition(":")
  if sep and kind == "spm":
    from teacherlm_jax.data import vocab  # pylint: disable=g-import-not-at-top
    return SeqioTokenizer(vocab.get_vocabulary(spec), name=spec)
  return HFTokenizer(path if sep and kind == "hf" else spec, add_special_tokens)


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


def _teacher_paths(teachers: Union[str, Mapping[str, str]], kinds: Sequence[str]
                   ) -> Dict[str, str]:
  if isinstance(teachers, str):
    return {kind: teachers for kind in kinds}
  missing = [k for k in kinds if k not in teachers]
  if missing:
    raise ValueError(f"no teacher checkpoint for kinds {missing}; teachers={dict(teachers)}")
  return {kind: str(teachers[kind]) for kind in kinds}


class Progress:
  """A live line: records/s, generated tokens/s, ETA (tqdm), plus the totals."""

  def __init__(self, total: int, enabled: bool):
    self.bar = tqdm.tqdm(total=total, unit="rec", disable=not enabled, file=sys.stderr,
                         dynamic_ncols=True, desc="annotate")
    self.start = time.time()
    self.records = 0
    self.tokens = 0

  def update(self, records: int, tokens: int):
    self.records += records
    self.tokens += tokens
    elapsed = max(time.time() - self.start, 1e-9)
    self.bar.set_postfix_str(f"{self.tokens / elapsed:.1f} tok/s", refresh=False)
    self.bar.update(records)

  def close(self):
    self.bar.close()
    return time.time() - self.start


@gin.configurable(denylist=["input_path", "output_dir", "resume", "process_index",
                            "process_count"])
def annotate(input_path, output_dir, *,
             teachers: Union[str, Mapping[str, str]] = gin.REQUIRED,
             kinds: Sequence[str] = ANNOTATION_KINDS,
             tokenizer: Optional[str] = None,
             add_special_tokens: bool = True,
             max_new_tokens: int = 128,
             temperature: float = 0.0,
             top_k: int = 0,
             top_p: float = 1.0,
             seed: int = 0,
             num_samples: int = 1,
             num_slots: int = 16,
             chunk_size: int = 64,
             sync_every: int = 16,
             mesh_shape: Optional[Tuple[int, int, int]] = None,
             dtype: str = "float32",
             id_field: Optional[str] = "id",
             question_field: str = "question",
             answer_field: str = "answer",
             options_field: Optional[str] = "options",
             reject_bad_input: bool = False,
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
    tokenizer: 'hf:<dir>' or 'spm:<model>'; default the first teacher's directory.
    add_special_tokens: HF tokenizers only: add the tokenizer's special tokens (e.g. OPT BOS).
    max_new_tokens, temperature, top_k, top_p, seed: decoding settings (temperature 0 = greedy).
    num_samples: samples per prompt; the most confident one passing QC is kept.
    num_slots: rows of the slot engine's cache (continuous batching).
    chunk_size: records per atomically committed chunk.
    sync_every: decode steps between host checks for finished rows.
    mesh_shape: (data, fsdp, tensor) over this process's devices; None = one device.
    dtype: compute dtype of the teachers.
    id_field: unique id field (None = line number).
    question_field, answer_field, options_field: record fields the prompt is built from.
    reject_bad_input: write bad records to the shard's rejects.jsonl (counted) instead of
      raising an error that names file and line.
    limit: annotate only the first `limit` input records (quick runs).
    quality: QC thresholds (default QualityConfig()).
    resume: continue a killed run: ids in committed chunks are skipped.
    process_index, process_count: this process's slice (default jax.process_index/count).
    progress: show the live progress line.

  Returns:
    The summary dict (also stored in the shard's manifest).
  """
  if num_samples < 1:
    raise ValueError(f"num_samples={num_samples}: must be >= 1")
  unknown = [k for k in kinds if k not in ANNOTATION_KINDS]
  if unknown or not kinds:
    raise ValueError(f"kinds={list(kinds)}: expected a non-empty subset of {ANNOTATION_KINDS}")
  kinds = tuple(kinds)
  quality = quality or annotation_quality.QualityConfig()
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  sampling = decoding.SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                     top_k=top_k, top_p=top_p)
  teacher_of = _teacher_paths(teachers, kinds)
  teacher_ids = {kind: str(pathlib.Path(path).resolve()) for kind, path in teacher_of.items()}
  if not tokenizer:
    first = teacher_of[kinds[0]]
    if not checkpoint_io.is_hf_directory(first):
      raise ValueError(f"no tokenizer given and teacher {first} is not an HF directory to take "
                       "one from; set tokenizer='hf:<dir>' or 'spm:<model>'")
    tokenizer = f"hf:{first}"
  tok = load_tokenizer(tokenizer, add_special_tokens)

  # Input: this process's slice, bad records rejected (or raised) with file and line.
  rejects: Optional[List[annotation_io.Reject]] = [] if reject_bad_input else None
  required = [question_field, answer_field]
  records = annotation_io.read_records(
      input_path, id_field=id_field, required_fields=required, process_index=process_index,
      process_count=process_count, limit=limit, rejects=rejects)

  # Teachers: one Decoder per distinct checkpoint, on this process's devices.
  mesh = (partitioning.make_mesh(*mesh_shape, devices=jax.local_devices())
          if mesh_shape else None)
  decoders = {}
  for path in sorted(set(teacher_of.values())):
    # An HF directory, or a trainer model_dir / params directory of ours (no export needed).
    model = checkpoint_io.load_any(path, dtype=dtype)
    config = model.config
    eos_id = tok.eos_id if tok.eos_id is not None else config.eos_token_id
    pad_id = tok.pad_id if tok.pad_id is not None else config.pad_token_id
    decoders[path] = decoding.Decoder(model, mesh=mesh, eos_id=eos_id, pad_id=pad_id)

  # Prompts, with records whose prompt does not fit the context rejected.
  tasks = []
  for record in records:
    try:
      token_ids = {}
      for kind in kinds:
        text = teacher_prompt(record.fields, kind, question_field=question_field,
                              answer_field=answer_field, options_field=options_field)
        token_ids[kind] = tok.encode(text)
        try:
          decoders[teacher_of[kind]].check_length(len(token_ids[kind]), max_new_tokens)
        except ValueError as e:
          raise annotation_io.InputError(f"{input_path}:{record.line}: {kind} {e}",
                                         "too_long") from None
    except annotation_io.InputError as e:
      if rejects is None:
        raise
      rejects.append(annotation_io.Reject(str(input_path), record.line, e.reason, str(e),
                                          json.dumps(record.fields, ensure_ascii=False)))
      continue
    tasks.append(_Task(record, token_ids))

  decoding_settings = {"max_new_tokens": max_new_tokens, "temperature": temperature,
                       "top_k": top_k, "top_p": top_p, "num_samples": num_samples}
  source = (str(input_path) if annotation_io.is_task_source(input_path)
            else str(pathlib.Path(input_path).resolve()))
  run_settings = {"input": source, "limit": limit, "kinds": list(kinds),
                  "teachers": teacher_ids, "tokenizer": tok.name, "decoding": decoding_settings,
                  "seed": seed, "quality": dataclasses.asdict(quality),
                  "fields": [id_field, question_field, answer_field, options_field]}
  writer = annotation_io.ShardWriter(output_dir, process_index, process_count, run_settings,
                                     resume=resume)
  if rejects is not None:
    writer.write_rejects(rejects)
  todo = [t for t in tasks if t.record.id not in writer.committed_ids]

  engines = {}
  for path, decoder in decoders.items():
    lengths = [len(t.prompts[k]) for t in todo for k in kinds if teacher_of[k] == path]
    if lengths:
      engines[path] = decoding.SlotEngine(decoder, sampling, num_slots=num_slots,
                                          max_prompt_length=max(lengths),
                                          sync_every=sync_every)

  counts = collections.Counter()
  qc_counts = {kind: collections.Counter() for kind in kinds}
  bar = Progress(len(todo), progress and process_index == 0)
  for start in range(0, len(todo), chunk_size):
    chunk = todo[start:start + chunk_size]
    generations = _decode_chunk(chunk, kinds, teacher_of, engines, num_samples, seed)
    out = []
    for position, task in enumerate(chunk):
      record = _output_record(task, position, generations, kinds, tok, quality, teacher_ids,
                              decoding_settings, seed, num_samples, answer_field, qc_counts,
                              counts)
      out.append(record)
    writer.commit(out)
    bar.update(len(chunk), sum(sum(r["generated_tokens"].values()) for r in out))
  seconds = bar.close()

  summary = {
      "process_index": process_index, "process_count": process_count,
      "records_in_slice": len(records) + sum(1 for r in rejects or () if r.reason != "too_long"),
      "rejected": dict(collections.Counter(r.reason for r in rejects or ())),
      "skipped_already_committed": len(tasks) - len(todo),
      "annotated": len(todo),
      "committed_total": len(writer.committed_ids),
      "generated_tokens": bar.tokens,
      "seconds": round(seconds, 3),
      "records_per_s": round(len(todo) / seconds, 3) if seconds else None,
      "tokens_per_s": round(bar.tokens / seconds, 3) if seconds else None,
      "stopped_at_eos": {k: counts[f"eos/{k}"] for k in kinds},
      "qc_flags": {k: dict(v) for k, v in qc_counts.items()},
      "qc_dropped": {k: counts[f"dropped/{k}"] for k in kinds},
      "qc_action": quality.action,
  }
  writer.finish(summary)
  logging.info("annotation summary: %s", json.dumps(summary, sort_keys=True))
  return summary


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


def _output_record(task: _Task, position: int, generations, kinds, tok, quality, teacher_ids,
                   decoding_settings, seed, num_samples, answer_field, qc_counts, counts) -> dict:
  del position
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
                                            gold_letter=gold, config=quality))
    best = annotation_quality.pick_sample(flags, [g.mean_logprob for g in samples])
    g = samples[best]
    kept_ids = g.tokens[:-1] if g.stopped_at_eos else g.tokens
    dropped = bool(flags[best]) and quality.action == "drop"
    out[kind] = None if dropped else texts[best]
    out["all"][kind] = tok.decode(list(task.prompts[kind]) + list(kept_ids))
    out["generated_tokens"][kind] = g.num_tokens
    out["stopped_at_eos"][kind] = g.stopped_at_eos
    out["mean_logprob"][kind] = round(g.mean_logprob, 6)
    out["qc"][kind] = flags[best]
    out["teacher"][kind] = teacher_ids[kind]
    qc_counts[kind].update(flags[best])
    counts[f"eos/{kind}"] += int(g.stopped_at_eos)
    counts[f"dropped/{kind}"] += int(dropped)
  out["decoding"] = decoding_settings
  out["seed"] = seed
  return out
