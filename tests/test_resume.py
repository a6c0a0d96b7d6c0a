"""O(1) resume: the input position comes back from the checkpoint, it is not replayed."""
import logging
import jax
import numpy as np
import pytest

from teacherlm_jax.training import input_position
from teacherlm_jax.training import train
from teacherlm_jax.training import train_config
from teacherlm_jax.training import train_data

SEQ_LEN, BATCH = 64, 8


@pytest.fixture(scope="module")
def flan_task(shared_data_dir):
  return train_data.register_flan_cot_bytes_task(str(shared_data_dir))


@pytest.fixture(scope="module")
def shared_data_dir():
  from conftest import data_dir
  if not data_dir().is_dir():
    pytest.skip(f"real data directory {data_dir()} is absent (set TEACHERLM_DATA_DIR)")
  return data_dir()


def _batches(task, **changes):
  return train_data.SeqioBatches(task, "train", SEQ_LEN, BATCH, **{"seed": 3, **changes})


def test_a_saved_position_continues_with_the_same_batches(flan_task):
  uninterrupted = _batches(flan_task)(0)
  reference = [next(uninterrupted) for _ in range(9)]
  first_run = _batches(flan_task)(2)  # Itself a resume that replayed 2 batches.
  for _ in range(4):
    next(first_run)
  state = first_run.state()
  resumed = _batches(flan_task)(6, state=state)  # A fresh pipeline, as after a restart.
  for expected in reference[6:]:
    got = next(resumed)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_a_position_of_another_pipeline_is_refused(flan_task):
  first_run = _batches(flan_task)(0)
  next(first_run)
  state = first_run.state()
  with pytest.raises(ValueError, match=r"another input pipeline.*'seed': \(3, 4\)"):
    _batches(flan_task, seed=4)(1, state=state)
  with pytest.raises(ValueError, match="saved input position is batch 1, but the run resumes "
                                       "at batch 2"):
    _batches(flan_task)(2, state=state)


def test_training_resumes_from_the_saved_input_position(flan_task, tmp_path, caplog):
  config = train.TrainConfig(
      num_steps=4, eval_batches=0, model=train_config.ModelSettings(preset="tiny-bloom"),
      data=train_config.DataConfig(train_task=flan_task, seq_len=SEQ_LEN, batch_size=BATCH,
                                   seed=3),
      optimizer=train_config.OptimizerConfig(learning_rate=3e-3, schedule="constant"),
      logging=train_config.LoggingConfig(every=2, peak_tflops_per_device=1.0, tensorboard=False),
      checkpoint=train_config.CheckpointConfig(every=2),
      mesh=train_config.MeshConfig(devices=1, fsdp=1))
  whole = train.train(config, str(tmp_path / "whole"))
  train.train(config.replace(num_steps=2), str(tmp_path / "split"))
  assert input_position.load(str(tmp_path / "split"), 2, 0, 1) is not None
  with caplog.at_level(logging.INFO, logger="absl"):  # The trainer logs through absl.
    resumed = train.train(config, str(tmp_path / "split"))
  log = "\n".join(record.getMessage() for record in caplog.records)
  assert "input: continuing from the position saved at step 2" in log
  assert resumed["start_step"] == 2
  np.testing.assert_allclose(resumed["losses"], whole["losses"][2:], rtol=1e-6)
  for x, y in zip(jax.tree.leaves(resumed["state"]["params"]),
                  jax.tree.leaves(whole["state"]["params"])):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
  assert input_position.load(str(tmp_path / "split"), 4, 0, 1) is not None  # Saved again.
