"""Batches for the trainer from seqio tasks and mixtures, at any step.

`SeqioBatches` turns a task or mixture into packed global batches of numpy arrays
{'tokens', 'targets', 'loss_weights', 'segment_ids', 'positions'} (each B x L). Batch number n
is a pure function of (task, split, seed, n), so a resumed run sees exactly the batches an
uninterrupted run would. Resume is O(1) in the step: the iterator's `state()` (tf.data's own
iterator checkpoint: shuffle buffers, mixture sampler, packer) is saved with each checkpoint and
restored, instead of replaying every batch before it. A pipeline with Python state that tf.data
cannot save (e.g. an HF tokenizer's numpy_function) has no state and is replayed.

Tasks with an 'inputs' feature and a loss on targets only go through
`seqio.PrefixLMFeatureConverter` (inputs then targets in one causal sequence, `seq_len` split
in half between them). With a loss on every token (students, as the reference trains them)
inputs and targets are one text of which the last `seq_len` tokens are kept
(`TailFeatureConverter`, the reference's truncation); tasks with only 'targets' go through
`seqio.DecoderFeatureConverter` (every token).

Input sharding across processes:
  * 'global' (default): every process builds the same global batch and keeps its own rows.
    The batches are then identical for any process count (what the multi-host tests check).
  * 'per_process': each process reads `seqio.ShardInfo(process_index, process_count)` of the
    data and builds only its rows (scales to large inputs; batches depend on the process count).

`register_flan_cot_bytes_task` registers the data tasks' FLAN CoT teacher examples with a byte
vocabulary (no trained vocabulary needed) for CPU tests and the tiny gin configs; real stages use
`teacherlm_jax.data` tasks with the model's vocabulary.
"""
from __future__ import annotations

import functools
import json
from typing import Dict, Mapping, Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

LOSS_ON = ("targets", "all")
INPUT_SHARDING = ("global", "per_process")

_RENAMES = {
    "decoder_input_tokens": "tokens",
    "decoder_target_tokens": "targets",
    "decoder_loss_weights": "loss_weights",
    "decoder_segment_ids": "segment_ids",
    "decoder_positions": "positions",
}


# Feature length that trims nothing: the tail converter cuts the joined text itself.
_UNTRIMMED = 1 << 30


class TailFeatureConverter(seqio.DecoderFeatureConverter):
  """Inputs + targets as one text, its last `seq_len` tokens kept, every token a target."""

  def __init__(self, seq_len: int, pack: bool = True):
    super().__init__(pack=pack)
    self.seq_len = seq_len

  def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]):
    del task_feature_lengths  # Untrimmed: the cut happens here, after joining.
    seq_len = self.seq_len

    def join(example):
      text = tf.concat([example["inputs"], example["targets"]], axis=0)[-seq_len:]
      return {"targets": text}
    return super().__call__(ds.map(join, num_parallel_calls=tf.data.AUTOTUNE),
                            {"targets": seq_len})


def _tail(task_or_mixture, loss_on: str) -> bool:
  return loss_on == "all" and "inputs" in task_or_mixture.output_features


def feature_converter(task_or_mixture, loss_on: str = "targets", pack: bool = True,
                      seq_len: int = 0) -> seqio.FeatureConverter:
  if loss_on not in LOSS_ON:
    raise ValueError(f"loss_on={loss_on!r}: expected one of {LOSS_ON}")
  if _tail(task_or_mixture, loss_on) and seq_len:
    return TailFeatureConverter(seq_len, pack=pack)
  if "inputs" in task_or_mixture.output_features:
    return seqio.PrefixLMFeatureConverter(loss_on_targets_only=loss_on == "targets", pack=pack)
  return seqio.DecoderFeatureConverter(pack=pack)


def default_feature_lengths(task_or_mixture, seq_len: int, loss_on: str = "targets"
                            ) -> Dict[str, int]:
  """Splits `seq_len` between inputs and targets (PrefixLM packs inputs+targets together);
  untrimmed for the tail converter, which keeps the joined text's last `seq_len` tokens."""
  if _tail(task_or_mixture, loss_on):
    return {"inputs": _UNTRIMMED, "targets": _UNTRIMMED}
  if "inputs" in task_or_mixture.output_features:
    return {"inputs": seq_len // 2, "targets": seq_len - seq_len // 2}
  return {"targets": seq_len}


def get_task(name: str):
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError as e:
    raise ValueError(f"seqio task or mixture {name!r} is not registered ({e}); import the module "
                     "that registers it (e.g. teacherlm_jax.data.tasks) or fix the name") from e


def check_vocabulary(name: str, model_vocab_size: int, model_source: str) -> None:
  """Raises `vocab.VocabularyMismatch` (naming both files) when the task's vocabulary has ids
  the model has no embedding for; called before anything is trained."""
  from teacherlm_jax.data import vocab  # pylint: disable=g-import-not-at-top
  for feature in get_task(name).output_features.values():
    vocabulary = feature.vocabulary
    vocab.check_fits_model(vocabulary.vocab_size, vocab.vocabulary_source(vocabulary),
                           model_vocab_size, model_source,
                           {"eos": vocabulary.eos_id, "pad": vocabulary.pad_id})


class SeqioBatches:
  """Packed global batches of a seqio task/mixture, addressable by batch number."""

  def __init__(self, task_name: str, split: str, seq_len: int, batch_size: int, *,
               loss_on: str = "targets", pack: bool = True, shuffle: bool = True,
               seed: int = 0, repeat: bool = True,
               feature_lengths: Optional[Mapping[str, int]] = None,
               input_sharding: str = "global", process_rows=None,
               process_index: int = 0, process_count: int = 1):
    if input_sharding not in INPUT_SHARDING:
      raise ValueError(f"input_sharding={input_sharding!r}: expected one of {INPUT_SHARDING}")
    self.task = get_task(task_name)
    self.split = split
    self.seq_len = seq_len
    self.batch_size = batch_size
    self.converter = feature_converter(self.task, loss_on, pack, seq_len)
    self.feature_lengths = dict(feature_lengths
                                or default_feature_lengths(self.task, seq_len, loss_on))
    self.shuffle, self.seed, self.repeat = shuffle, seed, repeat
    self.input_sharding = input_sharding
    self.rows = process_rows or (0, batch_size)
    self.process_index, self.process_count = process_index, process_count

  def _dataset(self, start: int) -> tf.data.Dataset:
    shard_info = None
    batch_size = self.batch_size
    if self.input_sharding == "per_process":
      shard_info = seqio.ShardInfo(index=self.process_index, num_shards=self.process_count)
      batch_size = self.rows[1] - self.rows[0]
    ds = seqio.get_dataset(self.task.name, self.feature_lengths, self.converter,
                           dataset_split=self.split, shuffle=self.shuffle,
                           num_epochs=None if self.repeat else 1, shard_info=shard_info,
                           seed=self.seed, batch_size=batch_size, verbose=False)
    options = tf.data.Options()
    # Saving then fails loudly instead of silently dropping state that cannot be saved.
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.FAIL
    # A saved position restores only into the same graph: keep skip(0), which every run has.
    options.experimental_optimization.noop_elimination = False
    return ds.with_options(options).skip(start)

  def description(self) -> dict:
    """What fixes the batch sequence: a saved position only fits a pipeline that matches."""
    return {"task": self.task.name, "split": self.split, "seq_len": self.seq_len,
            "batch_size": self.batch_size, "feature_lengths": self.feature_lengths,
            "converter": type(self.converter).__name__, "shuffle": self.shuffle,
            "seed": self.seed, "repeat": self.repeat, "input_sharding": self.input_sharding,
            "rows": list(self.rows), "process": [self.process_index, self.process_count]}

  def __call__(self, start: int = 0, state: Optional[bytes] = None) -> "BatchIterator":
    """Batches number start, start+1, ...: this process's rows, as int32/float32 numpy.

    `state`: what `BatchIterator.state()` returned after batch start - 1 (O(1) resume);
    without it the pipeline replays the first `start` batches.
    """
    lo, hi = self.rows
    if self.input_sharding == "per_process":
      lo, hi = 0, hi - lo
    if state is None:
      return BatchIterator(self._dataset(start), (lo, hi), self.description(), start)
    header, payload = _split_state(state)
    _check_description(header, self.description(), start)
    # skip(0): the saved skip state has counted the batches it skipped already.
    iterator = BatchIterator(self._dataset(0), (lo, hi), self.description(), start)
    iterator.restore(payload)
    return iterator


class BatchIterator:
  """Batches of a tf.data pipeline as numpy; `state()` says where it is, as bytes."""

  def __init__(self, dataset: tf.data.Dataset, rows, description: dict, start: int):
    self._iterator = iter(dataset)
    self._rows = rows
    self._description = description
    self.position = start  # The number of the next batch.

  def __iter__(self):
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    batch = next(self._iterator)
    lo, hi = self._rows
    out = {}
    for name, key in _RENAMES.items():
      if name in batch:
        out[key] = batch[name][lo:hi].numpy()
    out["loss_weights"] = out["loss_weights"].astype(np.float32)
    for key in ("segment_ids", "positions", "tokens", "targets"):
      out[key] = out[key].astype(np.int32)
    self.position += 1
    return out

  def state(self) -> Optional[bytes]:
    """The position after the last batch returned; None when the pipeline holds state tf.data
    cannot save (resume then replays)."""
    try:
      tensors = self._iterator._serialize_to_tensors()  # pylint: disable=protected-access
    except (tf.errors.FailedPreconditionError, tf.errors.UnimplementedError):
      return None
    payload = tf.io.serialize_tensor(tensors["_STATE"]).numpy()
    header = json.dumps({**self._description, "position": self.position}, sort_keys=True)
    return header.encode("utf-8") + b"\n" + payload

  def restore(self, payload: bytes) -> None:
    state = tf.io.parse_tensor(payload, tf.variant)
    self._iterator._restore_from_tensors({"_STATE": state})  # pylint: disable=protected-access


def _split_state(state: bytes):
  header, _, payload = state.partition(b"\n")
  return json.loads(header.decode("utf-8")), payload


def _check_description(saved: dict, current: dict, start: int) -> None:
  """Refuses a saved position of another pipeline; the message names the differing field."""
  if saved.get("position") != start:
    raise ValueError(f"saved input position is batch {saved.get('position')}, but the run "
                     f"resumes at batch {start}")
  changed = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
  if changed:
    raise ValueError(f"saved input position belongs to another input pipeline (field: "
                     f"(saved, now)): {changed}")


# ---------------------------------------------------------------------------------------------
# A small byte-level CoT task over the FLAN TSVs (CPU tests, tiny configs).

FLAN_COT_BYTES_TASK = "teacherlm_flan_cot_bytes"
DEFAULT_FLAN_FILES = ("qasc", "sensemaking", "gsm8k", "aqua")


def _flan_examples(data_dir: str, files: Sequence[str], validation_size: int):
  """TeacherLM CoT examples (data/tasks.py: prompt + trigger -> rationale) of FLAN files,
  leakage-filtered against the evaluation sets like every FLAN-derived task."""
  from teacherlm_jax.data import sources, tasks  # pylint: disable=g-import-not-at-top
  with sources.using_data_dir(data_dir):
    examples = [tasks.teacher_example(r) for name in files for r in tasks.flan_records(name)]
  inputs = [e["inputs"] for e in examples]
  targets = [e["targets"] for e in examples]
  return {"train": (inputs[validation_size:], targets[validation_size:]),
          "validation": (inputs[:validation_size], targets[:validation_size])}


def register_flan_cot_bytes_task(data_dir: str, files: Sequence[str] = DEFAULT_FLAN_FILES,
                                 validation_size: int = 200,
                                 name: str = FLAN_COT_BYTES_TASK) -> str:
  """Registers (once) the TeacherLM CoT teacher task over FLAN rows with a byte vocabulary
  (no trained vocabulary needed). The first `validation_size` examples are 'validation'."""
  if name in seqio.TaskRegistry.names():
    return name
  examples = functools.lru_cache(None)(
      lambda: _flan_examples(data_dir, tuple(files), validation_size))

  def dataset_fn(split, shuffle_files, seed=None):
    del shuffle_files, seed  # One in-memory shard; seqio shuffles examples.
    inputs, targets = examples()[split]
    return tf.data.Dataset.from_tensor_slices({"inputs": inputs, "targets": targets})

  vocabulary = seqio.ByteVocabulary()
  seqio.TaskRegistry.add(
      name,
      source=seqio.FunctionDataSource(dataset_fn, splits=("train", "validation")),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
      output_features={"inputs": seqio.Feature(vocabulary, add_eos=False),
                       "targets": seqio.Feature(vocabulary, add_eos=True)})
  return name
