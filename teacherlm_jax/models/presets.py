"""Model presets: JSON files of `ModelConfig` fields under the repository's `configs/models/`.

`get(name)` takes a preset name (`bloom-7b1`, `opt-1.3b`, `tiny-bloom`, ...) or a path to a JSON
file of the same form, so a new size is a new file, not a code edit. `$TEACHERLM_CONFIGS_DIR`
points elsewhere when the package is installed without the repository beside it.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Dict, List

from teacherlm_jax.models.config import ModelConfig


def configs_dir() -> pathlib.Path:
  default = pathlib.Path(__file__).resolve().parents[2] / "configs"
  return pathlib.Path(os.environ.get("TEACHERLM_CONFIGS_DIR", default))


def names() -> List[str]:
  """Every preset name (the file stems of configs/models/*.json)."""
  return sorted(p.stem for p in (configs_dir() / "models").glob("*.json"))


def _read(path: pathlib.Path) -> Dict:
  try:
    fields = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}:{e.lineno}: invalid JSON in model preset: {e.msg}") from e
  if not isinstance(fields, dict):
    raise ValueError(f"{path}: a model preset is a JSON object of ModelConfig fields")
  return fields


def get(name: str, **overrides) -> ModelConfig:
  """Returns the preset `name` (or the JSON file at that path), fields replaced by `overrides`."""
  path = pathlib.Path(name)
  if path.suffix != ".json":
    path = configs_dir() / "models" / f"{name}.json"
    if not path.exists():
      raise ValueError(f"unknown model preset {name!r} (no {path}); known presets: {names()}")
  elif not path.exists():
    raise ValueError(f"model preset file {path} does not exist")
  fields = _read(path)
  try:
    return ModelConfig(**{**fields, **overrides})
  except TypeError as e:
    raise ValueError(f"{path}: {e}") from e
