"""What a researcher watches: TensorBoard event files and absl log lines from a training run,
and MFU against the chip's vendor peak."""
import logging

import numpy as np
import pytest
import tensorflow as tf

from teacherlm_jax.runtime import chips
from teacherlm_jax.training import metrics
from teacherlm_jax.training import mfu
from teacherlm_jax.training import train
from teacherlm_jax.training import train_config

SEQ_LEN, BATCH, VOCAB = 32, 4, 1000  # tiny-bloom's vocabulary.


def _batches(start: int):
  """Batch n of a fixed random token stream: a repeating pattern the model can learn."""
  rng = np.random.default_rng(0)
  pattern = rng.integers(4, VOCAB, size=(BATCH, SEQ_LEN + 1)).astype(np.int32)
  while True:
    yield {"tokens": pattern[:, :-1], "targets": pattern[:, 1:],
           "loss_weights": np.ones((BATCH, SEQ_LEN), np.float32),
           "segment_ids": np.ones((BATCH, SEQ_LEN), np.int32),
           "positions": np.tile(np.arange(SEQ_LEN, dtype=np.int32), (BATCH, 1))}


def _events(logdir):
  """(step, tag, plugin) of every summary value, read with TensorFlow's own iterator."""
  files = tf.io.gfile.glob(f"{logdir}/events.out.tfevents.*")
  assert len(files) == 1, files
  return [(event.step, value.tag, value.metadata.plugin_data.plugin_name, value)
          for event in tf.compat.v1.train.summary_iterator(files[0])
          for value in event.summary.value]


def test_training_writes_tensorboard_events_and_logs_progress(tmp_path, caplog):
  config = train.TrainConfig(
      num_steps=4, eval_batches=1, model=train_config.ModelSettings(preset="tiny-bloom"),
      data=train_config.DataConfig(seq_len=SEQ_LEN, batch_size=BATCH),
      optimizer=train_config.OptimizerConfig(learning_rate=3e-3, schedule="constant"),
      logging=train_config.LoggingConfig(every=2),
      checkpoint=train_config.CheckpointConfig(every=1000),
      mesh=train_config.MeshConfig(devices=1, fsdp=1))
  assert config.logging.tensorboard  # On by default.
  with caplog.at_level(logging.INFO, logger="absl"):  # clu and the trainer log through absl.
    train.train(config, str(tmp_path), train_batches=_batches, eval_batches=_batches)

  events = _events(tmp_path / "tensorboard")
  scalars = {}
  for step, tag, plugin, value in events:
    if plugin == "scalars":
      scalars.setdefault(tag, {})[step] = float(tf.make_ndarray(value.tensor))
  assert sorted(scalars["train/loss"]) == [2, 4]
  assert scalars["train/loss"][4] < scalars["train/loss"][2]  # It learns the pattern.
  assert sorted(scalars["eval/loss"]) == [4]
  # clu's progress report: from step 2 (the clock starts after step 1 compiled) on.
  for tag in ("steps_per_sec", "tokens_per_sec", "tflops_per_sec_per_device", "mfu"):
    assert sorted(scalars[tag]) == [2, 4] and scalars[tag][4] > 0, tag
  assert any(plugin == "hparams" for _, _, plugin, _ in events)
  assert metrics.read_scalars(str(tmp_path / "tensorboard")) == scalars

  log = "\n".join(record.getMessage() for record in caplog.records)
  assert "[4] train/accuracy=" in log and "mfu=" in log  # clu's LoggingWriter lines.
  assert "(4/4), ETA" in log  # clu's ReportProgress line.


def test_read_scalars_keeps_the_value_written_last_for_a_repeated_step(tmp_path):
  # A run resumed from an earlier checkpoint logs the steps after it again, in a new file.
  for value in (1.0, 2.0):
    writer = metrics.create_writer(str(tmp_path))
    writer.write_scalars(10, {"train/loss": value})
    writer.close()
  assert len(tf.io.gfile.glob(f"{tmp_path}/tensorboard/events.out.tfevents.*")) == 2
  assert metrics.read_scalars(metrics.tensorboard_dir(str(tmp_path))) == {"train/loss": {10: 2.0}}


def _never_measure() -> float:
  raise AssertionError("timed a matmul where a vendor peak exists")


@pytest.mark.parametrize("device_kind, name", [("TPU v4", "v4"), ("TPU v5 lite", "v5e"),
                                               ("TPU v5", "v5p"), ("TPU v6 lite", "v6e"),
                                               ("NVIDIA H100 80GB HBM3", "h100")])
def test_mfu_is_against_the_vendor_peak_of_the_chip(device_kind, name):
  platform = "gpu" if device_kind.startswith("NVIDIA") else "tpu"
  peak = mfu.peak_flops_per_device(device_kind, platform, measure_cpu_tflops=_never_measure)
  assert peak == chips.by_name(name).peak_bf16_flops
  rates = mfu.throughput_scalars(2.0, tokens_per_step=8 * 1024, flops_per_token=6e9,
                                 num_devices=4, peak_flops_per_device=peak)
  assert rates["tokens_per_sec"] == 2.0 * 8 * 1024
  assert rates["mfu"] == pytest.approx(2.0 * 8 * 1024 * 6e9 / 4 / peak)


def test_v5e_mfu_is_the_fraction_of_197_tflops():
  peak = mfu.peak_flops_per_device("TPU v5 lite", "tpu", measure_cpu_tflops=_never_measure)
  rates = mfu.throughput_scalars(1.0, tokens_per_step=1000, flops_per_token=98.5e9,
                                 num_devices=1, peak_flops_per_device=peak)
  assert rates["tflops_per_sec_per_device"] == pytest.approx(98.5)
  assert rates["mfu"] == pytest.approx(0.5)


def test_peak_override_wins_cpu_is_measured_and_an_unknown_accelerator_has_no_mfu():
  assert mfu.peak_flops_per_device("TPU v4", "tpu", override_tflops=100.0) == 100e12
  assert mfu.peak_flops_per_device("cpu", "cpu", measure_cpu_tflops=lambda: 0.25) == 0.25e12
  unknown = mfu.peak_flops_per_device("NVIDIA GeForce GTX 1080", "gpu",
                                      measure_cpu_tflops=_never_measure)
  assert unknown is None
  rates = mfu.throughput_scalars(1.0, tokens_per_step=10, flops_per_token=1.0, num_devices=1,
                                 peak_flops_per_device=unknown)
  assert "mfu" not in rates and rates["tokens_per_sec"] == 10
