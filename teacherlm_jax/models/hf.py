"""HF checkpoints <-> our params, and tokenizers from the same local directory.

One table per family (`_bloom_table`, `_opt_table`, `_llama_table`) lists, for every HF tensor,
where it lives in our parameter tree and how its layout differs (torch Linear weights are
`out x in`; our kernels are `in x (out shape)`); import and export both read that table, so they
cannot drift apart. A block's tensors are listed once, with `{layer}` in the HF name: HF keeps
one tensor per layer, we keep the layers stacked along a leading axis of one parameter.

Import reads `config.json` plus `model.safetensors`, a sharded `*.index.json`, or a PyTorch
`.bin` (loaded with `weights_only=True`). Every tensor is checked before a model is built, so a
bad directory raises a `CheckpointError` naming the file and tensor and nothing half-loaded is
returned. Hub downloads are not attempted: pass a local directory.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import tempfile
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from teacherlm_jax.data import hf_tokenizers
from teacherlm_jax.models.config import ModelConfig
from teacherlm_jax.models.transformer import DecoderLM
from teacherlm_jax.storage import files

PathTuple = Tuple  # a path into our nested param dict, e.g. ('layers', 'mlp', 'up', 'kernel')


class CheckpointError(ValueError):
  """A checkpoint directory that cannot be imported; the message names file and tensor."""


# --------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


def config_from_hf(hf_config: Mapping, *, source: str = "config.json", dtype: str = "float32",
                   param_dtype: Optional[str] = None) -> ModelConfig:
  """Maps an HF `config.json` dict onto a `ModelConfig`."""
  model_type = hf_config.get("model_type")
  get = lambda key, default=None: hf_config.get(key, default)

  def require(*keys):
    for key in keys:
      if key in hf_config:
        return hf_config[key]
    raise CheckpointError(f"{source}: field {keys[0]!r} is missing for model_type {model_type!r}")

  ids = dict(pad_token_id=get("pad_token_id") if get("pad_token_id") is not None else 0,
             bos_token_id=get("bos_token_id") if get("bos_token_id") is not None else 1,
             eos_token_id=get("eos_token_id") if get("eos_token_id") is not None else 2)
  if isinstance(ids["eos_token_id"], list):
    ids["eos_token_id"] = ids["eos_token_id"][0]
  common = dict(dtype=dtype, param_dtype=param_dtype or dtype, **ids)
  if model_type == "bloom":
    if get("apply_residual_connection_post_layernorm", False):
      raise CheckpointError(f"{source}: apply_residual_connection_post_layernorm=True is not "
                            "supported (no released BLOOM uses it)")
    hidden = require("hidden_size", "n_embed")
    return ModelConfig(family="bloom", vocab_size=require("vocab_size"), hidden_size=hidden,
                       num_layers=require("n_layer", "num_hidden_layers"),
                       num_heads=require("n_head", "num_attention_heads"), mlp_dim=4 * hidden,
                       norm_eps=get("layer_norm_epsilon", 1e-5), tie_word_embeddings=True,
                       use_bias=True, **common)
  if model_type == "opt":
    if get("_remove_final_layer_norm", False) or not get("layer_norm_elementwise_affine", True):
      raise CheckpointError(f"{source}: OPT variants without a final or affine LayerNorm are "
                            "not supported")
    if get("activation_function", "relu") != "relu":
      raise CheckpointError(f"{source}: activation_function={get('activation_function')!r}; "
                            "only 'relu' OPT models are supported")
    hidden = require("hidden_size")
    proj = get("word_embed_proj_dim", hidden)
    return ModelConfig(family="opt", vocab_size=require("vocab_size"), hidden_size=hidden,
                       num_layers=require("num_hidden_layers"),
                       num_heads=require("num_attention_heads"), mlp_dim=require("ffn_dim"),
                       max_position_embeddings=require("max_position_embeddings"),
                       do_layer_norm_before=get("do_layer_norm_before", True),
                       word_embed_proj_dim=None if proj == hidden else proj,
                       use_bias=get("enable_bias", True), norm_eps=1e-5,
                       tie_word_embeddings=get("tie_word_embeddings", True), **common)
  if model_type in ("llama", "mistral", "qwen2"):
    if get("rope_scaling"):
      raise CheckpointError(f"{source}: rope_scaling={get('rope_scaling')!r} is not supported")
    if get("attention_bias", False) or get("mlp_bias", False) or model_type == "qwen2":
      raise CheckpointError(f"{source}: attention/MLP biases are not supported for LLaMA-style "
                            "models")
    rope_theta = get("rope_theta") or (get("rope_parameters") or {}).get("rope_theta", 10000.0)
    heads, hidden = require("num_attention_heads"), require("hidden_size")
    # Store defaults as None so configs compare equal to our presets.
    kv_heads = get("num_key_value_heads")
    kv_heads = None if kv_heads in (None, heads) else kv_heads
    head_dim = get("head_dim")
    head_dim = None if head_dim in (None, hidden // heads) else head_dim
    return ModelConfig(family="llama", vocab_size=require("vocab_size"),
                       hidden_size=hidden, num_layers=require("num_hidden_layers"),
                       num_heads=heads,
                       num_kv_heads=kv_heads, head_dim=head_dim,
                       mlp_dim=require("intermediate_size"),
                       max_position_embeddings=get("max_position_embeddings", 2048),
                       norm_eps=get("rms_norm_eps", 1e-6), rope_theta=float(rope_theta),
                       use_bias=False, tie_word_embeddings=get("tie_word_embeddings", False),
                       **common)
  raise CheckpointError(f"{source}: unknown model_type {model_type!r}; supported: bloom, opt, "
                        "llama")


def config_to_hf(config: ModelConfig) -> dict:
  """The HF `config.json` dict for `config` (loadable by `transformers.AutoConfig`)."""
  ids = dict(pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id,
             eos_token_id=config.eos_token_id)
  if config.family == "bloom":
    return dict(model_type="bloom", architectures=["BloomForCausalLM"],
                vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                n_layer=config.num_layers, n_head=config.num_heads,
                layer_norm_epsilon=config.norm_eps, apply_residual_connection_post_layernorm=False,
                tie_word_embeddings=True, **ids)
  if config.family == "opt":
    return dict(model_type="opt", architectures=["OPTForCausalLM"], vocab_size=config.vocab_size,
                hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
                num_attention_heads=config.num_heads, ffn_dim=config.mlp_dim,
                max_position_embeddings=config.max_position_embeddings,
                do_layer_norm_before=config.do_layer_norm_before,
                word_embed_proj_dim=config.embed_dim, enable_bias=config.use_bias,
                activation_function="relu", tie_word_embeddings=config.tie_word_embeddings, **ids)
  return dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=config.vocab_size,
              hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
              num_attention_heads=config.num_heads, num_key_value_heads=config.kv_heads,
              head_dim=config.dim_per_head, intermediate_size=config.mlp_dim,
              max_position_embeddings=config.max_position_embeddings,
              rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta,
              tie_word_embeddings=config.tie_word_embeddings, hidden_act="silu", **ids)


# --------------------------------------------------------------------------------------------
# The tensor table.


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One HF tensor (per layer when `hf_name` holds '{layer}': the layer's slice of our
  stacked parameter at `path`) and its layout conversions."""
  hf_name: str
  path: PathTuple
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]

  @property
  def per_layer(self) -> bool:
    return "{layer}" in self.hf_name

  def hf_names(self, num_layers: int) -> List[str]:
    if not self.per_layer:
      return [self.hf_name]
    return [self.hf_name.format(layer=i) for i in range(num_layers)]


def _same(x):
  return x


def _linear(out_shape: Tuple[int, ...]):
  """torch Linear weight (out, in) <-> our kernel (in, *out_shape)."""
  to_ours = lambda w: w.T.reshape((w.shape[1],) + tuple(out_shape))
  to_hf = lambda k: k.reshape(k.shape[0], -1).T
  return to_ours, to_hf


def _linear_from_heads(in_shape: Tuple[int, ...]):
  """torch Linear weight (out, heads*hd) <-> our kernel (heads, hd, out)."""
  to_ours = lambda w: w.T.reshape(tuple(in_shape) + (w.shape[0],))
  to_hf = lambda k: k.reshape(-1, k.shape[-1]).T
  return to_ours, to_hf


def _reshape(shape):
  return (lambda b: b.reshape(shape)), (lambda b: b.reshape(-1))


class _Table:
  """Collects a family's entries."""

  def __init__(self, config: ModelConfig):
    self.config = config
    self.entries: List[_Entry] = []

  def add(self, hf_name, path, conv=(_same, _same)):
    self.entries.append(_Entry(hf_name, tuple(path), conv[0], conv[1]))

  def norm(self, hf_prefix, path, bias=True):
    self.add(f"{hf_prefix}.weight", path + ("scale",))
    if bias:
      self.add(f"{hf_prefix}.bias", path + ("bias",))

  def dense(self, hf_prefix, path, conv_w, out_shape=None):
    self.add(f"{hf_prefix}.weight", path + ("kernel",), conv_w)
    if self.config.use_bias:
      self.add(f"{hf_prefix}.bias", path + ("bias",),
               _reshape(out_shape) if out_shape else (_same, _same))

  def lm_head(self):
    if not self.config.tie_word_embeddings:
      self.add("lm_head.weight", ("lm_head",), (lambda w: w.T, lambda w: w.T))
    return self.entries


def _bloom_table(config: ModelConfig) -> List[_Entry]:
  d, h, hd, f = config.hidden_size, config.num_heads, config.dim_per_head, config.mlp_dim
  t = _Table(config)
  t.add("transformer.word_embeddings.weight", ("token_embedding",))
  t.norm("transformer.word_embeddings_layernorm", ("embedding_norm",))
  p, ours = "transformer.h.{layer}", ("layers",)
  t.norm(f"{p}.input_layernorm", ours + ("attention_norm",))
  t.dense(f"{p}.self_attention.query_key_value", ours + ("attention", "qkv"),
          _linear((h, 3, hd)), (h, 3, hd))
  t.dense(f"{p}.self_attention.dense", ours + ("attention", "out"), _linear_from_heads((h, hd)))
  t.norm(f"{p}.post_attention_layernorm", ours + ("mlp_norm",))
  t.dense(f"{p}.mlp.dense_h_to_4h", ours + ("mlp", "up"), _linear((f,)))
  t.dense(f"{p}.mlp.dense_4h_to_h", ours + ("mlp", "down"), _linear((d,)))
  t.norm("transformer.ln_f", ("final_norm",))
  return t.lm_head()


def _opt_table(config: ModelConfig) -> List[_Entry]:
  d, h, hd, f = config.hidden_size, config.num_heads, config.dim_per_head, config.mlp_dim
  t = _Table(config)
  t.add("model.decoder.embed_tokens.weight", ("token_embedding",))
  t.add("model.decoder.embed_positions.weight", ("position_embedding",))
  if config.embed_dim != d:
    t.add("model.decoder.project_in.weight", ("project_in", "kernel"), _linear((d,)))
    t.add("model.decoder.project_out.weight", ("project_out", "kernel"),
          _linear((config.embed_dim,)))
  p, ours = "model.decoder.layers.{layer}", ("layers",)
  for name, ours_name in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")):
    t.dense(f"{p}.self_attn.{name}", ours + ("attention", ours_name), _linear((h, hd)), (h, hd))
  t.dense(f"{p}.self_attn.out_proj", ours + ("attention", "out"), _linear_from_heads((h, hd)))
  t.norm(f"{p}.self_attn_layer_norm", ours + ("attention_norm",))
  t.dense(f"{p}.fc1", ours + ("mlp", "up"), _linear((f,)))
  t.dense(f"{p}.fc2", ours + ("mlp", "down"), _linear((d,)))
  t.norm(f"{p}.final_layer_norm", ours + ("mlp_norm",))
  if config.has_final_norm:
    t.norm("model.decoder.final_layer_norm", ("final_norm",))
  return t.lm_head()


def _llama_table(config: ModelConfig) -> List[_Entry]:
  d, h, k, hd = config.hidden_size, config.num_heads, config.kv_heads, config.dim_per_head
  f = config.mlp_dim
  t = _Table(config)
  t.add("model.embed_tokens.weight", ("token_embedding",))
  p, ours = "model.layers.{layer}", ("layers",)
  t.add(f"{p}.self_attn.q_proj.weight", ours + ("attention", "q", "kernel"), _linear((h, hd)))
  t.add(f"{p}.self_attn.k_proj.weight", ours + ("attention", "k", "kernel"), _linear((k, hd)))
  t.add(f"{p}.self_attn.v_proj.weight", ours + ("attention", "v", "kernel"), _linear((k, hd)))
  t.add(f"{p}.self_attn.o_proj.weight", ours + ("attention", "out", "kernel"),
        _linear_from_heads((h, hd)))
  t.add(f"{p}.mlp.gate_proj.weight", ours + ("mlp", "gate", "kernel"), _linear((f,)))
  t.add(f"{p}.mlp.up_proj.weight", ours + ("mlp", "up", "kernel"), _linear((f,)))
  t.add(f"{p}.mlp.down_proj.weight", ours + ("mlp", "down", "kernel"), _linear((d,)))
  t.norm(f"{p}.input_layernorm", ours + ("attention_norm",), bias=False)
  t.norm(f"{p}.post_attention_layernorm", ours + ("mlp_norm",), bias=False)
  t.norm("model.norm", ("final_norm",), bias=False)
  return t.lm_head()


_TABLES = {"bloom": _bloom_table, "opt": _opt_table, "llama": _llama_table}


def _tensor_table(config: ModelConfig) -> List[_Entry]:
  return _TABLES[config.family](config)


# Prefixes under which released checkpoints store the same tensors (bigscience/bloom-* has no
# 'transformer.' prefix; old facebook/opt-* checkpoints use 'decoder.' without 'model.').
_ALIASES = {"bloom": [("transformer.", "")], "opt": [("model.decoder.", "decoder.")],
            "llama": []}


# --------------------------------------------------------------------------------------------
# Reading checkpoint files.


class _TensorFiles:
  """Lazy name -> (file, loader) view over safetensors / sharded / .bin checkpoints."""

  def __init__(self, directory: pathlib.Path):
    self.directory = directory
    self._where: Dict[str, pathlib.Path] = {}
    self._bin_cache: Dict[pathlib.Path, dict] = {}
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
      index_path = directory / index_name
      if index_path.exists():
        try:
          weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
          raise CheckpointError(f"{index_path}: not a valid index file ({e})") from e
        self._where = {name: directory / file for name, file in weight_map.items()}
        return
    for single in ("model.safetensors", "pytorch_model.bin"):
      path = directory / single
      if path.exists():
        for name in self._names_in(path):
          self._where[name] = path
        return
    raise CheckpointError(f"{directory}: no model.safetensors, pytorch_model.bin or sharded "
                          "index file found")

  def _names_in(self, path: pathlib.Path) -> List[str]:
    if path.suffix == ".safetensors":
      from safetensors import safe_open
      try:
        with safe_open(str(path), framework="np") as f:
          return list(f.keys())
      except Exception as e:  # safetensors raises its own error types for corrupt headers.
        raise CheckpointError(f"{path}: cannot read safetensors header ({e})") from e
    return list(self._load_bin(path))

  def _load_bin(self, path: pathlib.Path) -> dict:
    if path not in self._bin_cache:
      import torch
      try:
        self._bin_cache[path] = torch.load(str(path), map_location="cpu", weights_only=True)
      except Exception as e:
        raise CheckpointError(f"{path}: cannot load PyTorch checkpoint ({e})") from e
    return self._bin_cache[path]

  def names(self):
    return self._where.keys()

  def resolve(self, name: str, aliases) -> str:
    """`name`, or the alias under which this checkpoint stores it."""
    if name in self._where:
      return name
    for prefix, alias in aliases:
      if name.startswith(prefix) and name.replace(prefix, alias, 1) in self._where:
        return name.replace(prefix, alias, 1)
    raise CheckpointError(f"{self.directory}: tensor {name!r} is missing from the checkpoint")

  def read(self, name: str) -> np.ndarray:
    path = self._where[name]
    if not path.exists():
      raise CheckpointError(f"{path}: listed in the index for tensor {name!r} but missing")
    if path.suffix == ".safetensors":
      from safetensors import safe_open
      try:
        with safe_open(str(path), framework="pt") as f:
          tensor = f.get_tensor(name)
      except Exception as e:
        raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e})") from e
    else:
      tensor = self._load_bin(path)[name]
    # Through torch so that bfloat16 checkpoints read; float32 keeps every bit of bf16/fp16.
    return tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy()


def _set_path(tree: dict, path: PathTuple, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get_path(tree: Mapping, path: PathTuple):
  for key in path:
    tree = tree[key]
  return tree


def abstract_model(config: ModelConfig) -> DecoderLM:
  return nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))


def load_hf_params(directory, config: ModelConfig) -> dict:
  """Reads every tensor of `config`'s table from `directory` into our nested param dict."""
  directory = pathlib.Path(directory)
  files = _TensorFiles(directory)
  expected = nnx.to_pure_dict(nnx.state(abstract_model(config), nnx.Param))
  params: dict = {}
  for entry in _tensor_table(config):
    want = _get_path(expected, entry.path).shape
    if entry.per_layer:
      want = want[1:]  # One layer's slice of the stacked parameter.
    layers = []
    for hf_name in entry.hf_names(config.num_layers):
      name = files.resolve(hf_name, _ALIASES[config.family])
      hf_array = files.read(name)
      try:
        ours = entry.to_ours(hf_array)
      except ValueError:
        ours = None
      if ours is None or ours.shape != tuple(want):
        want_hf = entry.to_hf(np.zeros(want, np.float32)).shape
        raise CheckpointError(f"{files._where[name]}: tensor {name!r} has shape "
                              f"{hf_array.shape}, expected {tuple(want_hf)} for this config.json")
      layers.append(ours)
    _set_path(params, entry.path, np.stack(layers) if entry.per_layer else layers[0])
  return params


def import_checkpoint(directory, *, dtype: str = "float32", param_dtype: Optional[str] = None,
                      ) -> Tuple[ModelConfig, DecoderLM]:
  """Imports a local HF checkpoint directory (config.json + weights) as (config, DecoderLM)."""
  directory = pathlib.Path(directory)
  config_path = directory / "config.json"
  if not config_path.exists():
    raise CheckpointError(f"{config_path}: missing (is {directory} an HF checkpoint directory?)")
  try:
    hf_config = json.loads(config_path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{config_path}:{e.lineno}: not valid JSON ({e.msg})") from e
  config = config_from_hf(hf_config, source=str(config_path), dtype=dtype, param_dtype=param_dtype)
  params = load_hf_params(directory, config)
  return config, model_from_params(config, params)


def model_from_params(config: ModelConfig, params: dict) -> DecoderLM:
  """Builds a DecoderLM whose parameters are `params` (our nested dict of arrays)."""
  model = abstract_model(config)
  state = nnx.state(model, nnx.Param)
  dtype = config.weight_dtype
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jnp.asarray(x, dtype), params))
  nnx.update(model, state)
  return model


def params_to_hf(model: DecoderLM) -> Dict[str, np.ndarray]:
  """Our parameters as an HF state dict of float32 numpy arrays."""
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  tensors = {}
  for entry in _tensor_table(model.config):
    ours = np.asarray(_get_path(params, entry.path), np.float32)
    names = entry.hf_names(model.config.num_layers)
    for i, name in enumerate(names):
      tensors[name] = np.ascontiguousarray(entry.to_hf(ours[i] if entry.per_layer else ours))
  return tensors


def export_checkpoint(model: DecoderLM, directory, *, tokenizer_dir=None,
                      max_shard_bytes: int = 5 << 30):
  """Writes `model` as an HF directory (config.json + safetensors, sharded past 5 GB), local
  or gs:// (safetensors and tokenizers write local files: staged locally, then uploaded)."""
  if tokenizer_dir is not None:
    tokenizer_dir = files.local_copy(tokenizer_dir)
  if not files.is_uri(directory):
    return _export_local(model, files.resolve(directory), tokenizer_dir, max_shard_bytes)
  with tempfile.TemporaryDirectory() as local:
    _export_local(model, pathlib.Path(local), tokenizer_dir, max_shard_bytes)
    return files.upload(local, directory)


def _export_local(model: DecoderLM, directory, tokenizer_dir, max_shard_bytes: int):
  from safetensors.numpy import save_file
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  hf_config = config_to_hf(model.config)
  hf_config["torch_dtype"] = "float32"
  (directory / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
  tensors = params_to_hf(model)
  shards: List[Dict[str, np.ndarray]] = [{}]
  size = 0
  for name, array in tensors.items():
    if size and size + array.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = array
    size += array.nbytes
  if len(shards) == 1:
    save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
  else:
    weight_map = {}
    for i, shard in enumerate(shards):
      file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, str(directory / file_name), metadata={"format": "pt"})
      weight_map.update({name: file_name for name in shard})
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
             "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
  if tokenizer_dir is not None:
    hf_tokenizers.load(tokenizer_dir).save_pretrained(str(directory))
  return directory
