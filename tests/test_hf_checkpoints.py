"""Checkpoint formats (safetensors, sharded index, PyTorch .bin) and bad checkpoint directories."""
import json
import shutil

import numpy as np
import pytest

import hf_peers
from teacherlm_jax.models import hf


@pytest.fixture(scope="module")
def bloom_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("bloom")
  torch_model = hf_peers.make_hf_model("bloom", directory)
  return directory, torch_model


def _copy(src, tmp_path):
  dst = tmp_path / "ckpt"
  shutil.copytree(src, dst)
  return dst


def _reference_params(directory):
  _, model = hf.import_checkpoint(directory)
  return hf.params_to_hf(model)


def test_pytorch_bin_checkpoint_imports_like_safetensors(bloom_dir, tmp_path):
  import torch
  directory, torch_model = bloom_dir
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  shutil.copy(directory / "config.json", bin_dir)
  torch.save(torch_model.state_dict(), bin_dir / "pytorch_model.bin")
  from_bin = _reference_params(bin_dir)
  from_safetensors = _reference_params(directory)
  for name, array in from_safetensors.items():
    np.testing.assert_array_equal(from_bin[name], array, err_msg=name)


def test_sharded_export_imports_identically(bloom_dir, tmp_path):
  directory, _ = bloom_dir
  _, model = hf.import_checkpoint(directory)
  sharded = hf.export_checkpoint(model, tmp_path / "sharded", max_shard_bytes=20_000)
  index = json.loads((sharded / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  again = _reference_params(sharded)
  for name, array in hf.params_to_hf(model).items():
    np.testing.assert_array_equal(again[name], array, err_msg=name)


def test_missing_tensor_is_named(bloom_dir, tmp_path):
  from safetensors.numpy import load_file, save_file
  bad = _copy(bloom_dir[0], tmp_path)
  tensors = load_file(str(bad / "model.safetensors"))
  del tensors["transformer.h.1.mlp.dense_4h_to_h.weight"]
  save_file(tensors, str(bad / "model.safetensors"))
  with pytest.raises(hf.CheckpointError, match=r"transformer\.h\.1\.mlp\.dense_4h_to_h\.weight"):
    hf.import_checkpoint(bad)


def test_wrong_shape_names_tensor_and_shapes(bloom_dir, tmp_path):
  from safetensors.numpy import load_file, save_file
  bad = _copy(bloom_dir[0], tmp_path)
  tensors = load_file(str(bad / "model.safetensors"))
  tensors["transformer.h.0.self_attention.dense.weight"] = np.zeros((48, 40), np.float32)
  save_file(tensors, str(bad / "model.safetensors"))
  with pytest.raises(hf.CheckpointError,
                     match=r"model\.safetensors: tensor 'transformer\.h\.0\.self_attention\.dense"
                     r"\.weight' has shape \(48, 40\), expected \(48, 48\)"):
    hf.import_checkpoint(bad)


def test_unknown_model_type(bloom_dir, tmp_path):
  bad = _copy(bloom_dir[0], tmp_path)
  config = json.loads((bad / "config.json").read_text())
  config["model_type"] = "gpt2"
  (bad / "config.json").write_text(json.dumps(config))
  with pytest.raises(hf.CheckpointError, match=r"config\.json: unknown model_type 'gpt2'"):
    hf.import_checkpoint(bad)


def test_corrupt_weights_file(bloom_dir, tmp_path):
  bad = _copy(bloom_dir[0], tmp_path)
  data = (bad / "model.safetensors").read_bytes()
  (bad / "model.safetensors").write_bytes(data[: len(data) // 3])
  with pytest.raises(hf.CheckpointError, match=r"model\.safetensors"):
    hf.import_checkpoint(bad)


def test_corrupt_config_json(bloom_dir, tmp_path):
  bad = _copy(bloom_dir[0], tmp_path)
  (bad / "config.json").write_text('{"model_type": "bloom",\n  "n_layer": }')
  with pytest.raises(hf.CheckpointError, match=r"config\.json:2: not valid JSON"):
    hf.import_checkpoint(bad)
