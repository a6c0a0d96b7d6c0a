"""A training run's settings: `TrainConfig`, grouped as the model, data, optimizer, mesh,
checkpointing and logging it uses, each group its own gin configurable.

Bind a group's field in gin by its class, e.g. `OptimizerConfig.learning_rate = 1e-5` or
`DataConfig.seq_len = 2048`; a pipeline stage's scope applies to the groups of its TrainConfig
too (`teacher/OptimizerConfig.learning_rate = 1e-5`). The loop's own fields stay on
`TrainConfig` (`TrainConfig.num_steps = 100`). Every config is frozen; `TrainConfig.replace`
takes a group's changes as a dict.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping, Optional

import gin
import jax

from teacherlm_jax.data import sources
from teacherlm_jax.models import head_loss
from teacherlm_jax.runtime import kernels
from teacherlm_jax.runtime import partitioning


class _Group:
  """A frozen config group: `replace` and a check that named fields are at least 1."""

  POSITIVE: tuple = ()

  def __post_init__(self):
    for name in self.POSITIVE:
      if getattr(self, name) < 1:
        raise ValueError(f"{type(self).__name__}.{name}={getattr(self, name)} must be >= 1")

  def replace(self, **changes):
    return dataclasses.replace(self, **changes)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelSettings(_Group):
  """Which model a run trains and how it computes; the architecture it resolves to is a
  `ModelConfig` (models/config.py)."""
  # A preset name or JSON path (configs/models/).
  preset: str = "tiny-bloom"
  # ModelConfig fields replaced on the preset, e.g. {'vocab_size': 800} for a trained vocabulary.
  overrides: Dict[str, object] = dataclasses.field(default_factory=dict)
  # 'bfloat16' computes in bf16 with float32 master weights.
  compute_dtype: str = "float32"
  # 'dots' keeps matmul outputs and recomputes the rest in the backward pass: less memory than
  # keeping everything ('none'), fewer FLOPs than 'full'.
  remat: str = "dots"
  # 'xla', 'pallas' (TPU) or 'cudnn' (GPU); '' = the platform's default, set at launch
  # (runtime/kernels.py), with the kernel tiles of the chip.
  attention_impl: str = ""
  # A new run starts from one of these (ignored when model_dir already holds a checkpoint).
  init_checkpoint: str = ""  # A previous stage's model_dir (or a checkpoint step dir).
  init_hf_checkpoint: str = ""  # A local or gs:// HF checkpoint directory.
  # A run started from a checkpoint trains with that checkpoint's tokenizer; data tokenised
  # with another vocabulary is an error (training/stage_vocab.py). True: replace the
  # checkpoint's vocabulary-shaped parameters with fresh ones for the data's vocabulary.
  reinit_embeddings: bool = False

  def __post_init__(self):
    if self.init_checkpoint and self.init_hf_checkpoint:
      raise ValueError("set at most one of ModelSettings.init_checkpoint and "
                       "ModelSettings.init_hf_checkpoint")
    if self.compute_dtype not in ("float32", "bfloat16"):
      raise ValueError(f"ModelSettings.compute_dtype={self.compute_dtype!r}: expected "
                       "'float32' or 'bfloat16'")

  @property
  def init_source(self) -> str:
    """The checkpoint a new run starts from ('' for random weights)."""
    return self.init_checkpoint or self.init_hf_checkpoint

  def numerics(self, device=None) -> dict:
    """ModelConfig fields this run sets on any architecture: compute dtype, float32 master
    weights, remat, and attention for `device` (default: this process's first device; a
    TPU topology's device for an ahead-of-time compile)."""
    device = device if device is not None else jax.devices()[0]
    return dict(dtype=self.compute_dtype, param_dtype="float32", remat=self.remat,
                **kernels.attention_options(self.attention_impl, device))


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DataConfig(_Group):
  """The input: a seqio task or mixture, cut into `batch_size` x `seq_len` microbatches."""
  train_task: str = ""
  eval_task: str = ""  # Default: train_task.
  train_split: str = "train"
  eval_split: str = "validation"
  seq_len: int = 256
  batch_size: int = 8  # Global rows per microbatch.
  # 'targets': prompt tokens carry no loss; 'all': every token does.
  loss_on: str = "targets"
  pack: bool = True
  seed: int = 0  # The input's shuffle.
  input_sharding: str = "global"
  data_dir: str = ""  # Real datasets (default $TEACHERLM_DATA_DIR or ../shared/data).

  POSITIVE = ("seq_len", "batch_size")

  def resolved_data_dir(self) -> str:
    """`data_dir`, else the project's datasets root (data/sources.py)."""
    return self.data_dir or str(sources.data_dir())


@gin.configurable
@dataclasses.dataclass(frozen=True)
class OptimizerConfig(_Group):
  """AdamW behind global-norm clipping, with its learning-rate schedule (training/optimizer.py)
  and gradient accumulation over `grad_accum_steps` microbatches."""
  learning_rate: float = 1e-4
  schedule: str = "cosine"  # 'constant', 'cosine' or 'linear'.
  warmup_steps: int = 0
  end_fraction: float = 0.1  # Where a decay ends, as a fraction of learning_rate.
  weight_decay: float = 0.0
  adam_b1: float = 0.9
  adam_b2: float = 0.95
  adam_eps: float = 1e-8
  clip_norm: float = 1.0
  grad_accum_steps: int = 1

  POSITIVE = ("grad_accum_steps",)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MeshConfig(_Group):
  """Sizes of the ('data', 'fsdp', 'tensor') mesh axes; one may be -1 (the remaining
  devices)."""
  data: int = 1
  fsdp: int = -1
  tensor: int = 1
  devices: int = 0  # Use the first N devices (0: all of them).

  def make(self, devices: Optional[List[jax.Device]] = None) -> jax.sharding.Mesh:
    """The mesh over `devices` (default every device; a TPU topology's for AOT compiles)."""
    devices = jax.devices() if devices is None else list(devices)
    if self.devices:
      if self.devices > len(devices):
        raise ValueError(f"MeshConfig.devices={self.devices} but only {len(devices)} devices "
                         "exist; lower it or set 0 (all devices)")
      devices = devices[:self.devices]
    return partitioning.make_mesh(self.data, self.fsdp, self.tensor, devices=devices)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CheckpointConfig(_Group):
  """When the trainer saves (orbax, in <model_dir>/checkpoints) and how many steps it keeps."""
  every: int = 100  # Optimizer steps between saves; the last step is always saved.
  keep: int = 3
  async_save: bool = True

  POSITIVE = ("every", "keep")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LoggingConfig(_Group):
  """Metrics: train scalars every `every` steps, TensorBoard event files, throughput and MFU."""
  every: int = 10
  tensorboard: bool = True  # Event files in <model_dir>/tensorboard; False: the log only.
  # MFU is against the chip's vendor bf16 peak (runtime/chips.py), on CPU against a matmul
  # timed at start-up; above 0 this overrides both.
  peak_tflops_per_device: float = 0.0

  POSITIVE = ("every",)


GROUPS = ("model", "data", "optimizer", "mesh", "checkpoint", "logging")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig(_Group):
  """Everything a training run needs: its groups, and the loop's own fields below."""
  model: ModelSettings = dataclasses.field(default_factory=ModelSettings)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
  logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
  num_steps: int = 100  # Optimizer steps.
  # Optimizer steps per jitted call (a `lax.scan` over that many batches; see
  # `train.make_train_step`). Logs, evaluations and checkpoints fall between calls: a call runs
  # single steps where a multi-step one would cross one of their boundaries or num_steps.
  steps_per_call: int = 1
  seed: int = 0  # The parameters' initialisation.
  eval_every: int = 0  # 0: evaluate once at the end (if there is an eval task).
  eval_batches: int = 4  # 0: no evaluation.
  z_loss: float = 0.0
  # The LM head and loss run in sequence chunks of at least this many tokens a device
  # (models/head_loss.py): fewer re-read the head's weights more than they compute with them;
  # more hold more float32 logits (1024 x BLOOM's 250,880-token vocabulary: 1 GiB).
  loss_chunk_tokens: int = head_loss.MIN_CHUNK_TOKENS

  POSITIVE = ("num_steps", "steps_per_call", "loss_chunk_tokens")

  def replace(self, **changes) -> "TrainConfig":
    """A copy with `changes`: a field's new value, or for a group a dict of the fields to
    change in it (`config.replace(num_steps=5, data={'seq_len': 512})`)."""
    for name, value in changes.items():
      if name in GROUPS and isinstance(value, Mapping):
        changes[name] = getattr(self, name).replace(**value)
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    """The config as nested plain values (train_config.json)."""
    return dataclasses.asdict(self)

  def flat(self) -> Dict[str, object]:
    """{'group.field' or 'field': value} for every field (TensorBoard's hparams)."""
    out = {}
    for name, value in self.to_dict().items():
      if name in GROUPS:
        out.update({f"{name}.{field}": v for field, v in value.items()})
      else:
        out[name] = value
    return out

  def gin_bindings(self) -> List[str]:
    """Gin bindings that rebuild this config from gin's defaults (e.g. for a subprocess)."""
    bindings = []
    for name in GROUPS:
      group = getattr(self, name)
      bindings += [f"{type(group).__name__}.{field.name} = {getattr(group, field.name)!r}"
                   for field in dataclasses.fields(group)]
    bindings += [f"TrainConfig.{field.name} = {getattr(self, field.name)!r}"
                 for field in dataclasses.fields(self) if field.name not in GROUPS]
    return bindings
