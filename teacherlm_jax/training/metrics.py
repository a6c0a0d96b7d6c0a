"""Where the trainer's metrics go, and how they come back.

Every scalar goes through one clu `MetricWriter`: to the INFO log on every process and, on
process 0, to TensorBoard event files in `<model_dir>/tensorboard` (local or gs://). Those
event files are the one record of a run's metrics: `read_scalars` reads them back (the
pipeline's report, tests).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping

import jax
import numpy as np
from clu import metric_writers

TENSORBOARD_DIR = "tensorboard"


def tensorboard_dir(model_dir: str) -> str:
  return os.path.join(model_dir, TENSORBOARD_DIR)


def create_writer(model_dir: str, tensorboard: bool = True) -> metric_writers.MetricWriter:
  """clu's default writer: the log on every process, event files on process 0 only (every
  process computes the same global values, and one file per run keeps TensorBoard's curves
  single)."""
  return metric_writers.create_default_writer(
      tensorboard_dir(model_dir) if tensorboard else None,
      just_logging=jax.process_index() > 0)


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
  for path in tf.io.gfile.glob(os.path.join(logdir, "events.out.tfevents.*")):
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
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


def mean_of(sums: Dict[str, np.ndarray], num_steps: int) -> Dict[str, float]:
  """Averages of per-step metric sums, as floats."""
  weight = float(sums["weight"])
  return {"loss": float(sums["loss_sum"]) / max(weight, 1.0),
          "accuracy": float(sums["correct"]) / max(weight, 1.0),
          "target_tokens": weight / max(num_steps, 1)}
