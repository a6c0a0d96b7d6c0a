"""Annotation files: input records, per-process shards committed atomically, rejects, merge.

Layout of an annotation output directory:

  {output}/shard-00000-of-00002/chunk-000000-1f3a9c2e.jsonl   chunks (one JSON record a line)
  {output}/shard-00000-of-00002/manifest.json        run settings, committed chunks, summary
  {output}/shard-00000-of-00002/rejects.jsonl        bad input records with their reason

Local or gs:// alike (storage/files.py), so nothing relies on rename, which object stores
lack. Every file is published whole (`files.write_atomic`). The manifest is the truth: a chunk
is committed once the manifest that lists it is written, after the chunk. A chunk of a killed
worker that no manifest lists is ignored and deleted on resume; its records are annotated
again. Chunk names carry a token of the writer that made them, so a second writer of the same
shard (a worker thought dead) never overwrites a committed chunk. `--resume` skips exactly the
ids of the committed chunks, so a killed-and-resumed run holds each id exactly once.
`wait_for_shards` is the barrier before a merge: every process's manifest says complete.
"""
from __future__ import annotations

import dataclasses
import errno
import io
import json
import uuid
from typing import Any, Dict, Iterator, List, Optional, Sequence

from teacherlm_jax.data import sources
from teacherlm_jax.storage import files

MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
CHUNK_GLOB = "chunk-*.jsonl"


class InputError(ValueError):
  """An input that cannot be read at all (no file, an unknown task, nothing in it); a bad
  record is a `sources.BadRow`, whose `category` its reject is counted under."""

  def __init__(self, message: str, reason: str = "bad_source"):
    super().__init__(message)
    self.reason = reason


@dataclasses.dataclass
class InputRecord:
  """One input record: `index` orders the input (merge sorts by it); `line` is 1-based."""
  index: int
  line: int
  id: str
  fields: Dict[str, Any]


@dataclasses.dataclass
class Reject:
  """A record kept out of the run: `reason` is a category, `message` says file, line, why."""
  file: str
  line: int
  reason: str
  message: str
  raw: str

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def of(cls, error: sources.BadRow, raw: str) -> "Reject":
    # Bytes that are not UTF-8 (lone surrogates from `sources.open_text`) kept as \xNN text.
    raw = raw.rstrip("\r\n").encode("utf-8", "surrogateescape").decode("utf-8",
                                                                       "backslashreplace")
    return cls(error.path, error.line, error.category, str(error), raw)


def process_slice(num_items: int, process_index: int, process_count: int) -> range:
  """The contiguous part of `num_items` that process `process_index` of `process_count` owns."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is outside 0..{process_count - 1}")
  return range(num_items * process_index // process_count,
               num_items * (process_index + 1) // process_count)


SEQIO_PREFIX = "seqio:"


def is_task_source(source) -> bool:
  """Whether `source` names a seqio task ('seqio:<task>[:<split>]') rather than a file."""
  return str(source).startswith(SEQIO_PREFIX)


def _task_rows(source: str) -> List[tuple]:
  """(example number, JSON text) for every example of the seqio task `source` names."""
  from teacherlm_jax.data import tasks  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  name, _, split = source[len(SEQIO_PREFIX):].partition(":")
  if name not in seqio.TaskRegistry.names():
    tasks.register_records_tasks()  # vocabulary-free: records_{creak,ecqa,strategyqa}
  try:
    rows = tasks.task_records(name, split or "train")
  except ValueError as e:
    raise InputError(f"{source}: {e}", "bad_source") from None
  return [(number, json.dumps(row, ensure_ascii=False))
          for number, row in enumerate(rows, start=1)]


def read_records(source, *, id_field: Optional[str], required_fields: Sequence[str],
                 answer_field: str = "answer", options_field: Optional[str] = "options",
                 process_index: int = 0, process_count: int = 1, limit: Optional[int] = None,
                 rejects: Optional[List[Reject]] = None,
                 allow_empty: bool = False) -> List[InputRecord]:
  """Reads this process's slice of the input (its non-blank lines split contiguously).

  Args:
    source: a JSONL file, or 'seqio:<task>[:<split>]' (split default 'train') for the examples
      of a registered seqio task, e.g. 'seqio:records_creak' for the CREAK training records
      the student tasks use (`data/tasks.register_records_tasks`). Example numbers then play
      the part of line numbers in errors and rejects.
    id_field: field holding a unique record id; None = the 1-based line number.
    required_fields: fields the prompts need.
    answer_field, options_field: a letter answer must name one of the options.
    process_index, process_count: which contiguous slice to read.
    limit: only the first `limit` records of the input (before slicing).
    rejects: when given, bad records are appended here with their reason instead of raising.
    allow_empty: an input without a single non-blank line is an error unless this is set.

  Raises:
    sources.BadRow naming file, line and field, when `rejects` is None; InputError when the
    input is missing or empty.
  """
  source = str(source)
  if is_task_source(source):
    lines = _task_rows(source)
  else:
    path = files.resolve(source)
    if not path.is_file():
      raise InputError(f"{path}: input file does not exist")
    # Each line decoded on its own: a byte that is not UTF-8 spoils its line only.
    with sources.open_text(path) as f:
      lines = [(number, text) for number, text in enumerate(f, start=1) if text.strip()]
  if not lines and not allow_empty:
    raise InputError(f"{source}: the input holds no records; check the path, or set "
                     "annotate.allow_empty_input=True if an empty input is expected", "empty")
  if limit is not None:
    lines = lines[:limit]
  records, seen = [], {}
  for index in process_slice(len(lines), process_index, process_count):
    number, text = lines[index]
    try:
      record = parse_record(text, source, number, id_field, required_fields,
                            answer_field=answer_field, options_field=options_field)
      if record.id in seen:
        raise sources.BadRow(source, number, id_field or "id",
                             f"repeats the id {record.id!r} of line {seen[record.id]}",
                             "duplicate_id")
    except sources.BadRow as e:
      if rejects is None:
        raise
      rejects.append(Reject.of(e, text))
      continue
    seen[record.id] = number
    record.index = index
    records.append(record)
  return records


def parse_record(text: str, path, line: int, id_field: Optional[str],
                 required_fields: Sequence[str], *, answer_field: str = "answer",
                 options_field: Optional[str] = "options") -> InputRecord:
  """One input line as a record; `sources.BadRow` (file, line, field) when it is not one."""
  fields = sources.parse_json_object(text, path, line)
  for name in required_fields:
    if name not in fields or fields[name] is None:
      raise sources.BadRow(path, line, name, "is missing", "missing_field")
  if options_field:
    sources.check_answer_fits_options(fields, path, line, answer_field, options_field)
  if id_field is None:
    record_id = str(line)
  elif id_field not in fields:
    raise sources.BadRow(path, line, id_field, "(the record id) is missing", "missing_field")
  else:
    record_id = str(fields[id_field])
  return InputRecord(index=-1, line=line, id=record_id, fields=fields)


# ---- atomic files ------------------------------------------------------------------------

def write_atomic(path, text: str):
  """`path` holds the old content or the new, never a part (local disk or object store)."""
  files.write_atomic(path, text)


def to_json(value) -> str:
  """Strict JSON: a NaN or Inf raises here instead of writing a bare `NaN` no parser reads."""
  return json.dumps(value, ensure_ascii=False, sort_keys=True, allow_nan=False)


def _jsonl(records: Sequence[dict]) -> str:
  return "".join(to_json(r) + "\n" for r in records)


def read_jsonl(path) -> List[dict]:
  return [json.loads(line) for line in files.read_text(path).splitlines() if line.strip()]


def read_chunk(chunk) -> List[dict]:
  """A committed chunk's records; a damaged one is an error that says how to recover."""
  records = []
  text = files.read_bytes(chunk).decode("utf-8", errors="surrogateescape")
  for number, line in enumerate(io.StringIO(text, newline=""), start=1):
    if not line.strip():
      continue
    try:
      sources.check_utf8(line, chunk, number)
      record = sources.parse_json_object(line, chunk, number)
      sources.require(record, ("id", "input_index"), chunk, number)
    except sources.BadRow as e:
      raise ValueError(
          f"{e}. Chunks are published whole, so this committed chunk was damaged after it was "
          f"written: delete {chunk} and rerun with --resume to annotate its records again"
          ) from None
    records.append(record)
  return records


# ---- shards ------------------------------------------------------------------------------

def shard_dir(output_dir, process_index: int, process_count: int) -> files.Path:
  return files.resolve(output_dir) / f"shard-{process_index:05d}-of-{process_count:05d}"


def read_manifest(directory) -> Optional[dict]:
  """A shard's manifest (None before its first commit); damaged is an error naming it."""
  path = files.resolve(directory) / MANIFEST
  if not files.exists(path):
    return None
  try:
    manifest = json.loads(files.read_text(path))
    if not isinstance(manifest.get("run"), dict) or not isinstance(manifest.get("chunks"), list):
      raise ValueError("no 'run' settings or 'chunks' list")
    return manifest
  except ValueError as e:
    raise ValueError(f"{path}: damaged ({e}); it records which chunks are committed, so "
                     f"restore it, or delete {files.resolve(directory)} to annotate this "
                     "shard's records again") from None


class ShardWriter:
  """This process's shard: commits chunks (chunk, then the manifest that lists it) and knows
  which ids are committed."""

  def __init__(self, output_dir, process_index: int, process_count: int, run_settings: dict,
               *, resume: bool):
    self.directory = files.makedirs(shard_dir(output_dir, process_index, process_count))
    # As stored (tuples become lists), so settings compare equal to a manifest's.
    run_settings = json.loads(json.dumps(run_settings, sort_keys=True))
    self.run_settings = run_settings
    self.process_index, self.process_count = process_index, process_count
    self._token = uuid.uuid4().hex[:8]  # This writer's chunk names are its own.
    manifest = read_manifest(self.directory)
    self.chunk_info = list(manifest["chunks"]) if manifest else []
    if self.chunk_info and not resume:
      raise FileExistsError(
          f"{self.directory} already holds {len(self.chunk_info)} committed chunks; pass "
          "--resume to continue that run, or choose a new output directory")
    if resume and manifest:
      previous = manifest["run"]
      changed = {k: (previous.get(k), v) for k, v in run_settings.items()
                 if previous.get(k) != v}
      if changed:
        raise ValueError(f"{self.directory / MANIFEST}: cannot resume with different settings "
                         f"(setting: (committed run, now)): {changed}")
    # A committed chunk deleted since (the recovery from a damaged one): its records are
    # annotated again.
    self.chunk_info = [info for info in self.chunk_info
                       if files.exists(self.directory / info["file"])]
    committed = {info["file"] for info in self.chunk_info}
    for stray in files.glob(self.directory / CHUNK_GLOB) + files.glob(self.directory / "*.tmp"):
      if stray.name not in committed:
        files.remove(stray)  # A killed writer's chunk that no manifest committed.
    self.committed_ids = set()
    for info in self.chunk_info:
      self.committed_ids.update(r["id"] for r in read_chunk(self.directory / info["file"]))
    self.resumed_records = len(self.committed_ids)
    self._write_manifest(complete=False, summary=None)

  @property
  def chunks(self) -> List[files.Path]:
    return [self.directory / info["file"] for info in self.chunk_info]

  @staticmethod
  def _info(name: str, records: Sequence[dict]) -> dict:
    return {"file": name, "num_records": len(records),
            "input_indices": [min(r["input_index"] for r in records),
                              max(r["input_index"] for r in records)] if records else None}

  def commit(self, records: Sequence[dict]):
    """Writes one chunk, then the manifest listing it: from then on its records are done."""
    if not records:
      return
    duplicates = [r["id"] for r in records if r["id"] in self.committed_ids]
    if duplicates:
      raise ValueError(f"{self.directory}: ids already committed: {duplicates[:5]}")
    name = f"chunk-{len(self.chunk_info):06d}-{self._token}.jsonl"
    self._write(self.directory / name, _jsonl(records))
    self.chunk_info.append(self._info(name, records))
    self._write_manifest(complete=False, summary=None)  # The commit.
    self.committed_ids.update(r["id"] for r in records)

  def _write(self, path, text: str):
    try:
      write_atomic(path, text)
    except OSError as e:
      full = e.errno in (errno.ENOSPC, errno.EDQUOT)
      raise OSError(e.errno, f"{path}: cannot write ({e.strerror})"
                    + (": the disk is full" if full else "")
                    + f". The {len(self.chunk_info)} chunks committed in {self.directory} are "
                    "whole; free space or fix the directory, then rerun with --resume to "
                    "continue") from e

  def write_rejects(self, rejects: Sequence[Reject]):
    self._write(self.directory / REJECTS, _jsonl([r.to_json() for r in rejects]))

  def finish(self, summary: dict):
    self._write_manifest(complete=True, summary=summary)

  def _write_manifest(self, *, complete: bool, summary: Optional[dict]):
    manifest = {"process_index": self.process_index, "process_count": self.process_count,
                "run": self.run_settings, "complete": complete,
                "num_records": sum(info["num_records"] for info in self.chunk_info),
                "chunks": self.chunk_info, "summary": summary}
    self._write(self.directory / MANIFEST,
                json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False))


def iter_shard_records(directory) -> Iterator[dict]:
  """The committed records of a shard: those of the chunks its manifest lists."""
  manifest = read_manifest(directory) or {"chunks": []}
  for info in manifest["chunks"]:
    yield from read_chunk(files.resolve(directory) / info["file"])


def _shards(output_dir) -> List[files.Path]:
  return files.glob(files.join(output_dir, "shard-*-of-*"))


def wait_for_shards(output_dir, *, timeout_s: float = 0.0, poll_s: float = 2.0) -> None:
  """The barrier before a merge: waits until every process's shard manifest says complete."""

  def missing() -> List[str]:
    shards = _shards(output_dir)
    if not shards:
      return [f"{output_dir}: no shard-*-of-* directories"]
    count = int(shards[0].name.rsplit("-", 1)[1])
    waiting = []
    for index in range(count):
      manifest = read_manifest(shard_dir(output_dir, index, count))
      if not (manifest and manifest["complete"]):
        waiting.append(f"shard {index} of {count}")
    return waiting

  if timeout_s > 0:
    try:
      files.wait_until(lambda: not missing(), timeout_s=timeout_s, poll_s=poll_s,
                       what=f"every annotation shard of {output_dir} to complete")
    except TimeoutError as e:
      raise TimeoutError(f"{e}; still running or killed: {missing()}") from None


def merge(output_dir, merged_path, *, allow_incomplete: bool = False,
          wait_s: float = 0.0) -> int:
  """Concatenates every shard's committed records in input order into one JSONL file; returns
  the count. Waits up to `wait_s` for every shard to complete (the barrier).

  Refuses shards that are missing or unfinished (unless allow_incomplete) and ids that occur
  twice, so a merged file is a complete, exactly-once annotation of the input.
  """
  if wait_s and not allow_incomplete:
    wait_for_shards(output_dir, timeout_s=wait_s)
  shards = _shards(output_dir)
  if not shards:
    raise FileNotFoundError(f"{output_dir}: no shard-*-of-* directories to merge")
  counts = {int(s.name.rsplit("-", 1)[1]) for s in shards}
  if len(counts) != 1:
    raise ValueError(f"{output_dir}: shards of different process counts {sorted(counts)}; "
                     "remove the stale ones")
  (count,) = counts
  present = {int(s.name.split("-")[1]) for s in shards}
  missing = sorted(set(range(count)) - present)
  if missing:
    raise ValueError(f"{output_dir}: shards of processes {missing} (of {count}) are missing")
  records = []
  for shard in shards:
    manifest = read_manifest(shard)
    if manifest is None:
      raise ValueError(f"{shard}: no {MANIFEST}; the process of this shard never committed")
    if not manifest["complete"] and not allow_incomplete:
      raise ValueError(f"{shard / MANIFEST}: the run of this shard has not finished; resume it "
                       "first (or merge with allow_incomplete)")
    records.extend(iter_shard_records(shard))
  records.sort(key=lambda r: r["input_index"])
  seen = set()
  for r in records:
    if r["id"] in seen:
      raise ValueError(f"{output_dir}: id {r['id']!r} occurs in more than one record")
    seen.add(r["id"])
  write_atomic(merged_path, _jsonl(records))
  return len(records)
