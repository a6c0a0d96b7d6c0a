"""Loading an HF tokenizer from a local directory (no hub access); every stage loads it here."""
from __future__ import annotations

import pathlib


class TokenizerError(ValueError):
  """A tokenizer directory that cannot be loaded; the message names the directory."""


def load(directory):
  """The HF tokenizer saved in a local directory."""
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise TokenizerError(f"{directory}: tokenizer directory does not exist")
  try:
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
  except (OSError, ValueError) as e:
    raise TokenizerError(f"{directory}: cannot load a tokenizer ({e})") from e
