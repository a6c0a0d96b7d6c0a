"""Standalone parameter checkpoints: orbax params + their checksums + `model_config.json`.

This is the hand-off format between stages (an imported HF teacher, a finished teacher stage,
a student to evaluate). Training checkpoints with optimizer state and data position are the
trainer's (`checkpointing.py`); `load_model` reads either layout, so every consumer (annotation,
evaluation, export) takes "a model directory" without caring which stage wrote it. Both
layouts are verified against the checksums saved with the params, so a damaged model is refused
(`checkpointing.CorruptCheckpointError`, naming the directory) before anything uses it.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Optional

import jax
import orbax.checkpoint as ocp
from flax import nnx

from teacherlm_jax.models.config import ModelConfig
from teacherlm_jax.models.transformer import DecoderLM
from teacherlm_jax.runtime import checkpointing
from teacherlm_jax.storage import files

MODEL_CONFIG_FILE = "model_config.json"


def write_model_config(config: ModelConfig, path) -> None:
  files.write_atomic(path, json.dumps(dataclasses.asdict(config), indent=2, sort_keys=True))


def read_model_config(path) -> ModelConfig:
  path = files.resolve(path)
  if path.is_dir():
    path = path / MODEL_CONFIG_FILE
  try:
    fields = json.loads(path.read_text())
  except FileNotFoundError as e:
    raise ValueError(f"{path}: model config not found") from e
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"{path}: unknown ModelConfig fields {unknown}")
  return ModelConfig(**fields)


def save_params(model: DecoderLM, directory) -> files.Path:
  """Saves the model's params (orbax, under `params/`) and its config (every process calls)."""
  directory = files.resolve(directory)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory / "params", params, force=True)
  checkpointer.wait_until_finished()
  checkpointing.save_checksums(params, directory / checkpointing.CHECKSUMS_ITEM)
  if jax.process_index() == 0:
    write_model_config(model.config, directory / MODEL_CONFIG_FILE)
  return directory


def _abstract_target(config: ModelConfig, shardings):
  """(abstract model, its Param state, restore target: pure dict of sharded ShapeDtypeStructs)."""
  abstract = nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))
  params_state = nnx.state(abstract, nnx.Param)
  target = nnx.to_pure_dict(params_state)
  if shardings is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: sharding, target)
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        target, shardings)
  return abstract, params_state, target


def _filled(abstract: DecoderLM, params_state, restored) -> DecoderLM:
  nnx.replace_by_pure_dict(params_state, restored)
  nnx.update(abstract, params_state)
  return abstract


def restore_params(config: Optional[ModelConfig], directory, *, shardings=None) -> DecoderLM:
  """Restores a DecoderLM saved by `save_params` (config read from the directory if None).

  `shardings`: optional pytree of `jax.sharding.Sharding` matching the pure param dict, so that
  each process reads only its shards.
  """
  directory = files.resolve(directory)
  if config is None:
    config = read_model_config(directory)
  if not (directory / "params").exists():
    raise ValueError(f"{directory}: no params/ checkpoint (expected the output of save_params)")
  abstract, params_state, target = _abstract_target(config, shardings)
  saved = checkpointing.read_checksums(str(directory / checkpointing.CHECKSUMS_ITEM))
  restored = checkpointing.restore_params_dir(directory / "params", target)
  checkpointing.verify(restored, saved and saved.get("params"), str(directory), "params")
  return _filled(abstract, params_state, restored)


def load_model(directory, *, dtype: Optional[str] = None, shardings=None) -> DecoderLM:
  """A DecoderLM from a params directory (`save_params`) or a trainer model_dir (its latest
  checkpoint); the architecture comes from the directory's model_config.json."""
  directory = files.resolve(directory)
  config = read_model_config(directory)
  if dtype is not None:
    config = config.replace(dtype=dtype)
  if (directory / "params").exists():
    return restore_params(config, directory, shardings=shardings)
  abstract, params_state, target = _abstract_target(config, shardings)
  return _filled(abstract, params_state, checkpointing.restore_params(str(directory), target))


def is_hf_directory(directory) -> bool:
  """Whether `directory` is an HF checkpoint (its config.json at the top)."""
  return (files.resolve(directory) / "config.json").exists()


def load_any(directory, *, dtype: Optional[str] = None) -> DecoderLM:
  """A DecoderLM from any model directory: ours (model_config.json: a params directory or a
  trainer model_dir, see `load_model`) or an HF checkpoint directory (config.json + weights)."""
  directory = files.resolve(directory)
  if (directory / MODEL_CONFIG_FILE).exists():
    return load_model(directory, dtype=dtype)
  if is_hf_directory(directory):
    from teacherlm_jax.models import hf  # pylint: disable=g-import-not-at-top
    # transformers opens local files only: a gs:// checkpoint is read through a local copy.
    return hf.import_checkpoint(files.local_copy(directory), dtype=dtype or "float32")[1]
  raise ValueError(f"{directory}: neither a teacherlm_jax model directory ({MODEL_CONFIG_FILE}) "
                   "nor an HF checkpoint (config.json); pass a trainer model_dir, a params "
                   "directory or an HF directory")
