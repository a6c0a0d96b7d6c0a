"""The trainer in one process on 8 simulated CPU devices, on real FLAN CoT data.

Sharded runs must equal the 1-device run, accumulation must equal the large batch, options
(bf16 compute, z-loss, loss masks) must do what they say, bad input must be refused with a
message that says what to change, and multi-stage init must carry the parameters over.
"""
import json
import logging
import os
import pathlib
import signal

import jax
import numpy as np
import pytest

from teacherlm_jax.models import losses
from teacherlm_jax.runtime import checkpointing
from teacherlm_jax.runtime import partitioning
from teacherlm_jax.training import metrics
from teacherlm_jax.training import optimizer
from teacherlm_jax.training import train
from teacherlm_jax.training import train_config
from teacherlm_jax.training import train_data

REPO = pathlib.Path(__file__).resolve().parents[1]
SEQ_LEN, BATCH = 64, 8
MESH = dict(mesh=dict(data=1, fsdp=4, tensor=2))  # One mesh: tests share its programs.


@pytest.fixture(scope="module")
def flan_batches():
  """24 packed 8x64 batches of real FLAN CoT rationales (byte vocabulary, targets-only loss)."""
  from conftest import data_dir
  if not data_dir().is_dir():
    pytest.skip(f"real data directory {data_dir()} is absent (set TEACHERLM_DATA_DIR)")
  task = train_data.register_flan_cot_bytes_task(str(data_dir()))
  batches = train_data.SeqioBatches(task, "train", SEQ_LEN, BATCH, seed=0)(0)
  return [next(batches) for _ in range(24)]


def _config(**changes):
  """A 3-step tiny-BLOOM run with `changes` (a group's as a dict: `data=dict(seq_len=32)`)."""
  base = train_config.TrainConfig(
      model=train_config.ModelSettings(preset="tiny-bloom"),
      data=train_config.DataConfig(seq_len=SEQ_LEN, batch_size=BATCH),
      optimizer=train_config.OptimizerConfig(learning_rate=3e-3, schedule="constant"),
      checkpoint=train_config.CheckpointConfig(every=1000),
      logging=train_config.LoggingConfig(every=1, peak_tflops_per_device=1.0), num_steps=3)
  return base.replace(**changes)


def _run(config, model_dir, batches, **kwargs):
  return train.train(config, str(model_dir), train_batches=lambda start: iter(batches[start:]),
                     **kwargs)


def _params(result):
  return jax.tree.map(np.asarray, result["state"]["params"])


def _assert_trees_close(a, b, rtol, atol):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def one_device_run(flan_batches, tmp_path_factory):
  config = _config(mesh=dict(devices=1, fsdp=1))
  return _run(config, tmp_path_factory.mktemp("one_device"), flan_batches)


@pytest.mark.parametrize("mesh", [MESH,
                                  dict(mesh=dict(data=8, fsdp=1, tensor=1))],
                         ids=["fsdp4_tensor2", "data8"])
def test_sharded_training_equals_one_device(mesh, flan_batches, one_device_run, tmp_path):
  sharded = _run(_config(**mesh), tmp_path, flan_batches)
  kernel = sharded["state"]["params"]["layers"]["mlp"]["up"]["kernel"]
  assert len(kernel.sharding.device_set) == 8
  np.testing.assert_allclose(sharded["losses"], one_device_run["losses"], rtol=2e-6)
  assert sharded["losses"][-1] < sharded["losses"][0]  # It trained.
  # Adam divides by sqrt(v): a gradient near 0 summed in another order can move a parameter by
  # a few 1e-6 (well below one lr step of 3e-3); losses above must agree to 2e-6 relative.
  _assert_trees_close(_params(sharded), _params(one_device_run), rtol=1e-4, atol=1e-5)


def test_loss_goes_down_on_flan_cot_through_the_seqio_task(shared_data, tmp_path):
  # Same shapes and optimizer as the other tests, so the compiled step is shared.
  config = _config(num_steps=150, eval_batches=2, **MESH,
                   data=dict(train_task=train_data.FLAN_COT_BYTES_TASK, data_dir=str(shared_data)),
                   logging=dict(every=50), checkpoint=dict(every=75))
  result = train.train(config, str(tmp_path))
  losses = result["losses"]
  assert losses[0] > 6.0  # ~log(259): an untrained byte model.
  assert losses[-20:].mean() < 0.5 * losses[0], losses[::20]
  assert result["eval"]["loss"] < 0.5 * losses[0]
  assert result["eval"]["accuracy"] > 0.12  # Untrained: ~1/259.
  scalars = metrics.read_scalars(metrics.tensorboard_dir(str(tmp_path)))
  assert sorted(scalars["train/loss"]) == [50, 100, 150]
  assert sorted(scalars["eval/loss"]) == [150]
  for tag in ("train/loss", "train/accuracy", "train/learning_rate", "tokens_per_sec",
              "tflops_per_sec_per_device", "mfu"):
    assert np.isfinite(scalars[tag][150]), tag
  assert sorted(checkpointing.Checkpointer(str(tmp_path)).all_steps()) == [75, 150]


def test_gradient_accumulation_equals_the_large_batch(flan_batches, tmp_path):
  # Every token weighted 1, so the mean over a batch is the mean of its two halves' means.
  ones = [{**b, "loss_weights": np.ones_like(b["loss_weights"])} for b in flan_batches[:2]]
  halves = [{k: v[rows] for k, v in b.items()} for b in ones
            for rows in (slice(0, 4), slice(4, 8))]
  large = _run(_config(num_steps=2, **MESH), tmp_path / "large", ones)
  accumulated = _run(
      _config(num_steps=2, **MESH, data=dict(batch_size=4), optimizer=dict(grad_accum_steps=2)),
      tmp_path / "accumulated", halves)
  assert int(accumulated["state"]["step"]) == 4  # Microbatches.
  # Adam divides by sqrt(v): float rounding in near-zero gradients moves a weight by up to
  # ~lr * 1e-3, hence atol 1e-5 at lr 3e-3.
  _assert_trees_close(_params(accumulated), _params(large), rtol=1e-4, atol=1e-5)


def test_several_steps_per_call_equal_one_step_per_call(flan_batches, tmp_path):
  # 7 steps of 2 microbatches, logged every 3: calls of 2 steps (0->2, 3->5) and, where a call
  # would cross a log or num_steps, single steps (2->3, 5->6, 6->7).
  config = _config(num_steps=7, **MESH, logging=dict(every=3), optimizer=dict(grad_accum_steps=2))
  one = _run(config, tmp_path / "one", flan_batches)
  several = _run(config.replace(steps_per_call=2), tmp_path / "several", flan_batches)
  assert int(several["state"]["step"]) == 14  # Microbatches.
  np.testing.assert_allclose(several["losses"], one["losses"], rtol=2e-6)
  _assert_trees_close(_params(several), _params(one), rtol=1e-4, atol=1e-5)
  logged = lambda d: sorted(
      metrics.read_scalars(metrics.tensorboard_dir(str(tmp_path / d)))["train/loss"])
  assert logged("several") == logged("one") == [3, 6, 7]


def test_bf16_compute_keeps_float32_master_weights(flan_batches, one_device_run, tmp_path):
  result = _run(_config(**MESH, model=dict(compute_dtype="bfloat16")), tmp_path,
                flan_batches)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(_params(result)))
  np.testing.assert_allclose(result["losses"], one_device_run["losses"], rtol=2e-2)
  assert json.loads((tmp_path / "model_config.json").read_text())["dtype"] == "bfloat16"


def test_train_step_compiles_once_from_a_fresh_state(flan_batches, caplog):
  """`fresh_state` places every leaf as the step returns it, so step 2 reuses step 1's
  program (the benchmark's uncommitted step counter compiled it twice)."""
  config = _config(**MESH)
  mesh = config.mesh.make()
  program = train.program_for(config, train.model_config_for(config, ""), mesh)
  batch = partitioning.shard_batch({key: flan_batches[0][key] for key in train.BATCH_KEYS},
                                   mesh, BATCH)
  state, _ = program.train_step(program.fresh_state(program.init_params()), batch)
  with jax.log_compiles(), caplog.at_level(logging.WARNING):
    state, _ = program.train_step(state, batch)
  compiles = [r for r in caplog.records if "Compiling jit(step_fn)" in r.getMessage()]
  assert not compiles, f"step 2 compiled the train step again ({len(compiles)} time(s))"
  assert int(state["step"]) == 2


def test_schedules_warm_up_then_hold_or_decay():
  cosine = optimizer.learning_rate_schedule(1e-3, "cosine", warmup_steps=10, num_steps=110,
                                            end_fraction=0.1)
  np.testing.assert_allclose([cosine(0), cosine(5), cosine(10), cosine(60), cosine(110)],
                             [0.0, 5e-4, 1e-3, 0.55e-3, 1e-4], rtol=1e-5, atol=1e-9)
  constant = optimizer.learning_rate_schedule(1e-3, "constant", warmup_steps=4)
  np.testing.assert_allclose([constant(2), constant(4), constant(10 ** 6)], [5e-4, 1e-3, 1e-3])
  with pytest.raises(ValueError, match="schedule='cosin'"):
    optimizer.learning_rate_schedule(1e-3, "cosin")


def test_z_loss_adds_the_squared_log_partition():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 11)).astype(np.float32) * 3
  targets = rng.integers(0, 11, size=(2, 5))
  weights = (rng.random((2, 5)) > 0.3).astype(np.float32)
  plain, sums = losses.loss_and_metrics(logits, targets, weights)
  with_z, _ = losses.loss_and_metrics(logits, targets, weights, z_loss=1e-2)
  log_z = np.log(np.exp(logits.astype(np.float64)).sum(-1))
  nll = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(plain, (nll * weights).sum() / weights.sum(), rtol=1e-5)
  np.testing.assert_allclose(with_z - plain, 1e-2 * (log_z ** 2 * weights).sum() / weights.sum(),
                             rtol=1e-4)
  assert float(sums["weight"]) == weights.sum()


def test_loss_mask_targets_only_or_every_token(shared_data):
  task = train_data.register_flan_cot_bytes_task(str(shared_data))
  get = lambda loss_on: next(train_data.SeqioBatches(task, "train", SEQ_LEN, 2, loss_on=loss_on,
                                                     seed=3)(0))
  targets_only, every_token = get("targets"), get("all")
  # Every token: inputs and targets are one text whose last SEQ_LEN tokens are kept (the
  # reference's students); targets only: PrefixLM, SEQ_LEN split between the two.
  assert not np.array_equal(targets_only["tokens"], every_token["tokens"])
  real = every_token["segment_ids"] > 0
  np.testing.assert_array_equal(every_token["loss_weights"] > 0, real)
  assert 0 < targets_only["loss_weights"].sum() < every_token["loss_weights"].sum()
  # Packed: several texts per row, positions restart at every text.
  assert every_token["segment_ids"].max() >= 1
  starts = np.diff(every_token["segment_ids"], axis=1) != 0
  assert np.all(every_token["positions"][:, 1:][starts & real[:, 1:]] == 0)


@pytest.mark.parametrize("steps_per_call, saved_step", [(1, 5), (2, 6)])
def test_sigterm_saves_a_checkpoint_at_the_current_step_and_returns(
    steps_per_call, saved_step, flan_batches, tmp_path):
  # The signal arrives while batch 4 is read: in step 5, or in the call of steps 5 and 6.
  def batches(start):
    for number, batch in enumerate(flan_batches[start:], start):
      if number == 4:  # A real SIGTERM to this process, as a TPU preemption sends.
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch
  config = _config(num_steps=20, steps_per_call=steps_per_call, **MESH, checkpoint=dict(every=1000),
                   logging=dict(every=10))
  handler_before = signal.getsignal(signal.SIGTERM)
  result = train.train(config, str(tmp_path), train_batches=batches)
  assert result["preempted"] and result["step"] == saved_step
  assert checkpointing.Checkpointer(str(tmp_path)).all_steps() == [saved_step]
  assert signal.getsignal(signal.SIGTERM) is handler_before  # Ours is uninstalled.


def test_batches_are_a_function_of_their_number(shared_data):
  task = train_data.register_flan_cot_bytes_task(str(shared_data))
  make = lambda **kw: train_data.SeqioBatches(task, "train", SEQ_LEN, BATCH, seed=5, **kw)
  from_start = make()(0)
  third = [next(from_start) for _ in range(3)][2]
  np.testing.assert_array_equal(next(make()(2))["tokens"], third["tokens"])  # Resume at 2.
  # 'global': a process keeps its rows of the same global batch.
  rows = next(make(process_rows=(4, 8))(2))
  np.testing.assert_array_equal(rows["tokens"], third["tokens"][4:])
  # 'per_process': each process reads its own shard of the data.
  shards = [next(make(input_sharding="per_process", process_rows=(4 * i, 4 * i + 4),
                      process_index=i, process_count=2)(0))["tokens"] for i in range(2)]
  assert shards[0].shape == shards[1].shape == (4, SEQ_LEN)
  assert not np.array_equal(shards[0], shards[1])


# ---------------------------------------------------------------------------------------------
# Bad input.


def test_mesh_and_batch_that_do_not_fit_are_refused(flan_batches, tmp_path):
  with pytest.raises(ValueError, match="cannot fill 8 devices"):
    _run(_config(mesh=dict(data=3)), tmp_path, flan_batches)
  with pytest.raises(ValueError, match=r"DataConfig.batch_size=6 .*multiple of 8"):
    _run(_config(data=dict(batch_size=6), mesh=dict(data=8, fsdp=1)), tmp_path, flan_batches)


def test_corrupt_checkpoint_is_refused_with_what_to_delete(flan_batches, tmp_path):
  _run(_config(num_steps=2, **MESH, checkpoint=dict(every=2)), tmp_path, flan_batches)
  params_dir = tmp_path / "checkpoints" / "2" / "params"
  for path in params_dir.rglob("*"):
    if path.is_file():
      path.write_bytes(b"not a checkpoint")
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"checkpoints/2: checkpoint cannot be restored.*delete that step"):
    _run(_config(num_steps=4, **MESH), tmp_path, flan_batches)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(flan_batches, tmp_path):
  poisoned = [dict(b) for b in flan_batches[:6]]
  poisoned[2]["loss_weights"] = np.full_like(poisoned[2]["loss_weights"], np.nan)
  config = _config(num_steps=6, **MESH, checkpoint=dict(every=1, keep=1), logging=dict(every=10))
  with pytest.raises(FloatingPointError, match=r"NaN/Inf at step 3 .*newest checkpoint is "
                                               r"step 2 .*saved from finite values"):
    _run(config, tmp_path, poisoned)
  assert checkpointing.Checkpointer(str(tmp_path)).all_steps() == [2]  # keep-N pruned step 1.


# ---------------------------------------------------------------------------------------------
# Multi-stage initialisation.


def test_next_stage_starts_from_the_previous_stage_params(flan_batches, tmp_path):
  first = _run(_config(num_steps=3, **MESH, checkpoint=dict(every=2)), tmp_path / "stage1",
               flan_batches)
  # Stage 2 starts from stage 1's step-2 params with a fresh optimizer: its first loss (before
  # any update) on batch 2 is exactly stage 1's third loss.
  stage1_step2 = str(tmp_path / "stage1" / "checkpoints" / "2")
  second = _run(_config(num_steps=2, **MESH, model=dict(init_checkpoint=stage1_step2)),
                tmp_path / "stage2", flan_batches[2:])
  assert second["start_step"] == 0 and int(second["state"]["step"]) == 2
  assert second["losses"][0] == first["losses"][2]
  assert second["losses"][1] != first["losses"][2]  # It trained on.


def test_stage_can_start_from_an_imported_hf_checkpoint(flan_batches, tmp_path):
  pytest.importorskip("transformers")
  from teacherlm_jax.models import hf
  import hf_peers
  hf_peers.make_hf_model("bloom", tmp_path / "hf")
  small = [{**b, "tokens": b["tokens"] % 101, "targets": b["targets"] % 101}
           for b in flan_batches[:1]]
  result = _run(
      _config(num_steps=1, optimizer=dict(learning_rate=0.0),
              model=dict(init_hf_checkpoint=str(tmp_path / "hf")),
              mesh=dict(data=2, fsdp=1, devices=2)), tmp_path / "run", small)
  _, model = hf.import_checkpoint(tmp_path / "hf")
  from flax import nnx
  expected = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  _assert_trees_close(_params(result), expected, rtol=0, atol=0)
  assert json.loads((tmp_path / "run" / "model_config.json").read_text())["vocab_size"] == 101


def test_runs_differing_only_in_seed_share_one_compile(flan_batches, caplog):
  """The seed initialises the parameters (as `nnx.Rngs(seed)` does eagerly) but is not part
  of the compiled program, so a second seed's first step compiles nothing new."""
  from flax import nnx
  from teacherlm_jax.models import transformer
  mesh = _config(**MESH).mesh.make()
  programs = {seed: train.program_for(_config(seed=seed, **MESH),
                                      train.model_config_for(_config(**MESH), ""), mesh)
              for seed in (0, 1)}
  assert programs[0].train_step is programs[1].train_step
  model_config = train.model_config_for(_config(**MESH), "")
  eager = {seed: nnx.to_pure_dict(nnx.state(transformer.DecoderLM(model_config,
                                                                   rngs=nnx.Rngs(seed)),
                                            nnx.Param)) for seed in (0, 1)}
  params = {seed: program.init_params() for seed, program in programs.items()}
  for seed in (0, 1):  # The same random bits; jit and eager round the float maths alike.
    _assert_trees_close(params[seed], eager[seed], rtol=1e-6, atol=1e-7)
  assert not np.allclose(params[0]["token_embedding"], params[1]["token_embedding"])
  batch = partitioning.shard_batch({key: flan_batches[0][key] for key in train.BATCH_KEYS},
                                   mesh, BATCH)
  programs[0].train_step(programs[0].fresh_state(params[0]), batch)
  with jax.log_compiles(), caplog.at_level(logging.WARNING):
    programs[1].train_step(programs[1].fresh_state(params[1]), batch)
  compiles = [r for r in caplog.records if "Compiling jit(step_fn)" in r.getMessage()]
  assert not compiles, f"seed 1 compiled the train step again ({len(compiles)} time(s))"
