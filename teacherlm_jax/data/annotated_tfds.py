"""A TFDS builder over annotation shards, so a finished annotation run loads like any TFDS data.

  builder = annotated_tfds.prepare('creak', '/runs/annotate/creak-*.jsonl', data_dir='/tfds')
  ds = builder.as_dataset(split='train')            # or tfds.load('teacherlm_annotated/creak',
                                                    #   data_dir='/tfds') once prepared

Rows are the annotation engine's JSONL shards (`id` + annotation fields, optionally with the
record's `question`/`options`/`answer`; otherwise joined by id with the dataset's original
records, as `tasks.annotated_records` does). The config name is the dataset; the version is
the builder's. A deterministic `validation_percent` of ids (by hash) forms a 'validation'
split. `register_student_task` renders a prepared dataset in a student format.
"""
from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import seqio
import tensorflow_datasets as tfds

from teacherlm_jax.data import prompts
from teacherlm_jax.data import tasks


class TeacherlmAnnotated(tfds.core.GeneratorBasedBuilder):
  """Annotated training records (TeacherLM fundamentals / chain of thought / common mistakes)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Records plus the three annotation kinds."}
  # One config per dataset the annotation engine reads (the id join needs its records).
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=d) for d in tasks.ORIGINAL_DATASETS]
  # Nothing is downloaded, so there is no checksums file next to the code; locating the code
  # through importlib resources would also need `importlib_resources` installed.
  code_path = None

  def __init__(self, *, shard_pattern: str = "",
               kinds: Sequence[str] = prompts.ANNOTATION_KINDS, validation_percent: int = 0,
               **kwargs):
    """shard_pattern, kinds, validation_percent: only needed to build, not to read."""
    self.shard_pattern = shard_pattern
    self.kinds = tuple(kinds)
    self.validation_percent = validation_percent
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "id": text, "question": text, "options": tfds.features.Sequence(text),
            "answer": text, **{kind: text for kind in prompts.ANNOTATION_KINDS}}),
        supervised_keys=None)

  def _split_generators(self, dl_manager):
    del dl_manager
    if not self.shard_pattern:
      raise ValueError(f"{self.name}/{self.builder_config.name}: no shard_pattern; build with "
                       "annotated_tfds.prepare(dataset, shard_pattern, data_dir)")
    splits = {"train": self._generate_examples(validation=False)}
    if self.validation_percent:
      splits["validation"] = self._generate_examples(validation=True)
    return splits

  def _generate_examples(self, validation: bool):
    for record, texts in tasks.annotated_records(self.builder_config.name,
                                                 self.shard_pattern, self.kinds):
      bucket = int(hashlib.sha256(record["id"].encode("utf-8")).hexdigest(), 16) % 100
      if (bucket < self.validation_percent) != validation:
        continue
      yield record["id"], {
          "id": record["id"], "question": record["question"],
          "options": list(record["options"]), "answer": record["answer"],
          **{kind: texts.get(kind, "") for kind in prompts.ANNOTATION_KINDS}}


def prepare(dataset: str, shard_pattern: str, data_dir: str, *,
            kinds: Sequence[str] = prompts.ANNOTATION_KINDS,
            validation_percent: int = 0) -> TeacherlmAnnotated:
  """Builds (or reuses) `teacherlm_annotated/{dataset}` in `data_dir` from the shards."""
  builder = TeacherlmAnnotated(config=dataset, data_dir=data_dir, shard_pattern=shard_pattern,
                               kinds=kinds, validation_percent=validation_percent)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder


def register_student_task(tfds_name: str, fmt: str, vocabulary: seqio.Vocabulary, *,
                          data_dir: Optional[str] = None, name: Optional[str] = None,
                          seed: int = 0) -> str:
  """An annotated student task over a prepared TFDS dataset (`prepare`), e.g.
  tfds_name='teacherlm_annotated/creak:1.0.0'; splits 'train' and 'validation'."""
  kinds = prompts.annotation_order(fmt)
  name = name or f"student_{tfds_name.split('/')[-1].split(':')[0]}_{fmt}"

  def make(split):
    builder = tfds.builder(tfds_name, data_dir=data_dir)
    for ex in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
      text = lambda value: value.decode("utf-8")
      record = {"id": text(ex["id"]), "question": text(ex["question"]),
                "options": [text(o) for o in ex["options"]], "answer": text(ex["answer"])}
      yield tasks.student_example(record, {k: text(ex[k]) for k in kinds}, fmt, seed)

  source = tasks.generator_source(make, ("train", "validation"), tasks.TRAIN_SIGNATURE)
  return tasks.add_task(name, source, vocabulary, evaluation=False).name
