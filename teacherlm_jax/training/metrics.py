"""Where the trainer's metrics go, and how they come back.

Every scalar goes through one clu `MetricWriter`: to the INFO log on every process and, on
process 0, to TensorBoard event files in `<model_dir>/tensorboard` (local or gs://). Those
event files are the one record of a run's metrics: `read_scalars` reads them back (the
pipeline's report, tests).

Event files for a gs:// model_dir are written locally and published whole through the file
layer at every flush and close: tf.summary writes with TensorFlow's own GCS client, which
reaches only Google's endpoint (never STORAGE_EMULATOR_HOST) and would be a second client.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Dict, Mapping

import jax
import numpy as np
from clu import metric_writers
from clu.metric_writers import summary_writer

from teacherlm_jax.storage import files

TENSORBOARD_DIR = "tensorboard"


def tensorboard_dir(model_dir: str) -> str:
  return os.path.join(model_dir, TENSORBOARD_DIR)


def create_writer(model_dir: str, tensorboard: bool = True) -> metric_writers.MetricWriter:
  """clu's default writer: the log on every process, event files on process 0 only (every
  process computes the same global values, and one file per run keeps TensorBoard's curves
  single)."""
  logdir = tensorboard_dir(model_dir) if tensorboard else None
  if logdir is None or not files.is_uri(logdir) or jax.process_index() > 0:
    return metric_writers.create_default_writer(logdir, just_logging=jax.process_index() > 0)
  # create_default_writer's writers, with the events published to the object store.
  return metric_writers.AsyncMultiWriter([metric_writers.LoggingWriter(),
                                          PublishingSummaryWriter(logdir)])


class PublishingSummaryWriter(summary_writer.SummaryWriter):
  """clu's TensorBoard writer for a log dir on an object store: event files go to a local
  directory, and each one that grew is uploaded whole to `logdir` at every flush and close
  (an object store cannot append)."""

  def __init__(self, logdir: str):
    self._logdir = logdir
    self._local = tempfile.mkdtemp(prefix="teacherlm_tensorboard_")
    self._published: Dict[str, int] = {}  # File name -> size uploaded last.
    super().__init__(self._local)

  def flush(self):
    super().flush()
    self._publish()

  def close(self):
    super().close()
    self._publish()
    shutil.rmtree(self._local, ignore_errors=True)

  def _publish(self):
    for name in sorted(os.listdir(self._local)):
      size = os.path.getsize(os.path.join(self._local, name))
      if self._published.get(name) != size:
        files.upload(os.path.join(self._local, name), files.join(self._logdir, name))
        self._published[name] = size


def hparams(config: Mapping[str, Any]) -> Dict[str, Any]:
  """A config as TensorBoard hparams, which take only bool, int, float and str values."""
  return {name: value if isinstance(value, (bool, int, float, str)) else str(value)
          for name, value in config.items()}


def read_scalars(logdir: str) -> Dict[str, Dict[int, float]]:
  """tag -> {step: value} of the scalar summaries in `logdir`'s event files (local or gs://).

  A step written twice (a resumed run repeats the steps after its last checkpoint) keeps the
  value written last.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  events = []
  for path in files.glob(os.path.join(logdir, "events.out.tfevents.*")):
    for record in _records(path):
      event = tf.compat.v1.Event.FromString(record)
      for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name == "scalars":
          events.append((event.wall_time, event.step, value.tag,
                         float(tf.make_ndarray(value.tensor))))
        elif value.HasField("simple_value"):  # TF1-style writers.
          events.append((event.wall_time, event.step, value.tag, value.simple_value))
  scalars: Dict[str, Dict[int, float]] = {}
  for _, step, tag, value in sorted(events):
    scalars.setdefault(tag, {})[step] = value
  return scalars


def _records(path) -> list:
  """The TFRecords of an event file, local or on an object store (read through the file layer,
  into a temp file for TFRecordDataset, which opens gs:// with TensorFlow's own client)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if not files.is_uri(path):
    return list(tf.data.TFRecordDataset(os.fspath(path)).as_numpy_iterator())
  with tempfile.TemporaryDirectory(prefix="teacherlm_events_") as local:
    copy = os.path.join(local, "events")
    with open(copy, "wb") as f:
      f.write(files.read_bytes(path))
    return list(tf.data.TFRecordDataset(copy).as_numpy_iterator())


def mean_of(sums: Dict[str, np.ndarray], num_steps: int) -> Dict[str, float]:
  """Averages of per-step metric sums, as floats."""
  weight = float(sums["weight"])
  return {"loss": float(sums["loss_sum"]) / max(weight, 1.0),
          "accuracy": float(sums["correct"]) / max(weight, 1.0),
          "target_tokens": weight / max(num_steps, 1)}
