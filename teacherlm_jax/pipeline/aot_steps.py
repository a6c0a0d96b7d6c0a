"""Every step of a gin-configured job, lowered for a TPU slice with the job's own settings.

For the parsed gin configuration, `steps(slice_name)` builds each step the job runs with the
stages' own step builders, over a mesh of the slice's devices, from abstract shapes only:

  teacher_train, student_train   the trainer's train step (`train.program_for`) with the
                                 scoped TrainConfig's mesh, dtypes, remat, batch and length;
  train                          the same for a plain training config (unscoped TrainConfig);
  annotate_prefill, annotate_decode   the slot engine's prefill of a full group and its decode
                                 loop (`decoding.SlotEngine.lower`) at annotate's slots,
                                 prompt width + max_new_tokens cache, dtype and mesh_shape
                                 (a mesh over one host's devices, as annotation runs);
  eval_score                     the evaluator's scoring step (`RankScorer.lower`) of a full
                                 batch at evaluate's batch_size, max_length and mesh_shape.

A pipeline config (PipelineConfig bound) has all five of its stages but `train`; otherwise
the steps are those whose configurable the files bind (TrainConfig, annotate, evaluate).
What the config leaves to the data or to checkpoints on disk is set by `AotConfig`.

Each step is built for the architecture its stage would run, as `train.model_config_for`
takes it: a run started from an HF checkpoint has that checkpoint's architecture (read from
its config.json when the path is here, else the preset (`ModelSettings.preset`) it is declared
to be) and ignores `ModelSettings.overrides`, as training does; only shapes are made
(`nnx.eval_shape`), never weights. Every step carries its model's parameter count, to check
against the config.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
from typing import Callable, List, Optional, Tuple

import gin
import jax
from flax import nnx

from teacherlm_jax.annotation import annotate as annotate_lib
from teacherlm_jax.annotation import decoding
from teacherlm_jax.evaluation import evaluate as evaluate_lib
from teacherlm_jax.models import presets
from teacherlm_jax.models import transformer
from teacherlm_jax.models.config import ModelConfig
from teacherlm_jax.pipeline import pipeline as pipeline_lib
from teacherlm_jax.runtime import aot
from teacherlm_jax.runtime import kernels
from teacherlm_jax.runtime import partitioning
from teacherlm_jax.runtime import shapes
from teacherlm_jax.runtime import topologies
from teacherlm_jax.storage import files
from teacherlm_jax.training import mfu
from teacherlm_jax.training import train as train_lib
from teacherlm_jax.training import train_config

STEP_NAMES = ("teacher_train", "student_train", "train", "annotate_prefill", "annotate_decode",
              "eval_score")

_TRAIN_REMEDY = ("raise {scope}MeshConfig.fsdp, use {scope}ModelSettings.remat='full' or "
                 "lower {scope}DataConfig.batch_size (grad_accum_steps keeps the tokens per "
                 "update)")
_ANNOTATE_REMEDY = ("lower annotate.num_slots or SamplingConfig.max_new_tokens, or split the "
                    "model over more of a host's chips in annotate.mesh_shape")
_EVAL_REMEDY = ("lower evaluate.batch_size or evaluate.max_length, or shard the model with "
                "evaluate.mesh_shape")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class AotConfig:
  """What an ahead-of-time compile assumes where the job's config leaves it to the data.

  Attributes:
    annotation_model: preset of the annotating teacher when the config names only a
      checkpoint path (annotate.teachers); default the pipeline's teacher/ModelSettings.preset.
    eval_model: preset of the evaluated model outside a pipeline (a pipeline evaluates its
      students).
    prompt_tokens: the longest annotation prompt in tokens (the slot engine buckets it to a
      power of two; the cache holds that plus SamplingConfig.max_new_tokens).
    eval_prompt_tokens: the longest evaluation prompt; 0 = evaluate.max_length.
    eval_options: options per evaluation example (ECQA has five).
    eval_option_tokens: tokens of the longest option (TeacherLM's letters are one).
  """
  annotation_model: str = ""
  eval_model: str = ""
  prompt_tokens: int = 256
  eval_prompt_tokens: int = 0
  eval_options: int = 5
  eval_option_tokens: int = 1


@dataclasses.dataclass
class Step:
  """One step to compile: `lower()` gives its `jax.stages.Lowered` over `mesh`."""
  name: str
  mesh: jax.sharding.Mesh
  lower: Callable[[], jax.stages.Lowered]
  remedy: str                      # What to change in the config when it does not fit.
  model: str                       # The architecture's source ("preset 'bloom-7b1'", a path).
  params: int                      # Its parameter count, from shapes.
  model_flops_per_device: Optional[float] = None      # Useful FLOPs (for MFU).
  executed_flops_per_device: Optional[float] = None   # Plus remat recomputation.


def _bound(binding: str) -> bool:
  try:
    gin.query_parameter(binding)
    return True
  except ValueError:
    return False


def _argument(fn, name: str):
  """The gin-bound value of `fn`'s argument `name`, else its default."""
  try:
    return gin.query_parameter(f"{fn.__name__}.{name}")
  except ValueError:
    return inspect.signature(fn).parameters[name].default


def _train_config(scope: str) -> train_lib.TrainConfig:
  """The scope's TrainConfig without its init checkpoints (`_architecture` reads those
  bindings itself)."""
  with gin.config_scope(scope or None):
    # Explicit arguments satisfy a %gin.REQUIRED init_hf_checkpoint.
    return train_lib.TrainConfig(
        model=train_config.ModelSettings(init_checkpoint="", init_hf_checkpoint=""))


def _hf_checkpoint(scope: str) -> Optional[str]:
  """The HF checkpoint the scope's run starts from: its path, '?' when the gin files leave it
  to the launch command (%gin.REQUIRED), None when the run starts from a preset."""
  for binding in ([f"{scope}/ModelSettings.init_hf_checkpoint"] if scope else []) + [
      "ModelSettings.init_hf_checkpoint"]:
    try:
      value = gin.query_parameter(binding)
    except ValueError:
      continue
    return value if isinstance(value, str) else "?"
  return None


def _pipeline_vocab_overrides(scope: str) -> dict:
  """A pipeline trains on its own SentencePiece vocabulary (`Pipeline._with_vocab`) unless the
  stage starts from a checkpoint (an HF one, PipelineConfig.teacher_checkpoint or
  PipelineConfig.students), whose config (the preset's) then decides."""
  pretrained = {"teacher": ("PipelineConfig.teacher_checkpoint",),
                "student": ("PipelineConfig.students",)}.get(scope, ())
  if _hf_checkpoint(scope) or any(_bound(binding) and gin.query_parameter(binding)
                                  for binding in pretrained):
    return {}
  return {"vocab_size": _argument(pipeline_lib.PipelineConfig, "vocab_size")}


def _architecture(scope: str, config: train_lib.TrainConfig, overrides: dict, device
                  ) -> Tuple[ModelConfig, str]:
  """The scope's model as its run builds it (`train.model_config_for`) with the run's
  numerics for `device` (a TPU of the slice: its attention kernel), and where it comes from."""
  settings = config.model
  numerics = settings.numerics(device)
  hf_checkpoint = _hf_checkpoint(scope)
  if hf_checkpoint:
    config_json = files.join(hf_checkpoint, "config.json") if hf_checkpoint != "?" else ""
    if config_json and files.exists(config_json):
      from teacherlm_jax.models import hf  # pylint: disable=g-import-not-at-top
      hf_config = json.loads(files.read_text(config_json))
      return (hf.config_from_hf(hf_config, source=config_json).replace(**numerics),
              config_json)
    # Given at launch, or not on this host: the preset the checkpoint is declared to be.
    return presets.get(settings.preset, **numerics), (
        f"preset {settings.preset!r} (the HF checkpoint's architecture)")
  return (presets.get(settings.preset, **{**dict(settings.overrides), **overrides, **numerics}),
          f"preset {settings.preset!r}" + (" with overrides" if settings.overrides else ""))


def param_count(model_config: ModelConfig) -> int:
  """Parameters of `model_config`'s model, counted on its abstract (shape-only) state."""
  params = nnx.state(_abstract_model(model_config), nnx.Param)
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def train_step(name: str, scope: str, slice_name: str, in_pipeline: bool) -> Step:
  config = _train_config(scope)
  devices = topologies.devices(slice_name)
  model_config, source = _architecture(
      scope, config, _pipeline_vocab_overrides(scope) if in_pipeline else {}, devices[0])
  mesh = config.mesh.make(devices)
  data = config.data
  partitioning.check_batch_divides(data.batch_size, mesh,
                                   what=f"{scope + '/' if scope else ''}DataConfig.batch_size")
  tokens = data.batch_size * data.seq_len
  model_flops = mfu.flops_per_token(model_config, data.seq_len) * tokens
  recomputed = mfu.recomputed_flops_per_token(model_config, data.seq_len) * tokens

  def lower():
    program = train_lib.program_for(config, model_config, mesh)
    return program.train_step.lower(train_lib.abstract_state(program),
                                    train_lib.abstract_batch(config, mesh))

  remedy = _TRAIN_REMEDY.format(scope=f"{scope}/" if scope else "")
  size = mesh.devices.size
  return Step(name, mesh, lower, remedy, source, param_count(model_config), model_flops / size,
              (model_flops + recomputed) / size)


def _forward_flops(model_config: ModelConfig, context: int, tokens: int, head_rows: int
                   ) -> float:
  """Useful FLOPs of a forward pass: `tokens` through the blocks, each attending to `context`
  keys (the full square, as XLA computes it), and `head_rows` of them through the LM head."""
  head = 2.0 * model_config.embed_dim * model_config.vocab_size
  per_token = mfu.flops_per_token(model_config, context) / 3 - head
  return per_token * tokens + head * head_rows


def _abstract_model(model_config: ModelConfig) -> transformer.DecoderLM:
  return nnx.eval_shape(lambda: transformer.DecoderLM(model_config, rngs=nnx.Rngs(0)))


def _host_mesh(mesh_shape, slice_name: str):
  """A stage's per-host mesh: `mesh_shape` over one host's devices; None = its first device."""
  devices = topologies.host_devices(slice_name)
  if not mesh_shape:
    return partitioning.make_mesh(1, 1, 1, devices=devices[:1])
  return partitioning.make_mesh(*mesh_shape, devices=devices)


def annotation_steps(slice_name: str, aot: AotConfig, in_pipeline: bool) -> List[Step]:
  fn = annotate_lib.annotate
  dtype = _argument(fn, "dtype")
  mesh = _host_mesh(_argument(fn, "mesh_shape"), slice_name)
  if aot.annotation_model:
    model_config = presets.get(aot.annotation_model)
    source = f"preset {aot.annotation_model!r} (AotConfig.annotation_model)"
  elif in_pipeline:  # The trained teacher: its training architecture.
    model_config, source = _architecture("teacher", _train_config("teacher"),
                                         _pipeline_vocab_overrides("teacher"),
                                         mesh.devices.flat[0])
  else:
    raise ValueError("AotConfig.annotation_model is unset: an annotation config names its "
                     "teachers by checkpoint path, so bind the architecture for the compile, "
                     "e.g. AotConfig.annotation_model = 'bloom-176b'")
  # Teachers are loaded with their weights in the annotation dtype (checkpoint_io.load_any),
  # attending with the platform's kernel (annotate._load_teachers).
  model_config = model_config.replace(
      dtype=dtype, param_dtype=dtype,
      **kernels.attention_options(_argument(fn, "attention_impl"), mesh.devices.flat[0]))
  sampling = decoding.SamplingConfig()  # gin-configured (SamplingConfig.*), as annotate's.
  num_slots = _argument(fn, "num_slots")
  width = shapes.bucket_length(aot.prompt_tokens)
  length = width + sampling.max_new_tokens
  devices = mesh.devices.size
  prefill_flops = _forward_flops(model_config, width, num_slots * width, num_slots) / devices
  decode_flops = _forward_flops(model_config, length, num_slots, num_slots) / devices
  lowered = {}  # One engine lowering gives both steps.

  def lower(which: str):
    def run():
      if not lowered:
        decoder = decoding.Decoder(_abstract_model(model_config), mesh=mesh)
        engine = decoding.SlotEngine(decoder, sampling, num_slots=num_slots,
                                     max_prompt_length=aot.prompt_tokens,
                                     sync_every=_argument(fn, "sync_every"))
        decoder.check_length(engine.prompt_width, sampling.max_new_tokens)
        lowered.update(engine.lower())
      return lowered.pop(which)
    return run

  params = param_count(model_config)
  return [Step("annotate_prefill", mesh, lower("prefill"), _ANNOTATE_REMEDY, source, params,
               prefill_flops),
          Step("annotate_decode", mesh, lower("decode"), _ANNOTATE_REMEDY, source, params,
               decode_flops)]


def eval_step(slice_name: str, aot: AotConfig, in_pipeline: bool) -> Step:
  fn = evaluate_lib.evaluate
  mesh = _host_mesh(_argument(fn, "mesh_shape"), slice_name)
  device = mesh.devices.flat[0]
  if in_pipeline:  # The pipeline evaluates its students, as trained (checkpoint_io.load_model).
    model_config, source = _architecture("student", _train_config("student"),
                                         _pipeline_vocab_overrides("student"), device)
  elif aot.eval_model:  # scripts/evaluate.py: the platform's attention kernel.
    model_config = presets.get(aot.eval_model, **kernels.attention_options("", device))
    source = f"preset {aot.eval_model!r} (AotConfig.eval_model)"
  else:
    raise ValueError("AotConfig.eval_model is unset: an evaluation config names its model by "
                     "checkpoint path, so bind the architecture for the compile, e.g. "
                     "AotConfig.eval_model = 'opt-1.3b'")
  max_length = _argument(fn, "max_length")
  prompt_tokens = aot.eval_prompt_tokens or max_length
  if not prompt_tokens:
    raise ValueError("evaluate.max_length is None: bind AotConfig.eval_prompt_tokens, the "
                     "longest prompt to compile the scoring step for")

  batch_size = _argument(fn, "batch_size")
  width = shapes.bucket_length(prompt_tokens, step=evaluate_lib.BUCKET_STEP)
  model_flops = _forward_flops(model_config, width, batch_size * width, batch_size)

  def lower():
    scorer = evaluate_lib.RankScorer(_abstract_model(model_config),
                                     batch_size=batch_size,
                                     max_length=max_length, mesh=mesh)
    return scorer.lower(prompt_tokens, aot.eval_options, aot.eval_option_tokens)

  return Step("eval_score", mesh, lower, _EVAL_REMEDY, source, param_count(model_config),
              model_flops / mesh.devices.size)


def steps(slice_name: str, only: Optional[List[str]] = None) -> List[Step]:
  """Every step of the parsed gin configuration, for `slice_name` (see the module doc);
  `only`: just those steps (the others are not built)."""
  aot_config = AotConfig()
  in_pipeline = _bound("PipelineConfig.dataset")
  builders = {}  # step name -> builder of its Steps (annotation's two share one)
  if in_pipeline:
    builders["teacher_train"] = lambda: [train_step("teacher_train", "teacher", slice_name,
                                                    True)]
    builders["student_train"] = lambda: [train_step("student_train", "student", slice_name,
                                                    True)]
  elif _bound("ModelSettings.preset"):
    builders["train"] = lambda: [train_step("train", "", slice_name, False)]
  if in_pipeline or _bound("annotate.teachers"):
    annotation = lambda: annotation_steps(slice_name, aot_config, in_pipeline)
    builders["annotate_prefill"] = builders["annotate_decode"] = annotation
  if in_pipeline or _bound("evaluate.task_names"):
    builders["eval_score"] = lambda: [eval_step(slice_name, aot_config, in_pipeline)]
  if not builders:
    raise ValueError("the gin files configure no job: bind PipelineConfig, TrainConfig, "
                     "annotate or evaluate")
  wanted = list(builders) if not only else list(only)
  unknown = [name for name in wanted if name not in builders]
  if unknown:
    raise ValueError(f"--steps={','.join(only or ())}: {unknown} are not steps of this config "
                     f"({list(builders)})")
  out, built = [], set()
  for name in builders:
    if name in wanted and id(builders[name]) not in built:
      built.add(id(builders[name]))
      out.extend(s for s in builders[name]() if s.name in wanted)
  return out


def compile_steps(slice_name: str, only: Optional[List[str]] = None,
                  progress: Callable[[str], None] = lambda line: None) -> List[dict]:
  """Compiles every step for `slice_name`; one `aot.compile_step` record per step, with the
  roofline estimate (`estimated_step_s`, `estimated_mfu`) and, for a step that does not fit,
  `message` saying by how much and what to change."""
  records = []
  for step in steps(slice_name, only):
    progress(f"compiling {step.name} ({step.model}, {step.params / 1e9:.3g}B parameters) "
             f"for {slice_name} on mesh {partitioning.mesh_shape(step.mesh)}")
    record = aot.compile_step(step.name, step.lower(), slice_name, step.mesh,
                              step.model_flops_per_device, step.executed_flops_per_device)
    record["model"], record["params"] = step.model, step.params
    estimate = aot.estimate(record)
    record["estimated_step_s"] = estimate["step_s"]
    record["estimated_mfu"] = estimate["mfu"]
    record["estimate_bound"] = estimate["bound"]
    if not record["fits"]:
      record["message"] = aot.misfit_message(record, step.name.replace("_", " ") + " step",
                                             step.remedy)
    records.append(record)
  return records
