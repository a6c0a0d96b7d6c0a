"""Rank-classification evaluation: score every option of an example, pick the most likely.

How an example is scored (the paper's zero-shot protocol, as the reference lm-eval harness does
it: prompt and each option tokenised separately, option log-likelihood = sum of log p(option
token | prompt, previous option tokens)):

  1. One forward over the prompts of a batch of examples (right-padded to a power-of-two
     bucket) writes their keys/values into a KV cache and yields, at each prompt's last token,
     the distribution of every option's first token. TeacherLM's options are single letters
     ('A'..'E'), so for the paper's tasks this one forward is the whole cost.
  2. Options longer than one token: the cache is repeated once per option (rows E*K) and one
     more forward runs only the option tokens, which attend to the cached prompt. The prompt
     is never recomputed per option, unlike the reference harness, which runs
     prompt+option as a separate request per option (K prompt forwards per example).

Both steps are one jitted function over `nnx.split` state. Only the hidden state at the
gathered positions goes through the LM head, so a 250k-entry vocabulary never materialises
B x L x V logits. Scores are summed ('sum', the harness) or divided by the option's token count
('mean', length-normalised, the paper's choice); the flag changes nothing for one-token options.

Results: accuracy per task through the tasks' seqio score metric (`tasks.accuracy_from_scores`),
macro averages for `mmlu` (57 subjects) and `teacherlm_eval` (mmlu, creak, ecqa, strategyqa),
written as JSON and a markdown table.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import logging
from flax import nnx
import gin
import jax
import jax.numpy as jnp
import numpy as np
import seqio
import tensorflow as tf

from teacherlm_jax.data import mixtures
from teacherlm_jax.data import tasks as tasks_lib
from teacherlm_jax.data import vocab as vocab_lib
from teacherlm_jax.models import checkpoint_vocab
from teacherlm_jax.models import transformer
from teacherlm_jax.runtime import backend
from teacherlm_jax.runtime import partitioning
from teacherlm_jax.runtime import program as program_lib
from teacherlm_jax.runtime import shapes
from teacherlm_jax.storage import files

NORMALIZATIONS = ("sum", "mean")
# Prompts past this many tokens pad to its multiples, not to the next power of two.
BUCKET_STEP = 256


@dataclasses.dataclass
class Example:
  """One rank-classification example, tokenised."""
  prompt: List[int]
  options: List[List[int]]
  label: int = -1
  id: str = ""


class RankScorer:
  """Scores options of many examples with shared-prefix batched forwards (see module doc)."""

  def __init__(self, model: transformer.DecoderLM, *, batch_size: int = 8,
               max_length: Optional[int] = None, mesh: Optional[jax.sharding.Mesh] = None):
    """`mesh`: shard parameters by their logical axes and batch rows over ('data', 'fsdp')
    (single process; `batch_size` must divide over the batch axes)."""
    self.config = model.config
    self.batch_size = batch_size
    self.max_length = max_length
    if mesh is not None:
      partitioning.check_batch_divides(batch_size, mesh, what="batch_size")
    self.runtime = program_lib.Program(mesh)
    self._graphdef, self.params = self.runtime.split(model)
    self._score = self.runtime.jit(self._score_batch, program=backend.DECODE,
                                   dtype=self.config.compute_dtype,
                                   static_argnames=("tail_length",))

  @property
  def mesh(self) -> Optional[jax.sharding.Mesh]:
    return self.runtime.mesh

  def lower(self, prompt_length: int, num_options: int, option_length: int = 1
            ) -> jax.stages.Lowered:
    """The scoring step of a full batch lowered on the mesh, abstract arguments only: prompts
    of up to `prompt_length` tokens, `num_options` options of up to `option_length` tokens,
    bucketed as `score` buckets them."""
    if self.mesh is None:
      raise ValueError("RankScorer.lower needs a mesh (the devices to compile for)")
    b, p = self.batch_size, shapes.bucket_length(prompt_length, step=BUCKET_STEP)
    tail = (shapes.bucket_length(option_length - 1, minimum=4, step=BUCKET_STEP)
            if option_length > 1 else 0)
    arg_shapes = [(b, p), (b, p), (b,), (b, num_options)] + [(b * num_options, tail)] * 3
    rows = partitioning.batch_sharding(self.mesh, 1)
    arrays = [jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rows) for shape in arg_shapes]
    return self._score.lower(self.params, *arrays, tail_length=tail)

  def _call(self, arrays, tail_length: int) -> np.ndarray:
    placed = [self.runtime.put(a, ("batch",) + (None,) * (np.ndim(a) - 1)) for a in arrays]
    return np.asarray(self._score(self.params, *placed, tail_length=tail_length))

  def _score_batch(self, params, prompt_BxP, prompt_segments_BxP, last_B, first_BxK, tail_RxT,
                   tail_segments_RxT, tail_targets_RxT, *, tail_length: int):
    """Sum of option-token log-probs, B x K (R = B*K rows for the option tails)."""
    model = nnx.merge(self._graphdef, params)
    b, p = prompt_BxP.shape
    k = first_BxK.shape[1]
    # One-token options (the paper's letters) need no cache: the prompt forward is all.
    cache = transformer.init_cache(self.config, b, p + tail_length) if tail_length else None
    hidden_BxPxD, cache = model(prompt_BxP, segment_ids_BxL=prompt_segments_BxP, cache=cache,
                                return_hidden=True)
    last_Bx1xD = jnp.take_along_axis(hidden_BxPxD, last_B[:, None, None], axis=1)
    logp_BxV = jax.nn.log_softmax(model.logits(last_Bx1xD)[:, 0], axis=-1)
    scores_BxK = jnp.take_along_axis(logp_BxV, first_BxK, axis=1)
    if tail_length:
      cache = transformer.map_cache_rows(lambda x, axis: jnp.repeat(x, k, axis=axis), cache)
      hidden_RxTxD, _ = model(tail_RxT, segment_ids_BxL=tail_segments_RxT, cache=cache,
                              return_hidden=True)
      logp_RxTxV = jax.nn.log_softmax(model.logits(hidden_RxTxD), axis=-1)
      token_logp_RxT = jnp.take_along_axis(logp_RxTxV, tail_targets_RxT[..., None], axis=-1)[..., 0]
      token_logp_RxT = jnp.where(tail_segments_RxT != 0, token_logp_RxT, 0.0)
      scores_BxK = scores_BxK + token_logp_RxT.sum(axis=1).reshape(b, k)
    return scores_BxK

  def _truncate(self, example: Example) -> List[int]:
    """Left-truncates the prompt as the harness does: (prompt + option)[-(max_length + 1):]."""
    if self.max_length is None:
      return example.prompt
    longest = max(len(o) for o in example.options)
    keep = self.max_length + 1 - longest
    if keep <= 0:
      raise ValueError(f"example {example.id!r}: an option of {longest} tokens does not fit "
                       f"max_length={self.max_length}")
    return example.prompt[-keep:]

  def _batch_arrays(self, batch: Sequence[Example], num_options: int):
    prompts = [self._truncate(ex) for ex in batch]
    rows = self.batch_size
    p = shapes.bucket_length(max(len(x) for x in prompts), step=BUCKET_STEP)
    tail = max(len(o) - 1 for ex in batch for o in ex.options)
    t = shapes.bucket_length(tail, minimum=4, step=BUCKET_STEP) if tail else 0
    prompt = np.zeros((rows, p), np.int32)
    segments = np.zeros((rows, p), np.int32)
    last = np.zeros((rows,), np.int32)
    first = np.zeros((rows, num_options), np.int32)
    tail_tokens = np.zeros((rows * num_options, max(t, 1)), np.int32)
    tail_segments = np.zeros_like(tail_tokens)
    tail_targets = np.zeros_like(tail_tokens)
    for i, (ex, tokens) in enumerate(zip(batch, prompts)):
      if not tokens:
        raise ValueError(f"example {ex.id!r}: empty prompt")
      prompt[i, :len(tokens)] = tokens
      segments[i, :len(tokens)] = 1
      last[i] = len(tokens) - 1
      for j, option in enumerate(ex.options):
        if not option:
          raise ValueError(f"example {ex.id!r}: option {j} tokenises to nothing")
        first[i, j] = option[0]
        r = i * num_options + j
        n = len(option) - 1
        tail_tokens[r, :n] = option[:-1]
        tail_segments[r, :n] = 1
        tail_targets[r, :n] = option[1:]
    return (prompt, segments, last, first, tail_tokens[:, :t] if t else tail_tokens[:, :0],
            tail_segments[:, :t] if t else tail_segments[:, :0],
            tail_targets[:, :t] if t else tail_targets[:, :0], t)

  def score(self, examples: Sequence[Example], *, normalize: str = "sum",
            progress: Optional[str] = None) -> List[np.ndarray]:
    """Per example, one score per option (higher = more likely), in input order."""
    if normalize not in NORMALIZATIONS:
      raise ValueError(f"normalize={normalize!r}: expected one of {NORMALIZATIONS}")
    # Longest first, so batches hold similar lengths and the first batch shows the peak cost.
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].prompt))
    results: List[Optional[np.ndarray]] = [None] * len(examples)
    for start in range(0, len(order), self.batch_size):
      if progress is not None:  # A line at most every 30 s: log files take lines, not bars.
        logging.log_every_n_seconds(logging.INFO, "%s: %d/%d examples scored", 30, progress,
                                    start, len(examples))
      index = order[start:start + self.batch_size]
      batch = [examples[i] for i in index]
      num_options = max(len(ex.options) for ex in batch)
      *arrays, tail_length = self._batch_arrays(batch, num_options)
      scores = self._call(arrays, tail_length)
      for row, (i, ex) in enumerate(zip(index, batch)):
        option_scores = scores[row, :len(ex.options)].astype(np.float64)
        if normalize == "mean":
          option_scores = option_scores / np.array([len(o) for o in ex.options])
        results[i] = option_scores
    return results  # type: ignore[return-value]


def task_examples(task_name: str, vocabulary, *, split: str = "test",
                  max_examples: Optional[int] = None) -> List[Example]:
  """The tokenised rank-classification examples of a registered evaluation task."""
  task = tasks_lib.get_task(task_name)
  ds = task.get_dataset(sequence_length=None, split=split, shuffle=False)
  if max_examples is not None:
    ds = ds.take(max_examples)
  option_cache: Dict[bytes, List[int]] = {}
  examples = []
  for ex in ds.as_numpy_iterator():
    if "options" not in ex:
      raise ValueError(f"task {task_name!r} is not a rank-classification task (no 'options')")
    options = []
    for option in ex["options"]:
      if option not in option_cache:
        option_cache[option] = list(vocabulary.encode(option.decode("utf-8")))
      options.append(option_cache[option])
    examples.append(Example(prompt=ex["inputs"].tolist(), options=options,
                            label=int(ex["label"]), id=ex["id"].decode("utf-8")))
  return examples


class RankClassificationFeatureConverter(seqio.FeatureConverter):
  """Keeps task features as they are (tokens plus 'options', 'label', 'id'), for
  `seqio.Evaluator` with `seqio_score_fn`: the scorer does its own batching and padding."""
  TASK_FEATURES = {"inputs": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
                   "targets": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)}
  MODEL_FEATURES = {**TASK_FEATURES,
                    "options": seqio.FeatureConverter.FeatureSpec(dtype=tf.string, rank=1),
                    "label": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32, rank=0),
                    "id": seqio.FeatureConverter.FeatureSpec(dtype=tf.string, rank=0)}
  PACKING_FEATURE_DTYPES = {}

  def __init__(self):
    super().__init__(pack=False)

  def __call__(self, ds, task_feature_lengths):
    # No length checks: nothing is padded or trimmed here (the scorer buckets lengths itself).
    return self._convert_features(ds, task_feature_lengths)

  def _convert_features(self, ds, task_feature_lengths):
    del task_feature_lengths
    return ds.map(lambda ex: {k: ex[k] for k in self.MODEL_FEATURES},
                  num_parallel_calls=tf.data.AUTOTUNE)

  def get_model_feature_lengths(self, task_feature_lengths):
    return task_feature_lengths


def seqio_score_fn(scorer: RankScorer, vocabulary, *, normalize: str = "mean"):
  """A `score_fn` for `seqio.Evaluator` (with `RankClassificationFeatureConverter()`): scores the
  enumerated task dataset with `scorer` and returns [(index, per-option scores)], which the
  tasks' score metric (`tasks.accuracy_from_scores`) turns into accuracy."""

  def score_fn(dataset, model_feature_shapes=None):
    del model_feature_shapes
    indices, examples = [], []
    for index, ex in dataset.as_numpy_iterator():
      indices.append(int(index))
      examples.append(Example(prompt=ex["inputs"].tolist(),
                              options=[list(vocabulary.encode(o.decode("utf-8")))
                                       for o in ex["options"]],
                              label=int(ex["label"]), id=ex["id"].decode("utf-8")))
    return list(zip(indices, scorer.score(examples, normalize=normalize)))

  return score_fn


def _macro(values: Sequence[float]) -> float:
  return float(np.mean(values)) if values else float("nan")


def macro_averages(per_task: Dict[str, Dict[str, Any]]) -> Dict[str, float]:
  """'mmlu' over the 57 subjects, 'teacherlm_eval' over (mmlu, creak, ecqa, strategyqa), each
  only when all of its parts were evaluated."""
  out = {}
  if all(t in per_task for t in tasks_lib.MMLU_TASKS):
    out["mmlu"] = _macro([per_task[t]["accuracy"] for t in tasks_lib.MMLU_TASKS])
  if "mmlu" in out and all(t in per_task for t in tasks_lib.QA_EVAL_TASKS):
    out["teacherlm_eval"] = _macro(
        [out["mmlu"]] + [per_task[t]["accuracy"] for t in tasks_lib.QA_EVAL_TASKS])
  return out


@gin.configurable
def evaluate(model: transformer.DecoderLM, vocabulary, task_names: Sequence[str] = ("teacherlm_eval",),
             *, split: str = "test", batch_size: int = 8, normalize: str = "mean",
             max_length: Optional[int] = None, max_examples: Optional[int] = None,
             mesh_shape: Optional[Sequence[int]] = None, progress: bool = True,
             model_source: str = "the model") -> Dict[str, Any]:
  """Evaluates `model` on tasks or mixtures (expanded to their tasks); returns the report dict.

  mesh_shape: (data, fsdp, tensor) to shard the scorer over this process's devices.
  model_source: the checkpoint `model` came from, named in errors.
  """
  vocab_lib.check_fits_model(vocabulary.vocab_size, vocab_lib.vocabulary_source(vocabulary),
                             model.config.vocab_size, model_source,
                             {"eos": vocabulary.eos_id, "pad": vocabulary.pad_id})
  checkpoint_vocab.check_special_ids(
      vocab_lib.vocabulary_source(vocabulary), checkpoint_vocab.tokenizer_special_ids(vocabulary),
      model_source, checkpoint_vocab.model_special_ids(model.config))
  names = [t for name in task_names for t in mixtures.leaf_tasks(name)]
  mesh = partitioning.make_mesh(*mesh_shape) if mesh_shape else None
  scorer = RankScorer(model, batch_size=batch_size, max_length=max_length, mesh=mesh)
  per_task, total_examples, total_seconds = {}, 0, 0.0
  for i, name in enumerate(names):
    examples = task_examples(name, vocabulary, split=split, max_examples=max_examples)
    for ex in examples:  # Before any scoring: an id past the embedding scores garbage.
      vocab_lib.check_ids_fit_model([*ex.prompt, *(t for o in ex.options for t in o)],
                                    model.config.vocab_size, f"task {name} example {ex.id!r}",
                                    vocab_lib.vocabulary_source(vocabulary), model_source)
    start = time.perf_counter()
    scores = scorer.score(examples, normalize=normalize,
                          progress=f"[{i + 1}/{len(names)}] {name}" if progress else None)
    seconds = time.perf_counter() - start
    task = tasks_lib.get_task(name)
    metrics = {}
    for metric_fn in task.score_metric_fns:
      metrics.update(metric_fn([ex.label for ex in examples], scores))
    metrics["examples_per_second"] = len(examples) / seconds if seconds else float("nan")
    per_task[name] = metrics
    total_examples += len(examples)
    total_seconds += seconds
    logging.info("%s: accuracy %.2f over %d examples (%.1f ex/s)", name, metrics["accuracy"],
                 len(examples), metrics["examples_per_second"])
  return {"tasks": per_task, "macro": macro_averages(per_task), "split": split,
          "normalize": normalize, "num_examples": total_examples,
          "examples_per_second": total_examples / total_seconds if total_seconds else float("nan"),
          "skipped_rows": tasks_lib.SKIPS.total, "skipped_by_file": tasks_lib.SKIPS.by_file()}


def markdown_table(report: Dict[str, Any]) -> str:
  lines = ["| task | accuracy | examples |", "|---|---:|---:|"]
  for name, metrics in report["tasks"].items():
    lines.append(f"| {name} | {metrics['accuracy']:.2f} | {metrics['num_examples']} |")
  for name, value in report["macro"].items():
    lines.append(f"| **{name}** (macro) | **{value:.2f}** | |")
  lines.append("")
  lines.append(f"normalize={report['normalize']}, split={report['split']}, "
               f"{report['num_examples']} examples at {report['examples_per_second']:.1f} ex/s, "
               f"{report['skipped_rows']} bad rows skipped")
  return "\n".join(lines) + "\n"


def _finite_or_null(value):
  """The report with NaN/Inf (e.g. an average over no examples) as null: valid JSON."""
  if isinstance(value, dict):
    return {k: _finite_or_null(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite_or_null(v) for v in value]
  if isinstance(value, (float, np.floating)) and not math.isfinite(value):
    return None
  return value


def write_report(report: Dict[str, Any], output_dir) -> Tuple[files.Path, files.Path]:
  """Writes eval_results.json and eval_results.md into `output_dir` (process 0 only)."""
  output_dir = files.resolve(output_dir)
  json_path, md_path = output_dir / "eval_results.json", output_dir / "eval_results.md"
  if jax.process_index() == 0:
    files.write_atomic(json_path, json.dumps(_finite_or_null(report), indent=2, sort_keys=True,
                                             allow_nan=False) + "\n")
    files.write_atomic(md_path, markdown_table(report))
  return json_path, md_path
