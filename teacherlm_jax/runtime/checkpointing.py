"""Orbax checkpoints of the train state: async saves, keep-N, restore into sharded state.

A checkpoint at step S holds four items: `params`, `opt_state`, `step` and `checksums` (of
every array of the other three, `checksums.py`), saved together, so a step that exists holds
the checksums of its own arrays. Every restore verifies them: a step whose bytes changed on
disk is a `CorruptCheckpointError` naming its path, never a silently wrong model. Later stages
initialise from `params` alone (`restore_params`, verified the same way). Every method is
called on every process (orbax coordinates the writes). Paths may be local or gs://; the
trainer keeps the input position of each step beside it (`training/input_position.py`).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging

from teacherlm_jax.runtime import checksums
from teacherlm_jax.storage import files

CHECKPOINT_SUBDIR = "checkpoints"
# Damaged steps are moved here (out of orbax's sight) when training falls back past them.
DAMAGED_SUBDIR = "damaged_checkpoints"
ARRAY_ITEMS = ("params", "opt_state", "step")
CHECKSUMS_ITEM = "checksums"
ITEMS = ARRAY_ITEMS + (CHECKSUMS_ITEM,)


class CheckpointError(ValueError):
  """A checkpoint directory that cannot be used; the message says what to change."""


class CorruptCheckpointError(CheckpointError):
  """A checkpoint whose arrays differ from the checksums saved with them."""


def _json_checkpointer():
  return ocp.Checkpointer(ocp.JsonCheckpointHandler())


def read_checksums(item_dir: str) -> Optional[Dict[str, Dict[str, str]]]:
  """The checksums item of a step (None for a step written before checksums existed)."""
  if not files.resolve(item_dir).is_dir():
    return None
  try:
    return _json_checkpointer().restore(item_dir)
  except Exception as e:  # A damaged checksums file is a damaged step.
    raise CorruptCheckpointError(f"{item_dir}: checksums cannot be read ({e})") from e


def verify(tree: Any, saved: Optional[Dict[str, str]], where: str, item: str) -> bool:
  """Raises CorruptCheckpointError naming `where` when `tree` differs from its checksums;
  False when there are none to check (a step saved before checksums existed)."""
  if saved is None:
    logging.warning("%s: no checksums saved with this step; %s not verified", where, item)
    return False
  bad = checksums.mismatches(saved, tree)
  if bad:
    shown = ", ".join(f"{item}{path}" for path in bad[:3]) + (" ..." if len(bad) > 3 else "")
    raise CorruptCheckpointError(
        f"{where}: checkpoint fails verification: {len(bad)} of {len(saved)} {item} arrays "
        f"differ from the checksums saved with them ({shown}); its files changed after they "
        "were written (disk or copy damage). Use an earlier step, or restore the files from a "
        "good copy")
  return True


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
  """Checkpoints under `<model_dir>/checkpoints/<step>/{params,opt_state,step}`."""

  def __init__(self, model_dir: str, keep: int = 3, async_save: bool = True):
    self.directory = files.join(model_dir, CHECKPOINT_SUBDIR)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
    self.verified_steps = set()  # Steps restored here whose checksums matched.

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def save(self, step: int, state: dict):
    """Starts an async save of `state` (dict with 'params', 'opt_state', 'step') with the
    checksums of its arrays, computed now on device (only the sums come to the host)."""
    items = {**state, "step": {"step": state["step"]}}  # Orbax saves trees, not scalars.
    sums = {name: checksums.of_tree(items[name]) for name in ARRAY_ITEMS}
    self._manager.save(step, args=ocp.args.Composite(
        **{name: ocp.args.StandardSave(items[name]) for name in ARRAY_ITEMS},
        **{CHECKSUMS_ITEM: ocp.args.JsonSave(sums)}), force=True)

  def wait(self):
    self._manager.wait_until_finished()

  def step_dir(self, step: int) -> str:
    return files.join(self.directory, str(step))

  def restore(self, step: int, abstract_state: dict) -> dict:
    """Restores every item into `abstract_state` (ShapeDtypeStructs with shardings) and
    verifies it against the step's checksums (CorruptCheckpointError names the step)."""
    where = self.step_dir(step)
    abstract = {**abstract_state, "step": {"step": abstract_state["step"]}}
    saved = read_checksums(files.join(where, CHECKSUMS_ITEM))
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          **{name: ocp.args.StandardRestore(abstract[name]) for name in ARRAY_ITEMS}))
    except Exception as e:  # orbax raises many types for unreadable or mismatched data
      raise CheckpointError(
          f"{where}: checkpoint cannot be restored ({type(e).__name__}: "
          f"{str(e)[:300]}); delete that step directory to resume from an earlier step, or "
          "point --model_dir at a fresh directory") from e
    verified = all([verify(restored[name], saved and saved.get(name), where, name)
                    for name in ARRAY_ITEMS])
    if verified:
      self.verified_steps.add(step)
    return {"params": restored["params"], "opt_state": restored["opt_state"],
            "step": restored["step"]["step"]}

  def set_aside(self, step: int) -> str:
    """Moves a damaged step out of the checkpoint directory (kept for inspection), so that
    training can save that step number again; returns where it went."""
    target = os.fspath(files.resolve(self.directory).parent / DAMAGED_SUBDIR / str(step))
    if jax.process_index() == 0:
      files.remove_tree(target)
      files.move_tree(self.step_dir(step), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"set_aside_{step}")
    self._manager.reload()
    return target

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def resolve_checkpoint(path: str):
  """(checkpoints dir, step) for a model_dir, its `checkpoints/` dir, or one step dir."""
  path = files.resolve(path)
  for directory in (path / CHECKPOINT_SUBDIR, path):
    if directory.is_dir():
      steps = sorted(int(p.name) for p in directory.iterdir()
                     if p.name.isdigit() and p.is_dir())
      if steps:
        return os.fspath(directory), steps[-1]
  if path.name.isdigit() and path.is_dir():
    return os.fspath(path.parent), int(path.name)
  raise CheckpointError(f"{path}: no checkpoint found (expected a model_dir with "
                        f"'{CHECKPOINT_SUBDIR}/<step>/params' or a step directory)")


def restore_params(path: str, abstract_params: Any) -> Any:
  """Params of another run's checkpoint (a previous stage), placed as `abstract_params` says
  and verified against the step's checksums."""
  directory, step = resolve_checkpoint(path)
  step_dir = files.join(directory, str(step))
  params_dir = files.join(step_dir, "params")
  if not files.resolve(params_dir).is_dir():
    raise CheckpointError(f"{params_dir}: missing; is {path} a teacherlm_jax checkpoint?")
  saved = read_checksums(files.join(step_dir, CHECKSUMS_ITEM))
  params = restore_params_dir(params_dir, abstract_params)
  verify(params, saved and saved.get("params"), step_dir, "params")
  return params


def restore_params_dir(params_dir, abstract_params: Any) -> Any:
  """An orbax params tree from `params_dir`, placed as `abstract_params` says (unverified)."""
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      return checkpointer.restore(params_dir, abstract_params)
  except Exception as e:
    raise CheckpointError(f"{params_dir}: cannot restore params into this model "
                          f"({type(e).__name__}: {str(e)[:300]}); check that the model preset "
                          "matches the previous stage's") from e


def save_checksums(params: Any, item_dir) -> None:
  """Writes the checksums of a params tree saved next to `item_dir` (every process calls)."""
  _json_checkpointer().save(item_dir, {"params": checksums.of_tree(params)}, force=True)
