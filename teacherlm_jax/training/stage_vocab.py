"""A training stage's vocabulary: the checkpoint it starts from decides it.

A stage started from a pretrained checkpoint (`ModelSettings.init_hf_checkpoint` or
`init_checkpoint`) tokenises with that checkpoint's tokenizer: data tokenised with any other
vocabulary is an error naming both, unless `ModelSettings.reinit_embeddings` asks for fresh
embeddings of the data's vocabulary. Every stage saves its data's tokenizer beside its
checkpoints, so the next stage, annotation and evaluation take it from there.
"""
from __future__ import annotations

from typing import Optional

from teacherlm_jax.models import checkpoint_vocab
from teacherlm_jax.storage import files
from teacherlm_jax.models.config import ModelConfig


def task_vocabulary(task_name: str):
  """The vocabulary a registered seqio task or mixture tokenises its targets with."""
  import seqio  # pylint: disable=g-import-not-at-top
  return seqio.get_mixture_or_task(task_name).output_features["targets"].vocabulary


def with_vocabulary(model_config: ModelConfig, vocabulary) -> ModelConfig:
  """The architecture with a fresh embedding for `vocabulary` (its size and special ids)."""
  eos = vocabulary.eos_id
  bos = getattr(vocabulary, "bos_id", None)
  return model_config.replace(vocab_size=int(vocabulary.vocab_size), eos_token_id=eos,
                              pad_token_id=vocabulary.pad_id,
                              bos_token_id=eos if bos is None else bos)


def with_fresh_embeddings(pretrained: dict, fresh: dict) -> dict:
  """The pretrained parameters, except those whose shape changed with the vocabulary (the
  token embedding, an untied head), which keep their fresh initialisation."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda p, f: p if p.shape == f.shape else f, pretrained, fresh)


def check_overrides(settings, model_config: ModelConfig, source: str) -> None:
  """A vocab_size override that contradicts the checkpoint is an error, never ignored."""
  wanted = dict(settings.overrides).get("vocab_size")
  if wanted is not None and int(wanted) != model_config.vocab_size and not (
      settings.reinit_embeddings):
    raise checkpoint_vocab.VocabularyMismatch(
        f"ModelSettings.overrides sets vocab_size={wanted} but the checkpoint {source} has "
        f"vocab_size={model_config.vocab_size}; drop the override to train with the "
        "checkpoint's tokenizer, or set ModelSettings.reinit_embeddings=True to replace its "
        "embeddings")


def check_and_save(settings, model_config: ModelConfig, vocabulary, model_dir: str, *,
                   resuming: bool, task_name: str, write: bool) -> Optional[str]:
  """Checks the data's vocabulary against the starting checkpoint and the model, and saves it
  beside this stage's checkpoints; returns its spec (None when it has no file)."""
  data_spec = checkpoint_vocab.vocabulary_spec(vocabulary)
  source = settings.init_source
  model_name = source or f"{model_dir} (ModelSettings.preset={settings.preset!r})"
  if source and not resuming and not settings.reinit_embeddings:
    source_spec = checkpoint_vocab.tokenizer_spec(source)
    fix = ("Tokenise the data with the checkpoint's tokenizer (e.g. "
           f"register_all.vocabulary = @get_vocabulary() with get_vocabulary.spec = "
           f"'hf:{files.resolve(source)}'), or set ModelSettings.reinit_embeddings=True to train "
           "new embeddings for the data's vocabulary")
    if source_spec is None:
      raise checkpoint_vocab.VocabularyMismatch(
          f"the checkpoint {source} has no tokenizer beside it (tokenizer.json or spm.model), "
          f"so the vocabulary of train task {task_name!r} cannot be checked against it; save "
          "the checkpoint's tokenizer into that directory")
    if data_spec is None:
      raise checkpoint_vocab.VocabularyMismatch(
          f"train task {task_name!r} tokenises with {vocabulary!r}, not the tokenizer "
          f"{checkpoint_vocab.spec_path(source_spec)} of the checkpoint {source}. {fix}")
    checkpoint_vocab.check_same(data_spec, source_spec, data_what=f"train task {task_name!r}",
                                checkpoint=source, fix=fix)
  # Its size is checked by train_data.check_vocabulary; a pretrained model's special ids must
  # be the data's (random weights learn whatever ids the data has).
  if source:
    checkpoint_vocab.check_special_ids(
        str(checkpoint_vocab.spec_path(data_spec)) if data_spec else repr(vocabulary),
        checkpoint_vocab.tokenizer_special_ids(vocabulary), model_name,
        checkpoint_vocab.model_special_ids(model_config))
  if write and data_spec is not None:
    checkpoint_vocab.save_tokenizer(data_spec, model_dir)
  return data_spec


def data_vocabulary(settings):
  """The vocabulary this stage's data must be tokenised with: the starting checkpoint's
  tokenizer; for random weights or new embeddings, `get_vocabulary.spec` from gin."""
  from teacherlm_jax.data import vocab  # pylint: disable=g-import-not-at-top
  source = settings.init_source
  spec = checkpoint_vocab.tokenizer_spec(source) if source else None
  if spec is None or settings.reinit_embeddings:
    try:
      return vocab.get_vocabulary()
    except TypeError as e:  # gin.REQUIRED left unbound.
      why = (f"the checkpoint {source} carries no tokenizer" if source
             else "the model starts from random weights")
      raise ValueError(f"no vocabulary for the data: {why}; bind get_vocabulary.spec = "
                       "'hf:<dir>' or 'spm:<model>' in gin") from e
  return vocab.get_vocabulary(spec)
