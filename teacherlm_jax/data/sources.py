"""Readers for the raw datasets: JSONL, MMLU CSV, FLAN CoT TSV, HF `save_to_disk` arrow folders.

Each reader yields plain dicts and refuses bad input with `path:line: field ...` errors. With
`skips=SkipLog()` a bad row is counted (per file and reason) and skipped instead; the caller
logs `skips.summary()` and puts the counts in its report. Nothing is dropped silently. Text
files are decoded line by line (`open_text`), so a stray byte that is not UTF-8 is one bad row,
not the end of the file.

The data directory comes from `set_data_dir` (scripts' `--data_dir` flag), else the environment
variable TEACHERLM_DATA_DIR, else `../shared/data` next to the repository. It is resolved when a
dataset is read, never at import.
"""
from __future__ import annotations

import collections
import contextlib
import csv
import json
import os
import pathlib
from typing import Any, Dict, Iterator, Optional, Sequence

from absl import logging

from teacherlm_jax.storage import files

_DATA_DIR: Optional[str] = None
_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

MMLU_NUM_OPTIONS = 4


def set_data_dir(path: Optional[str]) -> None:
  """Overrides TEACHERLM_DATA_DIR for this process (None restores the default)."""
  global _DATA_DIR
  _DATA_DIR = None if path is None else str(path)


@contextlib.contextmanager
def using_data_dir(path: Optional[str]):
  """`set_data_dir(path)` for the body only; the previous setting comes back after it."""
  global _DATA_DIR
  previous = _DATA_DIR
  set_data_dir(path)
  try:
    yield
  finally:
    _DATA_DIR = previous


def data_dir() -> files.Path:
  """The datasets root: local or gs://."""
  if _DATA_DIR is not None:
    return files.resolve(_DATA_DIR)
  return files.resolve(os.environ.get("TEACHERLM_DATA_DIR",
                                      _REPO_ROOT.parent / "shared" / "data"))


def data_path(*parts: str) -> files.Path:
  """A path inside the data directory; a clear error when it does not exist."""
  path = data_dir().joinpath(*parts)
  if not path.exists():
    raise FileNotFoundError(
        f"{path} does not exist (data directory {data_dir()}; set --data_dir or "
        "TEACHERLM_DATA_DIR)")
  return path


class BadRow(ValueError):
  """A row that cannot be read: carries file, line, field and a short `category` (e.g.
  'not_json', 'missing_field') that reject counts are keyed by."""

  def __init__(self, path, line: int, field: Optional[str], reason: str,
               category: str = "bad_row"):
    self.path, self.line, self.field, self.reason = str(path), line, field, reason
    self.category = category
    where = f"{path}:{line}: "
    super().__init__(where + (f"field {field!r} {reason}" if field else reason))


class SkipLog:
  """Counts rows skipped in skip mode, by file and reason."""

  def __init__(self):
    self.counts: Dict[tuple, int] = collections.Counter()
    self.examples: Dict[tuple, str] = {}

  def add(self, error: BadRow) -> None:
    key = (error.path, error.field or "", error.reason)
    self.counts[key] += 1
    self.examples.setdefault(key, str(error))
    logging.warning("skipping bad row: %s", error)

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def by_file(self) -> Dict[str, int]:
    out = collections.Counter()
    for (path, _, _), n in self.counts.items():
      out[path] += n
    return dict(out)

  def summary(self) -> str:
    if not self.total:
      return "no rows skipped"
    lines = [f"{self.total} rows skipped:"]
    for key, n in sorted(self.counts.items()):
      lines.append(f"  {n} x {self.examples[key]}")
    return "\n".join(lines)


def _handle(error: BadRow, skips: Optional[SkipLog]) -> None:
  if skips is None:
    raise error
  skips.add(error)


def require(row: Dict[str, Any], fields: Sequence[str], path, line: int) -> None:
  """Raises BadRow for the first missing or empty field."""
  for field in fields:
    value = row.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
      raise BadRow(path, line, field, "is missing" if value is None else "is empty",
                   "missing_field" if value is None else "empty_field")


def open_text(path):
  """A text file whose bytes that are not UTF-8 survive as lone surrogates, one line at a
  time, so `check_utf8` can reject the line that holds them and reading goes on."""
  return files.open_text(path, errors="surrogateescape")


def check_utf8(text: str, path, line: int) -> None:
  """Raises BadRow naming the first byte of `text` (read by `open_text`) that is not UTF-8."""
  for column, char in enumerate(text, start=1):
    if "\udc80" <= char <= "\udcff":
      raise BadRow(path, line, None, f"is not valid UTF-8 (byte 0x{ord(char) - 0xdc00:02x} at "
                   f"column {column}); re-encode the file as UTF-8", "not_utf8")


def parse_json_object(text: str, path, line: int) -> Dict[str, Any]:
  """One JSONL line (from `open_text`) as a dict, or BadRow saying where it breaks."""
  check_utf8(text, path, line)
  text = text.rstrip("\r\n")
  try:
    row = json.loads(text)
  except json.JSONDecodeError as e:
    # The column of the line itself; at the end of the line the record was cut short.
    where = "at the end of the line" if e.pos >= len(text.rstrip()) else f"at column {e.pos + 1}"
    raise BadRow(path, line, None, f"is not JSON ({e.msg} {where}: "
                 f"{text[max(0, e.pos - 20):e.pos + 20]!r})", "not_json") from None
  if not isinstance(row, dict):
    raise BadRow(path, line, None, f"is a JSON {type(row).__name__}, not an object", "not_json")
  return row


def check_answer_fits_options(row: Dict[str, Any], path, line: int, answer_field: str = "answer",
                              options_field: str = "options") -> None:
  """A letter answer ('B' or '(B)') must name one of the row's options when it has an options
  field; a row without one may carry its options in the question text (CREAK, ECQA)."""
  if options_field not in row or row[options_field] is None:
    return
  options = row[options_field]
  if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
    raise BadRow(path, line, options_field, f"is {options!r}, not a list of strings",
                 "bad_options")
  answer = str(row.get(answer_field, "")).strip()
  letter = answer[1:-1] if len(answer) == 3 and answer[0] + answer[2] == "()" else answer
  if len(letter) != 1 or not letter.isalpha() or not letter.isupper():
    return  # An open answer (text, a number): nothing to match against the options.
  if not options:
    raise BadRow(path, line, answer_field, f"is the letter {answer!r} but field "
                 f"{options_field!r} is empty", "answer_outside_options")
  index = ord(letter) - ord("A")
  if index >= len(options):
    last = chr(ord("A") + len(options) - 1)
    raise BadRow(path, line, answer_field, f"is {answer!r} but there are only {len(options)} "
                 f"options (A-{last})", "answer_outside_options")


def read_jsonl(path, required: Sequence[str] = (), skips: Optional[SkipLog] = None
               ) -> Iterator[Dict[str, Any]]:
  """One JSON object per line; each dict gets `_line` (1-based) for later error messages."""
  with open_text(path) as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = parse_json_object(line, path, line_no)
        require(row, required, path, line_no)
      except BadRow as e:
        _handle(e, skips)
        continue
      row["_line"] = line_no
      yield row


def _looks_like_answer(value: str) -> bool:
  value = value.strip()
  return value.isdigit() or (len(value) == 1 and value in "ABCDEFGH")


def _mmlu_answer(value: str, path, line: int) -> int:
  value = value.strip()
  if value.isdigit():
    answer = int(value)
  elif len(value) == 1 and value in "ABCDEFGH":
    answer = "ABCDEFGH".index(value)
  else:
    raise BadRow(path, line, "answer", f"is {value!r}, not an option index 0-3 or letter A-D",
                 "bad_answer")
  if not 0 <= answer < MMLU_NUM_OPTIONS:
    raise BadRow(path, line, "answer", f"is {value!r}, outside the {MMLU_NUM_OPTIONS} options",
                 "answer_outside_options")
  return answer


def _mmlu_short_row(values: Sequence[str], fields: Sequence[str], path, line: int) -> BadRow:
  """The field a row with too few columns lacks: an option when its last value is an answer
  (a question with 3 options), else the first column past its end."""
  num_options = len(values) - 2
  if num_options >= 1 and _looks_like_answer(values[-1]):
    return BadRow(path, line, f"choice{num_options}",
                  f"is missing: the row has {num_options} options before its answer "
                  f"{values[-1].strip()!r}, expected {MMLU_NUM_OPTIONS}", "missing_field")
  missing = fields[len(values)] if values else "question"
  return BadRow(path, line, missing, f"is missing ({len(values)} of {len(fields)} columns)",
                "missing_field")


def read_mmlu_csv(path, skips: Optional[SkipLog] = None) -> Iterator[Dict[str, Any]]:
  """MMLU `<subject>_<split>.csv`: header `question,choice0..3,answer` (answer 0-3), or the
  original headerless layout `question,A,B,C,D,letter`.

  Yields {'subject', 'question', 'options' (4 strings), 'answer' (int), '_line'}.
  """
  path = files.resolve(path)
  subject = path.stem.rsplit("_", 1)[0]
  fields = ["question"] + [f"choice{i}" for i in range(MMLU_NUM_OPTIONS)] + ["answer"]
  with open_text(path) as f:
    reader = csv.reader(f)
    first = True
    for values in reader:
      line = reader.line_num
      if first:
        first = False
        if [v.strip() for v in values] == fields:
          continue
      try:
        check_utf8(",".join(values), path, line)
        if len(values) < len(fields):
          raise _mmlu_short_row(values, fields, path, line)
        if len(values) > len(fields):
          raise BadRow(path, line, None, f"has {len(values)} columns, expected {len(fields)}",
                       "bad_columns")
        question, options = values[0], values[1:1 + MMLU_NUM_OPTIONS]
        if not question.strip():
          raise BadRow(path, line, "question", "is empty")
        for i, option in enumerate(options):
          if not option.strip():
            raise BadRow(path, line, f"choice{i}", "is empty (missing option)")
        answer = _mmlu_answer(values[-1], path, line)
      except BadRow as e:
        _handle(e, skips)
        continue
      yield {"subject": subject, "question": question, "options": list(options),
             "answer": answer, "_line": line}


def read_flan_tsv(path, skips: Optional[SkipLog] = None) -> Iterator[Dict[str, Any]]:
  """FLAN CoT `<name>_train.tsv`: question, answer, rationale; literal '\\n' become newlines.

  Yields {'question', 'answer', 'rationale', '_line'}.
  """
  with open_text(path) as f:
    for line_no, line in enumerate(f, start=1):
      line = line.rstrip("\r\n")
      if not line:
        continue
      try:
        check_utf8(line, path, line_no)
        values = line.split("\t")
        names = ("question", "answer", "rationale")
        if len(values) != 3:
          field = names[len(values)] if len(values) < 3 else None
          raise BadRow(path, line_no, field,
                       f"is missing ({len(values)} of 3 tab-separated columns)" if field
                       else f"has {len(values)} tab-separated columns, expected 3")
        row = {name: value.replace("\\n", "\n") for name, value in zip(names, values)}
        require(row, names, path, line_no)
      except BadRow as e:
        _handle(e, skips)
        continue
      row["_line"] = line_no
      yield row


def read_arrow_dir(folder) -> Iterator[Dict[str, Any]]:
  """Rows of an HF `datasets.save_to_disk` folder (arrow IPC stream files), via pyarrow.

  The files are taken from `state.json`'s `_data_files` in order (else every *.arrow, sorted);
  `_line` is the 1-based row number across the files.
  """
  import pyarrow as pa  # pylint: disable=g-import-not-at-top

  folder = files.resolve(folder)
  state = folder / "state.json"
  if files.exists(state):
    arrow_files = [folder / entry["filename"]
                   for entry in json.loads(files.read_text(state))["_data_files"]]
  else:
    arrow_files = files.glob(folder / "*.arrow")
  if not arrow_files:
    raise FileNotFoundError(f"{folder}: no arrow files (expected an HF save_to_disk folder)")
  row_no = 0
  for file in arrow_files:
    with (pa.BufferReader(files.read_bytes(file)) if files.is_uri(file)
          else pa.memory_map(str(file))) as source:
      try:
        table = pa.ipc.open_stream(source).read_all()
      except pa.ArrowInvalid:
        table = pa.ipc.open_file(source).read_all()
    for row in table.to_pylist():
      row_no += 1
      row["_line"] = row_no
      yield row


def read_lines(path) -> list:
  """Plain text, one item per line (e.g. ECQA author-split ids)."""
  with files.open_text(path) as f:
    return [line.strip() for line in f if line.strip()]
