"""Orbax checkpoints of the train state: async saves, keep-N, restore into sharded state.

A checkpoint at step S holds three items: `params`, `opt_state` and `step`. Later stages
initialise from `params` alone (`restore_params`). Every method is called on every process
(orbax coordinates the writes); the data position is a function of the step, so nothing about
the input pipeline is stored.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

CHECKPOINT_SUBDIR = "checkpoints"
ITEMS = ("params", "opt_state", "step")


class CheckpointError(ValueError):
  """A checkpoint directory that cannot be used; the message says what to change."""


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
  """Checkpoints under `<model_dir>/checkpoints/<step>/{params,opt_state,step}`."""

  def __init__(self, model_dir: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(model_dir, CHECKPOINT_SUBDIR))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def save(self, step: int, state: dict):
    """Starts an async save of `state` (dict with 'params', 'opt_state', 'step')."""
    items = {**state, "step": {"step": state["step"]}}  # Orbax saves trees, not scalars.
    self._manager.save(step, args=ocp.args.Composite(
        **{name: ocp.args.StandardSave(items[name]) for name in ITEMS}), force=True)

  def wait(self):
    self._manager.wait_until_finished()

  def restore(self, step: int, abstract_state: dict) -> dict:
    """Restores every item into `abstract_state` (ShapeDtypeStructs with shardings)."""
    abstract = {**abstract_state, "step": {"step": abstract_state["step"]}}
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          **{name: ocp.args.StandardRestore(abstract[name]) for name in ITEMS}))
    except Exception as e:  # orbax raises many types for unreadable or mismatched data
      raise CheckpointError(
          f"{self.directory}/{step}: checkpoint cannot be restored ({type(e).__name__}: "
          f"{str(e)[:300]}); delete that step directory to resume from an earlier step, or "
          "point --model_dir at a fresh directory") from e
    return {"params": restored["params"], "opt_state": restored["opt_state"],
            "step": restored["step"]["step"]}

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def resolve_checkpoint(path: str):
  """(checkpoints dir, step) for a model_dir, its `checkpoints/` dir, or one step dir."""
  path = os.path.abspath(path)
  candidates = [os.path.join(path, CHECKPOINT_SUBDIR), path]
  for directory in candidates:
    if os.path.isdir(directory):
      steps = sorted(int(n) for n in os.listdir(directory)
                     if n.isdigit() and os.path.isdir(os.path.join(directory, n)))
      if steps:
        return directory, steps[-1]
  parent, name = os.path.split(path)
  if name.isdigit() and os.path.isdir(path):
    return parent, int(name)
  raise CheckpointError(f"{path}: no checkpoint found (expected a model_dir with "
                        f"'{CHECKPOINT_SUBDIR}/<step>/params' or a step directory)")


def restore_params(path: str, abstract_params: Any) -> Any:
  """Params of another run's checkpoint (a previous stage), placed as `abstract_params` says."""
  directory, step = resolve_checkpoint(path)
  params_dir = os.path.join(directory, str(step), "params")
  if not os.path.isdir(params_dir):
    raise CheckpointError(f"{params_dir}: missing; is {path} a teacherlm_jax checkpoint?")
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      return checkpointer.restore(params_dir, abstract_params)
  except Exception as e:
    raise CheckpointError(f"{params_dir}: cannot restore params into this model "
                          f"({type(e).__name__}: {str(e)[:300]}); check that the model preset "
                          "matches the previous stage's") from e
