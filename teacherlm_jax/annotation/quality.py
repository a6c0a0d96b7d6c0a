"""Quality checks on generated annotations (the paper filtered nothing).

Each annotation gets a list of flags:
  empty         no text after the trigger;
  hit_limit     stopped at max_new_tokens instead of EOS (likely cut mid-sentence);
  looping       some word n-gram repeats more than `max_ngram_repeats` times;
  wrong_answer  says "the answer is (X)" with X different from the gold letter;
  non_finite    the teacher's token log-probs hold NaN or Inf (a broken model), written as null.
`action='flag'` keeps flagged annotations (the flags are written next to them);
`action='drop'` replaces their text by null. With several samples per prompt the most
confident (highest mean token log-prob) sample without flags is kept, else the most confident.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import List, Optional, Sequence, Tuple

import gin

FLAGS = ("empty", "hit_limit", "looping", "wrong_answer", "non_finite")

_ANSWER_RE = re.compile(r"answer is\s*:?\s*\(?\s*([A-J])\s*\)", re.IGNORECASE)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class QualityConfig:
  """Thresholds of the checks (all gin-configurable).

  Attributes:
    action: 'flag' (keep, annotate the flags) or 'drop' (flagged text becomes null).
    ngram_size: words per n-gram for the looping check.
    max_ngram_repeats: an n-gram occurring more often than this is a loop.
    flag_hit_limit: whether hitting max_new_tokens is a flag.
    answer_check_kinds: kinds whose stated answer must equal the gold letter (common mistakes
      discuss wrong options on purpose, so they are not checked by default).
  """
  action: str = "flag"
  ngram_size: int = 4
  max_ngram_repeats: int = 3
  flag_hit_limit: bool = True
  answer_check_kinds: Tuple[str, ...] = ("chain_of_thought", "fundamentals")

  def __post_init__(self):
    if self.action not in ("flag", "drop"):
      raise ValueError(f"QualityConfig.action={self.action!r}: expected 'flag' or 'drop'")
    if self.ngram_size < 1 or self.max_ngram_repeats < 1:
      raise ValueError("QualityConfig.ngram_size and max_ngram_repeats must be >= 1")


def is_looping(text: str, ngram_size: int, max_repeats: int) -> bool:
  words = text.split()
  grams = collections.Counter(tuple(words[i:i + ngram_size])
                              for i in range(len(words) - ngram_size + 1))
  return bool(grams) and max(grams.values()) > max_repeats


def stated_answers(text: str) -> List[str]:
  """Option letters the text states as the answer ('... the answer is (B)')."""
  return [m.upper() for m in _ANSWER_RE.findall(text)]


def check(text: str, *, kind: str, stopped_at_eos: bool, gold_letter: Optional[str],
          config: QualityConfig, mean_logprob: float = 0.0) -> List[str]:
  """The flags (subset of FLAGS, in that order) of one annotation."""
  flags = []
  if not text.strip():
    flags.append("empty")
  if config.flag_hit_limit and not stopped_at_eos:
    flags.append("hit_limit")
  if is_looping(text, config.ngram_size, config.max_ngram_repeats):
    flags.append("looping")
  if (gold_letter and kind in config.answer_check_kinds
      and any(letter != gold_letter for letter in stated_answers(text))):
    flags.append("wrong_answer")
  if not math.isfinite(mean_logprob):
    flags.append("non_finite")
  return flags


def pick_sample(flags_per_sample: Sequence[Sequence[str]],
                mean_logprobs: Sequence[float]) -> int:
  """Index of the most confident sample among those without flags (else among all)."""
  clean = [i for i, flags in enumerate(flags_per_sample) if not flags]
  candidates = clean or list(range(len(flags_per_sample)))
  # NaN compares false both ways, which would make the choice depend on sample order.
  confidence = [p if math.isfinite(p) else -math.inf for p in mean_logprobs]
  return max(candidates, key=lambda i: confidence[i])
