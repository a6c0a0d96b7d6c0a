"""The vocabulary a checkpoint carries, and whether a vocabulary fits a model.

A pretrained model is only meaningful with the tokenizer it was trained with: every stage
started from a checkpoint (an HF directory or one of ours) tokenises with that checkpoint's
tokenizer, and every checkpoint we write carries the tokenizer of its data beside it
(`save_tokenizer`), so the next stage, annotation, evaluation and `AutoTokenizer` find it.

A vocabulary is named by a spec, as `data.vocab.get_vocabulary` reads it: 'hf:<directory>'
(an HF tokenizer saved there) or 'spm:<model file>' (SentencePiece).
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from typing import Dict, Mapping, Optional, Sequence

import numpy as np

from teacherlm_jax.data.vocab import VocabularyMismatch  # pylint: disable=unused-import
from teacherlm_jax.storage import files

# Files `save_pretrained` writes for a fast tokenizer; either marks a tokenizer directory.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
SPM_FILE = "spm.model"


def tokenizer_spec(directory) -> Optional[str]:
  """The spec of the tokenizer saved beside a checkpoint, or None.

  `directory` is an HF directory, a trainer model_dir or params directory of ours, or one
  checkpoint step inside a model_dir (model_dir/checkpoints/N: its tokenizer lies up there).
  """
  directory = files.resolve(directory)
  is_model_dir = any(files.exists(directory / name)
                     for name in ("config.json", "model_config.json"))
  candidates = [directory] if is_model_dir else [directory, directory.parent,
                                                 directory.parent.parent]
  for candidate in candidates:
    if any(files.exists(candidate / name) for name in HF_TOKENIZER_FILES):
      return f"hf:{candidate}"
    if files.exists(candidate / SPM_FILE):
      return f"spm:{candidate / SPM_FILE}"
  return None


def spec_path(spec: str) -> str:
  """The file or directory a vocabulary spec names (for error messages and copies)."""
  kind, sep, path = spec.partition(":")
  return path if sep and kind in ("hf", "spm") else spec


def save_tokenizer(spec: str, directory) -> None:
  """Saves the vocabulary `spec` beside the checkpoint in `directory`, local or gs:// (process
  0 only)."""
  directory = files.makedirs(directory)
  kind, _, path = spec.partition(":")
  source = files.resolve(path)
  if kind == "spm":
    if source != directory / SPM_FILE:
      files.write_atomic(directory / SPM_FILE, files.read_bytes(source))
    return
  if source == directory:
    return
  from teacherlm_jax.data import hf_tokenizers  # pylint: disable=g-import-not-at-top
  tokenizer = hf_tokenizers.load(files.local_copy(source))
  # save_pretrained writes local files only: staged here, each published whole.
  with tempfile.TemporaryDirectory() as local:
    tokenizer.save_pretrained(local)
    files.upload(local, directory)


def fingerprint(spec: str) -> str:
  """A digest of the vocabulary's contents: equal for a tokenizer and its copies."""
  kind, _, path = spec.partition(":")
  if kind == "spm":
    return hashlib.sha256(files.read_bytes(path)).hexdigest()
  from teacherlm_jax.data import hf_tokenizers  # pylint: disable=g-import-not-at-top
  tokenizer = hf_tokenizers.load(files.local_copy(path))
  contents = [sorted(tokenizer.get_vocab().items()), tokenizer.bos_token_id,
              tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id]
  return hashlib.sha256(json.dumps(contents).encode()).hexdigest()


def check_same(data_spec: str, checkpoint_spec: str, *, data_what: str, checkpoint: str,
               fix: str) -> None:
  """Raises unless the data's vocabulary is the checkpoint's own tokenizer (or a copy)."""
  if data_spec == checkpoint_spec or fingerprint(data_spec) == fingerprint(checkpoint_spec):
    return
  raise VocabularyMismatch(
      f"{data_what} tokenises with {spec_path(data_spec)} but the checkpoint {checkpoint} was "
      f"trained with its own tokenizer {spec_path(checkpoint_spec)}: a pretrained model only "
      f"understands its own token ids. {fix}")


def check_special_ids(tokenizer_source: str, tokenizer_ids: Mapping[str, Optional[int]],
                      model_source: str, model_ids: Mapping[str, Optional[int]]) -> None:
  """Raises unless the tokenizer's special ids ({'eos': id, 'pad': id}) are the model's: a
  model trained to end texts with its eos id stops at no other. (The tokenizer's size is
  checked by `data.vocab.check_fits_model`.)"""
  for name, token_id in tokenizer_ids.items():
    model_id = model_ids.get(name)
    if token_id is not None and model_id is not None and int(token_id) != int(model_id):
      raise VocabularyMismatch(
          f"tokenizer {tokenizer_source} has {name} id {token_id} but model {model_source} has "
          f"{name}_token_id={model_id}; use the tokenizer saved with that model")


def tokenizer_special_ids(vocabulary) -> Dict[str, Optional[int]]:
  """{'eos', 'pad'} ids of a seqio vocabulary or an annotation tokenizer."""
  return {"eos": vocabulary.eos_id, "pad": vocabulary.pad_id}


def model_special_ids(config) -> Dict[str, Optional[int]]:
  """{'eos', 'pad'} ids of a ModelConfig or a config.json / model_config.json mapping."""
  get = config.get if isinstance(config, Mapping) else lambda k: getattr(config, k, None)
  return {"eos": get("eos_token_id"), "pad": get("pad_token_id")}


def check_token_ids(token_ids: Sequence[int] | np.ndarray, vocab_size: int, *,
                    source: str, model_name: str) -> None:
  """Raises if any token id is negative or >= vocab_size (ids are never clamped)."""
  ids = np.asarray(token_ids)
  if ids.size and (ids.max() >= vocab_size or ids.min() < 0):
    bad = int(ids.max()) if ids.max() >= vocab_size else int(ids.min())
    raise VocabularyMismatch(
        f"{source}: token id {bad} is outside the vocabulary of the model {model_name} "
        f"(vocab_size={vocab_size}); the data was tokenised with another tokenizer")


def vocabulary_spec(vocabulary) -> Optional[str]:
  """The spec of a seqio vocabulary read from a file ('hf:' or 'spm:'), None for others (e.g.
  the byte vocabulary, which no checkpoint carries)."""
  if getattr(vocabulary, "tokenizer_dir", None):
    return f"hf:{vocabulary.tokenizer_dir}"
  if getattr(vocabulary, "sentencepiece_model_file", None):
    return f"spm:{vocabulary.sentencepiece_model_file}"
  return None
