"""The trainer of every stage: teacher specialisations, multi-stage SFT, student training.

One `TrainConfig` (training/train_config.py, gin-configurable) describes a run;
`train(config, model_dir)` runs it:

  * state = {'params', 'opt_state', 'step'} as plain pytrees, created directly in their shards
    or restored from the latest checkpoint in `model_dir`, a
    previous stage's checkpoint (`init_checkpoint`) or an HF checkpoint (`init_hf_checkpoint`);
  * the train step is a plain `jax.jit` over `nnx.split` state with explicit in/out shardings
    and the state donated, built by the runtime's `Program` (placement, mesh, compiler
    options); gradient accumulation is `optax.MultiSteps` (one call per
    microbatch, `state['step']` counts microbatches); `steps_per_call` > 1 runs that many
    steps per call as one `lax.scan` (`make_train_step(stacked=True)`);
  * batch number n of the input is a function of n only (`train_data.SeqioBatches`), and a
    checkpoint at optimizer step S resumes at microbatch S * grad_accum_steps, so a resumed
    run repeats the uninterrupted one exactly;
  * SIGTERM (preemption) saves at the current step and returns; a NaN/Inf loss or gradient
    stops with `FloatingPointError` before anything non-finite is saved.
"""
from __future__ import annotations

import functools
import json
import os
import signal
import threading
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from teacherlm_jax.models import checkpoint_io
from teacherlm_jax.models import checkpoint_vocab
from teacherlm_jax.models import head_loss
from teacherlm_jax.models import presets
from teacherlm_jax.models import transformer
from teacherlm_jax.models.config import ModelConfig
from teacherlm_jax.runtime import backend
from teacherlm_jax.runtime import checkpointing
from teacherlm_jax.runtime import partitioning
from teacherlm_jax.runtime import program as program_lib
from teacherlm_jax.storage import files
from teacherlm_jax.training import input_position
from teacherlm_jax.training import metrics as metrics_lib
from teacherlm_jax.training import mfu
from teacherlm_jax.training import optimizer as optimizer_lib
from teacherlm_jax.training import stage_vocab
from teacherlm_jax.training.train_config import DataConfig, OptimizerConfig, TrainConfig

# A callable giving the batches numbered start, start+1, ... (this process's rows, numpy).
BatchesFn = Callable[[int], Iterator[Dict[str, np.ndarray]]]
BATCH_KEYS = ("tokens", "targets", "loss_weights", "segment_ids", "positions")
TRAIN_CONFIG_FILE = "train_config.json"


def model_config_for(config: TrainConfig, model_dir: str, vocabulary=None) -> ModelConfig:
  """The architecture: this run's saved one (resume), the previous stage's, the HF
  checkpoint's, or the preset; with this run's compute dtype and remat. A checkpoint's
  vocabulary is kept (an override contradicting it is an error) unless
  `reinit_embeddings`, which sizes the embedding for `vocabulary`, the data's."""
  numerics = config.model.numerics()
  if model_dir and files.exists(files.join(model_dir, checkpoint_io.MODEL_CONFIG_FILE)):
    return checkpoint_io.read_model_config(model_dir).replace(**numerics)
  source = config.model.init_source
  if config.model.init_checkpoint and files.exists(
      files.join(config.model.init_checkpoint, checkpoint_io.MODEL_CONFIG_FILE)):
    model_config = checkpoint_io.read_model_config(config.model.init_checkpoint)
  elif config.model.init_hf_checkpoint:
    from teacherlm_jax.models import hf  # Imports torch-free readers only.
    hf_config = json.loads(files.read_text(files.join(config.model.init_hf_checkpoint,
                                                      "config.json")))
    model_config = hf.config_from_hf(hf_config, source=config.model.init_hf_checkpoint)
  else:
    return presets.get(config.model.preset, **{**dict(config.model.overrides), **numerics})
  stage_vocab.check_overrides(config.model, model_config, source)
  if config.model.reinit_embeddings and vocabulary is not None:
    model_config = stage_vocab.with_vocabulary(model_config, vocabulary)
  return model_config.replace(**numerics)


def model_source(config: TrainConfig, model_dir: str) -> str:
  """Where `model_config_for` takes the architecture from (for error messages)."""
  for directory in (model_dir, config.model.init_checkpoint):
    path = os.path.join(directory or "", checkpoint_io.MODEL_CONFIG_FILE)
    if directory and files.exists(path):
      return path
  if config.model.init_hf_checkpoint:
    return os.path.join(config.model.init_hf_checkpoint, "config.json")
  return f"preset {config.model.preset!r} (ModelSettings.preset, with its overrides)"


# ---------------------------------------------------------------------------------------------
# Steps.


def _loss_and_metrics(model, batch, z_loss: float, chunk_tokens: int):
  """`losses.loss_and_metrics` of the model on the batch, the head and loss in sequence
  chunks of at least `chunk_tokens` tokens a device (models/head_loss.py: no whole
  [batch, length, vocab] logits)."""
  hidden, _ = model(batch["tokens"], segment_ids_BxL=batch["segment_ids"],
                    positions_BxL=batch["positions"], return_hidden=True)
  x, head, vocab_major = model.head_operands(hidden)
  return head_loss.head_loss(x, head, batch["targets"], batch["loss_weights"],
                             vocab_major=vocab_major, z_loss=z_loss,
                             min_chunk_tokens=chunk_tokens)


def make_train_step(runtime: program_lib.Program, graphdef, tx: optax.GradientTransformation,
                    z_loss: float, state_shardings, batch_sharding, chunk_tokens: int, *,
                    dtype=jnp.float32, stacked: bool = False) -> program_lib.MeshJit:
  """jit(state, batch) -> (state, metrics) on `runtime`'s mesh, state donated, shardings
  explicit, compiled with the backend's options for a training step computing in `dtype`.

  `stacked`: jit(state, batches) -> (state, metrics) instead, `batches` holding several
  batches along a leading axis, run in order as a `lax.scan` over the one-step function
  (metrics stacked the same way; each count of batches compiles once). One call then runs
  several steps, as Keras's `steps_per_execution` or TPUEstimator's `iterations_per_loop`: the
  host dispatches once per call, and scratch memory is set up once per call, not per step.
  """

  def step_fn(state, batch):
    def loss_fn(params):
      return _loss_and_metrics(nnx.merge(graphdef, params), batch, z_loss, chunk_tokens)

    (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    grad_norm = optax.tree.norm(grads)
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
    return new_state, {"loss": loss, "grad_norm": grad_norm,
                       "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm), **sums}

  fn = (lambda state, batches: jax.lax.scan(step_fn, state, batches)) if stacked else step_fn
  return runtime.jit(fn, program=backend.TRAIN, dtype=dtype,
                     in_shardings=(state_shardings, batch_sharding),
                     out_shardings=(state_shardings, runtime.replicated), donate_argnums=0)


def make_eval_step(runtime: program_lib.Program, graphdef, param_shardings, batch_sharding,
                   chunk_tokens: int, *, dtype=jnp.float32) -> program_lib.MeshJit:
  """jit(params, batch) -> metric sums on `runtime`'s mesh."""
  def eval_fn(params, batch):
    return _loss_and_metrics(nnx.merge(graphdef, params), batch, 0.0, chunk_tokens)[1]

  return runtime.jit(eval_fn, program=backend.TRAIN, dtype=dtype,
                     in_shardings=(param_shardings, batch_sharding),
                     out_shardings=runtime.replicated)


# ---------------------------------------------------------------------------------------------
# Inputs.


def seqio_batches(data: DataConfig, mesh, task: str, split: str, *, train: bool) -> BatchesFn:
  """The batches of `task`'s `split` as `data` cuts them, this process's rows."""
  import seqio  # Imports TensorFlow; only needed for seqio inputs.
  from teacherlm_jax.training import train_data
  if task == train_data.FLAN_COT_BYTES_TASK:
    train_data.register_flan_cot_bytes_task(data.resolved_data_dir())
  elif task not in seqio.TaskRegistry.names() and task not in seqio.MixtureRegistry.names():
    # The project's fixed tasks and mixtures need a vocabulary, bound in gin as
    # `register_all.vocabulary = ...` (see gin/teacher_sft.gin).
    from teacherlm_jax.data import mixtures
    try:
      mixtures.register_all()
    except (TypeError, ValueError, RuntimeError) as e:
      raise ValueError(f"seqio task or mixture {task!r} is not registered and "
                       f"teacherlm_jax.data.mixtures.register_all() failed ({e}); bind "
                       "register_all.vocabulary in the gin file or register the task "
                       "before training") from e
  return train_data.SeqioBatches(
      task, split, data.seq_len, data.batch_size, loss_on=data.loss_on, pack=data.pack,
      shuffle=train, seed=data.seed, repeat=train, input_sharding=data.input_sharding,
      process_rows=partitioning.process_batch_rows(mesh, data.batch_size),
      process_index=jax.process_index(), process_count=jax.process_count())


def _open_batches(train_batches: BatchesFn, model_dir: str, start: int, k: int, writer):
  """The train batches from step `start`: from the position saved with that checkpoint (O(1)),
  else by replaying the input pipeline up to it."""
  position = None
  if start:
    position = input_position.load(model_dir, start, jax.process_index(), jax.process_count())
  if position is not None:
    logging.info("input: continuing from the position saved at step %d", start)
    return train_batches(start * k, state=position)
  if start:
    logging.info("input: no position saved at step %d; replaying %d batches", start, start * k)
  return train_batches(start * k)


def _save_input_position(batches, model_dir: str, step: int, checkpointer) -> None:
  """Saves where the input is (when the pipeline can say) before the checkpoint of `step`."""
  state = batches.state() if hasattr(batches, "state") else None
  if state is None:
    return
  process = (jax.process_index(), jax.process_count())
  input_position.save(model_dir, step, state, *process)
  input_position.prune(model_dir, [*checkpointer.all_steps(), step], *process)


def _check_batch(batch: Dict[str, np.ndarray], config: TrainConfig, rows: int, number: int,
                 model_config: ModelConfig):
  missing = [k for k in BATCH_KEYS if k not in batch]
  if missing:
    raise ValueError(f"input batch {number} lacks {missing}; batches need {BATCH_KEYS}")
  shape = batch["tokens"].shape
  if shape != (rows, config.data.seq_len):
    raise ValueError(f"input batch {number} has shape {shape}, expected ({rows}, "
                     f"{config.data.seq_len}) = this process's rows of DataConfig.batch_size="
                     f"{config.data.batch_size} by seq_len={config.data.seq_len}")
  for key in ("tokens", "targets"):
    checkpoint_vocab.check_token_ids(
        batch[key], model_config.vocab_size, source=f"input batch {number} ({key!r})",
        model_name=(config.model.init_source
                    or f"ModelSettings.preset={config.model.preset!r}"))


# ---------------------------------------------------------------------------------------------
# Preemption.


class _Preemption:
  """SIGTERM -> save and stop. Multi-process runs agree on the step through JAX's preemption
  sync point (jax.distributed installs the notifier); one process uses a signal handler."""

  def __init__(self):
    self.requested = False
    self._previous = None
    self._installed = False
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      self._installed = True

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # No preemption sync manager in this JAX set-up.
        return False
    return self.requested

  def restore(self):
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)


# ---------------------------------------------------------------------------------------------
# The loop.


class Program(NamedTuple):
  """Everything compiled for one (model, optimizer, mesh): built once per process."""
  tx: optax.GradientTransformation
  schedule: Callable
  param_sh: Any
  opt_sh: Any
  state_sh: Any
  abstract_state: Any
  init_params: Callable
  init_opt_state: Callable
  train_step: Callable
  eval_step: Callable
  train_steps: Callable  # `train_step` over batches stacked along a leading axis.

  def fresh_state(self, params) -> Dict[str, Any]:
    """The train state at step 0 for `params`, every leaf placed as `train_step` returns it.

    The step counter is placed in its sharding like the step's own output: an uncommitted
    `jnp.zeros` traces and compiles the train step a second time on its second call.
    """
    return {"params": params, "opt_state": self.init_opt_state(params),
            "step": jax.device_put(jnp.zeros((), jnp.int32), self.state_sh["step"])}


def _schedule_steps(config: TrainConfig) -> int:
  # A constant schedule does not depend on the run length: runs of different lengths (and
  # later stages) then share one compiled program.
  return 1 if config.optimizer.schedule == "constant" else config.num_steps


def program_for(config: TrainConfig, model_config: ModelConfig, mesh) -> Program:
  """What `train` compiles for `config`'s run of `model_config` on `mesh` (its steps,
  shardings and initialisers); runs with the same settings in one process share it."""
  program = _program(model_config, config.optimizer, _schedule_steps(config), config.z_loss,
                     mesh, config.loss_chunk_tokens)
  seed = np.int32(config.seed)
  return program._replace(init_params=lambda: program.init_params(seed))


# Not keyed by the seed (an argument of init_params): runs differing only in their seed, e.g.
# the pipeline's students, share one compile.
@functools.lru_cache(maxsize=8)
def _program(model_config: ModelConfig, optimizer: OptimizerConfig, schedule_steps: int,
             z_loss: float, mesh, chunk_tokens: int) -> Program:
  runtime = program_lib.Program(mesh)
  tx, schedule = optimizer_lib.make_optimizer(optimizer, schedule_steps)
  model_fn = lambda seed: transformer.DecoderLM(model_config,
                                                rngs=nnx.Rngs(jax.random.key(seed)))
  graphdef, abstract_params = runtime.split(nnx.eval_shape(model_fn, 0))
  param_sh = jax.tree.map(lambda x: x.sharding, abstract_params)
  replicated = runtime.replicated
  opt_sh = optimizer_lib.state_shardings(tx, abstract_params, param_sh, replicated)
  state_sh = {"params": param_sh, "opt_state": opt_sh, "step": replicated}
  abstract_state = {"params": abstract_params,
                    "opt_state": jax.eval_shape(tx.init, abstract_params),
                    "step": jax.ShapeDtypeStruct((), jnp.int32)}
  batch_sh = {key: partitioning.batch_sharding(mesh, 2) for key in BATCH_KEYS}
  # Each device computes only its own shards: a model larger than one device never exists
  # whole. Compiled on first use (a restored run never needs it).
  init_params = runtime.jit(lambda seed: nnx.to_pure_dict(nnx.split(model_fn(seed))[1]),
                            program=backend.INIT, out_shardings=param_sh)

  dtype = model_config.compute_dtype
  make_step = functools.partial(make_train_step, runtime, graphdef, tx, z_loss, state_sh,
                                chunk_tokens=chunk_tokens, dtype=dtype)
  stacked_batch_sh = {key: partitioning.batch_sharding(mesh, 3, stacked=True)
                      for key in BATCH_KEYS}
  return Program(
      tx=tx, schedule=schedule, param_sh=param_sh, opt_sh=opt_sh, state_sh=state_sh,
      abstract_state=abstract_state, init_params=init_params,
      init_opt_state=jax.jit(tx.init, out_shardings=opt_sh),
      train_step=make_step(batch_sh),
      eval_step=make_eval_step(runtime, graphdef, param_sh, batch_sh, chunk_tokens, dtype=dtype),
      train_steps=make_step(stacked_batch_sh, stacked=True))


def abstract_batch(config: TrainConfig, mesh) -> Dict[str, jax.ShapeDtypeStruct]:
  """One microbatch as the train step takes it, shapes and shardings only (AOT compiles)."""
  sharding = partitioning.batch_sharding(mesh, 2)
  dtype = lambda key: jnp.float32 if key == "loss_weights" else jnp.int32
  return {key: jax.ShapeDtypeStruct((config.data.batch_size, config.data.seq_len), dtype(key),
                                    sharding=sharding) for key in BATCH_KEYS}


def abstract_state(program: Program) -> Dict[str, Any]:
  """The train state as `program.train_step` takes it, shapes and shardings only."""
  return _with_shardings(program.abstract_state, program.state_sh)


def _with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def _first_non_finite(finite_flags: List[jax.Array], first_step: int) -> Optional[int]:
  flags = np.asarray(jax.device_get(finite_flags)) if finite_flags else np.ones(0, bool)
  bad = np.flatnonzero(~flags)
  return None if bad.size == 0 else first_step + int(bad[0])


def _restore_newest_good(config: TrainConfig, program: Program, checkpointer):
  """(state, step) of the newest checkpoint that restores and passes verification, or None
  when there is none. Newer steps that fail are reported, then moved to damaged_checkpoints/
  (so the run can save those step numbers again) once an older step proved good."""
  k = config.optimizer.grad_accum_steps
  abstract = _with_shardings(program.abstract_state, program.state_sh)
  failed = []
  for step in sorted(checkpointer.all_steps(), reverse=True):
    try:
      state = checkpointer.restore(step, abstract)
    except checkpointing.CheckpointError as e:  # Damaged bytes or an unreadable step dir.
      logging.warning("skipping checkpoint step %d: %s", step, e)
      failed.append((step, e))
      continue
    if int(state["step"]) != step * k:
      raise checkpointing.CheckpointError(
          f"{checkpointer.step_dir(step)}: holds microbatch {int(state['step'])}, expected "
          f"{step * k} for grad_accum_steps={k}; resume with the grad_accum_steps it was "
          "written with")
    for bad_step, error in failed:
      moved = checkpointer.set_aside(bad_step)
      logging.warning("moved damaged step %d to %s (%s)", bad_step, moved,
                      type(error).__name__)
    skipped = (f", skipping damaged step(s) {[s for s, _ in failed]}" if failed else "")
    verified = ("verified" if step in checkpointer.verified_steps
                else "not verified: saved without checksums")
    logging.info("resuming from %s (%s)%s", checkpointer.step_dir(step), verified, skipped)
    return state, step
  if failed:  # Every step failed: likely this run's settings, not damage; nothing is moved.
    raise failed[0][1]
  return None


def _initial_state(config: TrainConfig, program: Program, checkpointer):
  """(state, start step): the newest good checkpoint of this run, else a fresh state
  initialised from a previous stage, an HF checkpoint, or random (directly in its shards)."""
  restored = _restore_newest_good(config, program, checkpointer)
  if restored is not None:
    return restored
  if config.model.init_checkpoint:
    params = checkpointing.restore_params(
        config.model.init_checkpoint,
        _with_shardings(program.abstract_state["params"], program.param_sh))
    logging.info("initialised params from %s", config.model.init_checkpoint)
  elif config.model.reinit_embeddings and config.model.init_source:
    source = config.model.init_source
    pretrained = nnx.to_pure_dict(nnx.state(checkpoint_io.load_any(source), nnx.Param))
    params = jax.device_put(stage_vocab.with_fresh_embeddings(
        pretrained, jax.device_get(program.init_params())), program.param_sh)
    logging.info("initialised params from %s, vocabulary-shaped ones afresh", source)
  elif config.model.init_hf_checkpoint:
    from teacherlm_jax.models import hf
    _, hf_model = hf.import_checkpoint(files.local_copy(config.model.init_hf_checkpoint),
                                       dtype=config.model.compute_dtype, param_dtype="float32")
    params = jax.device_put(nnx.to_pure_dict(nnx.state(hf_model, nnx.Param)), program.param_sh)
    logging.info("initialised params from HF checkpoint %s", config.model.init_hf_checkpoint)
  else:
    params = program.init_params()
  return program.fresh_state(params), 0


class _Evaluator:
  """Mean loss/accuracy over the first `eval_batches` batches of the held-out split (read
  once and kept on device: they are few and fixed)."""

  def __init__(self, config: TrainConfig, batches: Optional[BatchesFn], eval_step, mesh,
               writer):
    self.config, self.batches, self.eval_step = config, batches, eval_step
    self.mesh, self.writer = mesh, writer
    self._cached = None

  def __call__(self, params, step: int) -> Optional[dict]:
    if self.batches is None:
      return None
    if self._cached is None:
      self._cached = []
      for batch in self.batches(0):
        if len(self._cached) == self.config.eval_batches:
          break
        self._cached.append(partitioning.shard_batch(
            {key: batch[key] for key in BATCH_KEYS}, self.mesh, self.config.data.batch_size))
      if not self._cached:
        raise ValueError(f"eval split {self.config.data.eval_split!r} gave no batch of "
                         f"{self.config.data.batch_size}x{self.config.data.seq_len}; check "
                         "DataConfig.eval_task/eval_split or set eval_batches=0")
    sums = [self.eval_step(params, batch) for batch in self._cached]
    total = jax.tree.map(lambda *x: np.sum(x), *jax.device_get(sums))
    result = metrics_lib.mean_of(total, len(sums))
    self.writer.write_scalars(step, {f"eval/{name}": value for name, value in result.items()})
    return result


class _FiniteGuard:
  """Collects the per-microbatch `finite` flags on device and fetches them only before a log
  or a save, so a NaN/Inf stops the run before anything non-finite is written.

  `last_saved` is the newest checkpoint and `verified` whether its checksums were checked on
  restore; a step this run saves is checked when it is next restored, and the message says so
  rather than calling an unchecked step good.
  """

  def __init__(self, first_microbatch: int, last_saved: Optional[int], k: int, directory: str,
               verified: bool = False):
    self.flags: List[jax.Array] = []
    self.first = first_microbatch
    self.last_saved, self.k, self.directory = last_saved, k, directory
    self.verified = verified

  def saved(self, step: int):
    self.last_saved, self.verified = step, False

  def _checkpoint_note(self) -> str:
    if self.last_saved is None:
      return "This run has no checkpoint yet."
    where = f"step {self.last_saved} in {self.directory}"
    if self.verified:
      return f"The newest checkpoint, {where}, passed checksum verification when it was restored."
    return (f"The newest checkpoint is {where}, saved from finite values; it is verified "
            "against its checksums when it is restored.")

  def check(self):
    bad = _first_non_finite(self.flags, self.first)
    if bad is not None:
      raise FloatingPointError(
          f"loss or gradient became NaN/Inf at step {bad // self.k + 1} (microbatch {bad}, "
          f"counted from 0); training stopped there without saving it. "
          f"{self._checkpoint_note()} Lower OptimizerConfig.learning_rate, set clip_norm, use "
          "compute_dtype='float32', or inspect that batch")
    self.first += len(self.flags)
    self.flags = []


def _call_fits(step: int, n: int, config: TrainConfig) -> bool:
  """Whether steps step+1 .. step+n can run in one call: none of them but the last ends a
  log, eval or checkpoint period, and the last is at most num_steps."""
  periods = [config.logging.every, config.checkpoint.every] + (
      [config.eval_every] if config.eval_every else [])
  return step + n <= config.num_steps and all(
      (step + n - 1) // p == step // p for p in periods)


def train(config: TrainConfig, model_dir: str, *, train_batches: Optional[BatchesFn] = None,
          eval_batches: Optional[BatchesFn] = None) -> dict:
  """Runs (or resumes) training in `model_dir`.

  Args:
    config: the run.
    model_dir: checkpoints, tensorboard/ (the metrics) and the saved configs.
    train_batches, eval_batches: override the seqio inputs of `config` (tests, benchmarks).

  Returns:
    {'step': last optimizer step, 'losses': per-microbatch losses of this invocation,
     'eval': last eval metrics, 'preempted': bool, 'state': final state, 'start_step': int}.
  """
  if train_batches is None and not config.data.train_task:
    raise ValueError("DataConfig.train_task is empty: set it to a registered seqio task or "
                     "mixture (e.g. in the gin file), or pass scripts/train.py "
                     "--input=<annotation directory>")
  mesh = config.mesh.make()
  partitioning.check_batch_divides(config.data.batch_size, mesh, what="DataConfig.batch_size")
  rows = partitioning.process_batch_rows(mesh, config.data.batch_size)
  vocabulary = None
  if train_batches is None:
    train_batches = seqio_batches(config.data, mesh, config.data.train_task,
                                  config.data.train_split, train=True)
    vocabulary = stage_vocab.task_vocabulary(config.data.train_task)
  resuming = files.exists(files.join(model_dir, checkpoint_io.MODEL_CONFIG_FILE))
  model_config = model_config_for(config, model_dir, vocabulary)
  if vocabulary is not None:
    from teacherlm_jax.training import train_data
    train_data.check_vocabulary(config.data.train_task, model_config.vocab_size,
                                model_source(config, model_dir))
    stage_vocab.check_and_save(config.model, model_config, vocabulary, model_dir,
                               resuming=resuming, task_name=config.data.train_task,
                               write=jax.process_index() == 0)
  k = config.optimizer.grad_accum_steps
  program = program_for(config, model_config, mesh)
  eval_task = config.data.eval_task or config.data.train_task
  if eval_batches is None and eval_task and config.eval_batches:
    eval_batches = seqio_batches(config.data, mesh, eval_task, config.data.eval_split, train=False)

  checkpointer = checkpointing.Checkpointer(model_dir, config.checkpoint.keep,
                                            config.checkpoint.async_save)
  writer = metrics_lib.create_writer(model_dir, config.logging.tensorboard)
  preemption = None
  try:
    state, start = _initial_state(config, program, checkpointer)
    if jax.process_index() == 0:  # Shared files: process 0 only.
      checkpoint_io.write_model_config(
          model_config, files.join(model_dir, checkpoint_io.MODEL_CONFIG_FILE))
      files.write_atomic(files.join(model_dir, TRAIN_CONFIG_FILE),
                         json.dumps(config.to_dict(), indent=1))
    evaluate = _Evaluator(config, eval_batches, program.eval_step, mesh, writer)
    device = mesh.devices.flat[0]
    peak = mfu.peak_flops_per_device(device.device_kind, device.platform,
                                     override_tflops=config.logging.peak_tflops_per_device)
    if peak is None:
      logging.warning("no MFU: %r has no vendor peak in runtime/chips.py; set "
                      "LoggingConfig.peak_tflops_per_device", device.device_kind)
    # Steps/s, tokens/s, TFLOP/s and MFU at each log step, timed from the first step's end.
    report_progress = mfu.ReportThroughput(
        num_train_steps=config.num_steps, writer=writer, every_steps=config.logging.every,
        every_secs=None, tokens_per_step=config.data.batch_size * config.data.seq_len * k,
        flops_per_token=mfu.flops_per_token(model_config, config.data.seq_len),
        num_devices=mesh.devices.size, peak_flops_per_device=peak)
    writer.write_hparams(metrics_lib.hparams(config.flat()))
    logging.info("model %s %.1fM params, mesh %s, %d process(es), steps %d->%d, peak %s "
                 "TFLOP/s per device (%s)", model_config.family,
                 model_config.num_params() / 1e6, partitioning.mesh_shape(mesh),
                 jax.process_count(), start, config.num_steps,
                 "?" if peak is None else f"{peak / 1e12:.3f}", device.device_kind)

    resumed = start if checkpointer.latest_step() is not None else None
    guard = _FiniteGuard(start * k, resumed, k, checkpointer.directory,
                         verified=start in checkpointer.verified_steps)
    preemption = _Preemption()
    losses: List[jax.Array] = []
    window: List[dict] = []
    eval_result, preempted, step = None, False, start
    batches = _open_batches(train_batches, model_dir, start, k, writer)

    def save(at: int):
      guard.check()
      with report_progress.timed("checkpoint", wait_jax_async_dispatch=False):
        _save_input_position(batches, model_dir, at, checkpointer)
        checkpointer.save(at, state)
        writer.flush()  # On gs://, the event files reach the bucket here (metrics.py).
      guard.saved(at)

    def next_batch(number: int) -> dict:
      try:
        batch = next(batches)
      except StopIteration:
        raise ValueError(f"train input ran out at batch {number}; use a repeating dataset "
                         "or fewer num_steps") from None
      _check_batch(batch, config, rows[1] - rows[0], number, model_config)
      return {key: batch[key] for key in BATCH_KEYS}

    while step < config.num_steps:
      n = config.steps_per_call
      if n == 1 or not _call_fits(step, n, config):
        n, per_micro = 1, []
        for micro in range(k):
          global_batch = partitioning.shard_batch(next_batch(step * k + micro), mesh,
                                                  config.data.batch_size)
          state, step_metrics = program.train_step(state, global_batch)
          per_micro.append(step_metrics)
      else:  # One call of n optimizer steps = n * k microbatches, stacked in order.
        local = [next_batch(step * k + micro) for micro in range(n * k)]
        stacked = {key: np.stack([b[key] for b in local]) for key in BATCH_KEYS}
        state, step_metrics = program.train_steps(
            state, partitioning.shard_batch(stacked, mesh, config.data.batch_size, stacked=True))
        per_micro = [jax.tree.map(lambda x, i=i: x[i], step_metrics) for i in range(n * k)]
      for micro_metrics in per_micro:
        losses.append(micro_metrics["loss"])
        guard.flags.append(micro_metrics["finite"])
        window.append(micro_metrics)
      if step == start:  # Compilation ends here: the progress clock starts after it.
        jax.block_until_ready(step_metrics)
      step += n
      # A collective in multi-process runs: every process calls it once per step, in order.
      preempted = any([preemption.reached(s) for s in range(step - n + 1, step + 1)])
      if step % config.logging.every == 0 or step == config.num_steps or preempted:
        guard.check()
        fetched = jax.device_get(window)  # Waits for the steps: the progress report's clock.
        total = jax.tree.map(lambda *x: np.sum(x), *fetched)
        scalars = metrics_lib.mean_of(total, len(fetched))
        scalars["grad_norm"] = float(np.mean([m["grad_norm"] for m in fetched]))
        scalars["learning_rate"] = float(program.schedule(step - 1))
        writer.write_scalars(step, {f"train/{name}": value for name, value in scalars.items()})
        window = []
      for done in range(step - n + 1, step + 1):  # clu's actions expect every step number.
        report_progress(done)
      if preempted:  # Logged above, so the metrics hold every step the checkpoint has.
        save(step)
        checkpointer.wait()
        logging.warning("preempted (SIGTERM): saved checkpoint at step %d in %s", step,
                        checkpointer.directory)
        break
      if config.eval_every and step % config.eval_every == 0 and step != config.num_steps:
        with report_progress.timed("eval", wait_jax_async_dispatch=False):
          eval_result = evaluate(state["params"], step)
      if step % config.checkpoint.every == 0 or step == config.num_steps:
        save(step)
    if not preempted:
      eval_result = evaluate(state["params"], step) or eval_result
  finally:
    if preemption is not None:
      preemption.restore()
    writer.close()
    checkpointer.close()  # Lets pending async saves commit, also on errors.
  return {"step": step, "start_step": start, "preempted": preempted, "eval": eval_result,
          "losses": np.asarray(jax.device_get(losses), np.float64), "state": state}
