"""Vocabularies for seqio tasks: SentencePiece models and HF tokenizers from a local directory.

`HFTokenizerVocabulary` wraps the tokenizer saved next to an HF checkpoint (BLOOM, OPT, ...)
so a converted checkpoint tokenises exactly as in `transformers`: `encode` is
`tokenizer.encode(text, add_special_tokens=False)` (what the reference evaluation harness does),
and the TF path calls the same tokenizer through `tf.numpy_function`.

`get_vocabulary(spec)` is the one gin-configurable entry point: 'hf:<dir>' or 'spm:<model>'.
"""
from __future__ import annotations

import os
import pathlib
import tempfile
from typing import Iterable, List, Mapping, Optional, Sequence

import gin
import numpy as np
import seqio
import tensorflow as tf

from teacherlm_jax.data import hf_tokenizers
from teacherlm_jax.storage import files


def sentencepiece_vocabulary(model_path: str, extra_ids: int = 0) -> seqio.SentencePieceVocabulary:
  """A seqio SentencePiece vocabulary (the model file is read lazily, on first use)."""
  path = pathlib.Path(model_path)
  if not path.exists():
    raise FileNotFoundError(f"{path}: SentencePiece model file does not exist")
  return seqio.SentencePieceVocabulary(str(path), extra_ids=extra_ids)


class HFTokenizerVocabulary(seqio.Vocabulary):
  """A seqio vocabulary over an HF tokenizer saved in a local directory.

  The tokenizer loads on first use, so building tasks with this vocabulary is cheap. Ids are the
  tokenizer's own (no reserved PAD=0 shift): `pad_id` is the tokenizer's pad token, which is
  what HF checkpoints' embeddings expect.
  """

  def __init__(self, tokenizer_dir: str, extra_ids: int = 0):
    self._tokenizer_dir = str(tokenizer_dir)
    self._tokenizer = None
    super().__init__(extra_ids=extra_ids)

  @property
  def tokenizer_dir(self) -> str:
    return self._tokenizer_dir

  @property
  def tokenizer(self):
    if self._tokenizer is None:
      self._tokenizer = hf_tokenizers.load(self._tokenizer_dir)
    return self._tokenizer

  @property
  def eos_id(self) -> Optional[int]:
    return self.tokenizer.eos_token_id

  @property
  def bos_id(self) -> Optional[int]:
    return self.tokenizer.bos_token_id

  @property
  def pad_id(self) -> int:
    pad = self.tokenizer.pad_token_id
    return pad if pad is not None else self.tokenizer.eos_token_id

  @property
  def unk_id(self) -> Optional[int]:
    return self.tokenizer.unk_token_id

  @property
  def _base_vocab_size(self) -> int:
    return len(self.tokenizer)

  def _encode(self, s: str) -> Sequence[int]:
    return self.tokenizer.encode(s, add_special_tokens=False)

  def encode_batch(self, texts: Sequence[str]) -> list:
    """Encodes many strings in one (fast, parallel) tokenizer call."""
    return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

  def _decode(self, ids: Iterable[int]) -> str:
    return self.tokenizer.decode(list(ids), skip_special_tokens=False)

  def encode_prompt(self, text: str, add_special_tokens: bool = True) -> List[int]:
    """`text` as `tokenizer(text)` tokenises a prompt before `generate` (the reference's
    annotation: BLOOM adds nothing, OPT prepends its BOS)."""
    return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

  def decode_text(self, ids: Iterable[int]) -> str:
    """`ids` as text with every special token left out (what an annotation keeps)."""
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    # Load in this (tracing) thread: a first `transformers` import inside tf.data's parallel
    # py-function threads races on the lazy module and can fail or deadlock.
    _ = self.tokenizer

    def encode(text):
      return np.asarray(self._encode(text.decode("utf-8")), np.int32)
    ids = tf.numpy_function(encode, [s], tf.int32, stateful=False)
    ids.set_shape([None])
    return ids

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    _ = self.tokenizer  # see _encode_tf

    def decode(batch):
      batch = np.asarray(batch)
      flat = batch.reshape(-1, batch.shape[-1]) if batch.ndim else batch.reshape(1, 1)
      pad = self.pad_id
      texts = [self._decode([int(i) for i in row if i != pad]).encode("utf-8") for row in flat]
      return np.asarray(texts, dtype=object).reshape(batch.shape[:-1] if batch.ndim else ())
    out = tf.numpy_function(decode, [ids], tf.string, stateful=False)
    out.set_shape(ids.shape[:-1])
    return out

  def __eq__(self, other) -> bool:
    if not isinstance(other, HFTokenizerVocabulary):
      return False
    return (pathlib.Path(self._tokenizer_dir).resolve() == pathlib.Path(other._tokenizer_dir).resolve()
            and self.extra_ids == other.extra_ids)

  def __hash__(self) -> int:
    return hash((str(pathlib.Path(self._tokenizer_dir).resolve()), self.extra_ids))

  def __repr__(self) -> str:
    return f"HFTokenizerVocabulary({self._tokenizer_dir!r})"


_VOCABULARIES = {}


@gin.configurable
def get_vocabulary(spec: str = gin.REQUIRED) -> seqio.Vocabulary:
  """'hf:<tokenizer dir>' or 'spm:<sentencepiece .model>' -> a seqio vocabulary (cached)."""
  if spec not in _VOCABULARIES:
    kind, _, path = spec.partition(":")
    # Tokenizer libraries open local files only: a gs:// one is read through a local copy.
    if kind == "hf" and path:
      _VOCABULARIES[spec] = HFTokenizerVocabulary(files.local_copy(path))
    elif kind == "spm" and path:
      _VOCABULARIES[spec] = sentencepiece_vocabulary(files.local_copy(path))
    else:
      raise ValueError(
          f"vocabulary spec {spec!r}: expected 'hf:<tokenizer dir>' or 'spm:<model file>'")
  return _VOCABULARIES[spec]


# BLOOM's special-token layout (unk 0, bos 1, eos 2, pad 3), which the tiny-bloom preset uses.
BPE_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
# Special tokens in id order, and the bos/eos/pad/unk tokens, of each family's tokenizer: OPT's
# GPT-2 vocabulary starts <s> 0, <pad> 1, </s> 2 (its bos and eos), <unk> 3.
BPE_LAYOUTS = {
    "bloom": (BPE_SPECIAL_TOKENS, dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                       pad_token="<pad>")),
    "opt": (("<s>", "<pad>", "</s>", "<unk>"), dict(unk_token="<unk>", bos_token="</s>",
                                                    eos_token="</s>", pad_token="<pad>")),
}


def build_bpe_tokenizer(texts: Iterable[str], vocab_size: int, directory,
                        layout: str = "bloom") -> pathlib.Path:
  """Trains a byte-level BPE tokenizer (BLOOM/OPT style, special ids as `layout`'s) on
  `texts` and saves it as an HF tokenizer directory; for tiny models and tests, where no
  pretrained tokenizer is at hand."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(BPE_LAYOUTS[layout][0]),
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **BPE_LAYOUTS[layout][1])
  directory = pathlib.Path(directory)
  fast.save_pretrained(str(directory))
  return directory


def train_sentencepiece(texts: Iterable[str], model_prefix: str, vocab_size: int,
                        model_type: str = "unigram", **trainer_options) -> str:
  """Trains `model_prefix`.model on `texts` with seqio's id layout (pad 0, eos 1, unk 2, no
  bos), so `sentencepiece_vocabulary(path)` reads it directly; returns the model path.

  `trainer_options` go to `SentencePieceTrainer.train` (e.g. `user_defined_symbols`).
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as local:
    # SentencePiece writes local files only; the file layer puts them where asked (or gs://).
    local_prefix = os.path.join(local, "spm")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=local_prefix, vocab_size=vocab_size,
        model_type=model_type, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        character_coverage=1.0, hard_vocab_limit=False, minloglevel=2, **trainer_options)
    for suffix in (".model", ".vocab"):
      files.upload(local_prefix + suffix, f"{model_prefix}{suffix}")
  return f"{model_prefix}.model"


class VocabularyMismatch(ValueError):
  """A tokenizer whose ids do not all index the model's embedding; names both files."""


def vocabulary_source(vocabulary) -> str:
  """The file or directory a vocabulary was read from (for error messages)."""
  for attribute in ("tokenizer_dir", "sentencepiece_model_file"):
    source = getattr(vocabulary, attribute, None)
    if source:
      return str(source)
  return repr(vocabulary)


def check_fits_model(tokenizer_size: int, tokenizer_source: str, model_vocab_size: int,
                     model_source: str, special_ids: Mapping[str, Optional[int]] = None) -> None:
  """Raises VocabularyMismatch unless every id of the tokenizer (its size, and its special
  tokens) is below the model's vocab_size: a larger id reads past the embedding table, which
  on an accelerator yields garbage rather than an error."""
  fix = ("use the tokenizer saved with that model, or a model whose vocab_size covers this "
         "tokenizer")
  if tokenizer_size > model_vocab_size:
    raise VocabularyMismatch(
        f"tokenizer {tokenizer_source} has {tokenizer_size} tokens but model {model_source} has "
        f"vocab_size={model_vocab_size}: ids {model_vocab_size}..{tokenizer_size - 1} have no "
        f"embedding; {fix}")
  for name, token_id in (special_ids or {}).items():
    if token_id is not None and not 0 <= token_id < model_vocab_size:
      raise VocabularyMismatch(
          f"tokenizer {tokenizer_source}: {name} id {token_id} is outside model {model_source}'s "
          f"vocab_size={model_vocab_size}; {fix}")


def check_ids_fit_model(ids: Sequence[int], model_vocab_size: int, where: str,
                        tokenizer_source: str, model_source: str) -> None:
  """Raises VocabularyMismatch when a tokenised text holds an id >= the model's vocab_size."""
  if len(ids) and max(ids) >= model_vocab_size:
    raise VocabularyMismatch(
        f"{where}: tokenizer {tokenizer_source} gave id {max(ids)}, outside model "
        f"{model_source}'s vocab_size={model_vocab_size}")
