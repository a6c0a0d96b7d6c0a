"""Checkpoint integrity: bytes flipped in a committed step (same size) are caught by the
checksums saved with it; training falls back to the previous good step and says so; the
stages that load a model refuse the damaged one."""
import json
import logging
import pathlib

import numpy as np
import pytest

from teacherlm_jax.annotation import annotate
from teacherlm_jax.annotation import decoding
from teacherlm_jax.data import vocab
from teacherlm_jax.models import checkpoint_io
from teacherlm_jax.runtime import checkpointing
from teacherlm_jax.training import train
from teacherlm_jax.training import train_config

SEQ_LEN, BATCH = 32, 8


def _batches(start):
  """Batch n is a function of n only, so a resumed run sees the same data."""
  number = start
  while True:
    tokens = np.random.default_rng(number).integers(4, 1000, (BATCH, SEQ_LEN)).astype(np.int32)
    number += 1
    yield {"tokens": tokens, "targets": np.roll(tokens, -1, axis=1),
           "loss_weights": np.ones((BATCH, SEQ_LEN), np.float32),
           "segment_ids": np.ones((BATCH, SEQ_LEN), np.int32),
           "positions": np.tile(np.arange(SEQ_LEN, dtype=np.int32), (BATCH, 1))}


def _config(**changes):
  base = train_config.TrainConfig(
      model=train_config.ModelSettings(preset="tiny-bloom"),
      data=train_config.DataConfig(seq_len=SEQ_LEN, batch_size=BATCH),
      optimizer=train_config.OptimizerConfig(schedule="constant"),
      mesh=train_config.MeshConfig(devices=1, fsdp=1),
      checkpoint=train_config.CheckpointConfig(every=2),
      logging=train_config.LoggingConfig(every=2, peak_tflops_per_device=1.0, tensorboard=False),
      num_steps=4, eval_batches=0)
  return base.replace(**changes)


def _flip_bytes(step_dir: pathlib.Path):
  """Inverts 16 bytes in the middle of the step's largest params file; its size is kept."""
  files = [p for p in (step_dir / "params").rglob("*") if p.is_file()]
  largest = max(files, key=lambda p: p.stat().st_size)
  data = bytearray(largest.read_bytes())
  size = len(data)
  for i in range(size // 2, size // 2 + 16):
    data[i] ^= 0xFF
  largest.write_bytes(bytes(data))
  assert largest.stat().st_size == size


@pytest.fixture(scope="module")
def damaged_run(tmp_path_factory):
  """A run with steps 2 and 4, then step 4's params damaged on disk."""
  model_dir = tmp_path_factory.mktemp("damaged") / "run"
  first = train.train(_config(), str(model_dir), train_batches=_batches)
  _flip_bytes(model_dir / "checkpoints" / "4")
  return model_dir, first


def test_damaged_step_is_refused_by_every_loader_naming_its_path(damaged_run):
  model_dir, _ = damaged_run
  message = (rf"{model_dir}/checkpoints/4: checkpoint fails verification: 1 of \d+ params "
             r"arrays differ from the checksums saved with them")
  with pytest.raises(checkpointing.CorruptCheckpointError, match=message):
    checkpoint_io.load_model(model_dir)  # What annotate, evaluate and export load with.


def test_annotate_refuses_the_damaged_model(damaged_run, tmp_path):
  model_dir, _ = damaged_run
  tokenizer = vocab.build_bpe_tokenizer(["Q: Is soup a liquid? A: The answer is (A)."] * 4,
                                        vocab_size=280, directory=tmp_path / "tokenizer")
  records = tmp_path / "records.jsonl"
  records.write_text(json.dumps({"id": "a", "question": "Is soup a liquid?", "answer": "A"}))
  with pytest.raises(checkpointing.CorruptCheckpointError,
                     match=rf"{model_dir}/checkpoints/4: checkpoint fails verification"):
    annotate.annotate(records, tmp_path / "out", teachers=str(model_dir),
                      tokenizer=f"hf:{tokenizer}", kinds=("chain_of_thought",),
                      sampling=decoding.SamplingConfig(max_new_tokens=2), progress=False)
  assert not (tmp_path / "out").exists()


def test_training_falls_back_to_the_previous_good_step_and_says_why(damaged_run, caplog):
  model_dir, first = damaged_run
  with caplog.at_level(logging.INFO, logger="absl"):  # The trainer logs through absl.
    resumed = train.train(_config(num_steps=6), str(model_dir), train_batches=_batches)
  out = "\n".join(record.getMessage() for record in caplog.records)
  assert resumed["start_step"] == 2 and resumed["step"] == 6
  assert f"skipping checkpoint step 4: {model_dir}/checkpoints/4: checkpoint fails " \
         "verification" in out
  assert f"resuming from {model_dir}/checkpoints/2 (verified), skipping damaged step(s) [4]" in out
  assert (model_dir / "damaged_checkpoints" / "4" / "params").is_dir()  # Kept to inspect.
  # Steps 3 and 4 were trained again from the good step 2 on the same batches.
  np.testing.assert_allclose(resumed["losses"][:2], first["losses"][2:4], rtol=1e-6)
  assert checkpointing.Checkpointer(str(model_dir)).all_steps()[-1] == 6
  checkpoint_io.load_model(model_dir)  # The new newest step passes verification.


def test_nan_guard_names_its_step_and_calls_only_a_verified_step_verified(tmp_path):
  model_dir = tmp_path / "run"
  train.train(_config(num_steps=2), str(model_dir), train_batches=_batches)

  def poisoned(start):
    for number, batch in enumerate(_batches(start), start=start):
      if number == 3:
        batch["loss_weights"] = np.full_like(batch["loss_weights"], np.nan)
      yield batch

  with pytest.raises(FloatingPointError, match=r"NaN/Inf at step 4 .*stopped there .*newest "
                                               r"checkpoint, step 2 in .*, passed checksum "
                                               r"verification when it was restored"):
    train.train(_config(num_steps=6, logging=dict(every=1), checkpoint=dict(every=10)),
                str(model_dir), train_batches=poisoned)
