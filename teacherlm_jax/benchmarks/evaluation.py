"""Evaluation throughput: our shared-prefix rank scorer vs one request per option.

The reference harness (lm-eval, as TeacherLM uses it) scores a K-option example as K separate
requests, each running the whole prompt (+ option) through the model. Our `RankScorer` runs
the prompt once per example and, for multi-token options, only the option tails on a
repeated KV cache. Measured on the same converted BLOOM-shaped model (random weights, float32)
and the same real MMLU prompts (tokenised by a byte-level BPE trained on them):

  * ours batched vs ours one-request-per-option (same jitted model, same batch of rows):
    the algorithmic gain, for the paper's one-letter options and for multi-token option texts;
  * ours batched vs `transformers` (PyTorch) scoring one request per option, batched as the
    harness batches (right-padded rows): what replacing the reference harness buys.
"""
from __future__ import annotations

import tempfile
from typing import Dict, List

import numpy as np

from teacherlm_jax.benchmarks import timing


def _request_rows(examples) -> List[tuple]:
  """The harness's requests: (input tokens = (prompt + option)[:-1], option tokens)."""
  return [((ex.prompt + option)[:-1], option) for ex in examples for option in ex.options]


class PerOptionScorer:
  """Scores each (prompt, option) pair as its own row of a batched forward (harness style)."""

  def __init__(self, model, batch_size: int):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    self.batch_size = batch_size
    graphdef, self.state = nnx.split(model)

    def score(state, tokens_RxL, segments_RxL, positions_RxT, targets_RxT, mask_RxT):
      model = nnx.merge(graphdef, state)
      hidden, _ = model(tokens_RxL, segment_ids_BxL=segments_RxL, return_hidden=True)
      picked = jnp.take_along_axis(hidden, positions_RxT[..., None], axis=1)
      logp = jax.nn.log_softmax(model.logits(picked), axis=-1)
      token_logp = jnp.take_along_axis(logp, targets_RxT[..., None], axis=-1)[..., 0]
      return jnp.sum(jnp.where(mask_RxT, token_logp, 0.0), axis=1)

    self._score = jax.jit(score)

  def score(self, examples) -> np.ndarray:
    from teacherlm_jax.evaluation import evaluate
    from teacherlm_jax.runtime import shapes
    requests = _request_rows(examples)
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
    out = np.zeros(len(requests))
    for start in range(0, len(order), self.batch_size):
      index = order[start:start + self.batch_size]
      width = shapes.bucket_length(max(len(requests[i][0]) for i in index),
                                   step=evaluate.BUCKET_STEP)
      t = max(len(requests[i][1]) for i in index)
      tokens = np.zeros((self.batch_size, width), np.int32)
      segments = np.zeros_like(tokens)
      positions = np.zeros((self.batch_size, t), np.int32)
      targets = np.zeros_like(positions)
      mask = np.zeros((self.batch_size, t), bool)
      for row, i in enumerate(index):
        inputs, option = requests[i]
        tokens[row, :len(inputs)], segments[row, :len(inputs)] = inputs, 1
        n = len(option)
        positions[row, :n] = np.arange(len(inputs) - n, len(inputs))
        targets[row, :n], mask[row, :n] = option, True
      scores = np.asarray(self._score(self.state, tokens, segments, positions, targets, mask))
      out[index] = scores[:len(index)]
    return out


def _torch_per_option(torch_model, examples, batch_size: int, torch_device: str) -> np.ndarray:
  import torch
  requests = _request_rows(examples)
  out = np.zeros(len(requests))
  order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
  for start in range(0, len(order), batch_size):
    index = order[start:start + batch_size]
    width = max(len(requests[i][0]) for i in index)
    tokens = np.zeros((len(index), width), np.int64)
    mask = np.zeros_like(tokens)
    for row, i in enumerate(index):
      tokens[row, :len(requests[i][0])], mask[row, :len(requests[i][0])] = requests[i][0], 1
    with torch.no_grad():
      logits = torch_model(input_ids=torch.tensor(tokens, device=torch_device),
                           attention_mask=torch.tensor(mask, device=torch_device)).logits
      logp = torch.log_softmax(logits.float(), dim=-1).cpu().numpy()
    for row, i in enumerate(index):
      inputs, option = requests[i]
      pos = np.arange(len(inputs) - len(option), len(inputs))
      out[i] = logp[row, pos, option].sum()
  return out


def _mmlu_prompts(num_examples: int, seed: int = 0):
  """Real MMLU prompts and option texts, a seeded sample across all 57 subjects."""
  from teacherlm_jax.data import sources, tasks
  rows = []
  for subject in tasks.MMLU_SUBJECTS:
    path = sources.data_path("mmlu", "test", f"{subject}_test.csv")
    for row in sources.read_mmlu_csv(path):
      rows.append((tasks.prompts.eval_prompt_mmlu(subject, row["question"], row["options"]),
                   row["options"]))
  picked = np.random.default_rng(seed).choice(len(rows), size=num_examples, replace=False)
  return [rows[i] for i in picked], [r[0] for r in rows[::7]]


def benchmark_evaluation(device: bool = False, quick: bool = False, num_examples: int = None,
                         batch_size: int = 8, repeats: int = None) -> List[Dict]:
  """Rows (benchmark, metric, ours, pytorch, ratio, notes) for scripts/benchmark.py."""
  import torch
  import transformers

  from teacherlm_jax.data import vocab
  from teacherlm_jax.evaluation import evaluate
  from teacherlm_jax.models import hf

  if quick:
    shape = dict(hidden_size=256, n_layer=4, n_head=4)
    num_examples, repeats, vocab_size = num_examples or 32, repeats or 1, 4096
  else:
    shape = dict(hidden_size=512, n_layer=8, n_head=8)  # small-bloom-50m
    num_examples, repeats, vocab_size = num_examples or 128, repeats or 2, 16384
  torch_device = "cuda" if device and torch.cuda.is_available() else "cpu"
  picked, corpus = _mmlu_prompts(num_examples)
  rows = []
  with tempfile.TemporaryDirectory() as directory:
    v = vocab.HFTokenizerVocabulary(str(vocab.build_bpe_tokenizer(corpus, vocab_size,
                                                                  f"{directory}/tok")))
    torch.manual_seed(0)
    hf_config = transformers.BloomConfig(**shape, vocab_size=v.vocab_size, pad_token_id=3,
                                         eos_token_id=2)
    torch_model = transformers.BloomForCausalLM(hf_config).eval().to(torch_device)
    torch_model.save_pretrained(f"{directory}/model")
    _, model = hf.import_checkpoint(f"{directory}/model")
  prompt_ids = v.encode_batch([p for p, _ in picked])
  letters = [v.encode(letter) for letter in "ABCD"]
  variants = {
      "letters (paper)": [evaluate.Example(prompt=p, options=letters) for p in prompt_ids],
      "option texts": [evaluate.Example(prompt=p, options=[v.encode(" " + o) for o in options])
                       for p, (_, options) in zip(prompt_ids, picked)],
  }
  lengths = [len(p) for p in prompt_ids]
  for name, examples in variants.items():
    batched = evaluate.RankScorer(model, batch_size=batch_size)
    per_option = PerOptionScorer(model, batch_size=batch_size)
    results = {}

    def ours():
      results["ours"] = np.concatenate(batched.score(examples, normalize="sum"))

    def ours_per_option():
      results["per_option"] = per_option.score(examples)

    def theirs():
      results["torch"] = _torch_per_option(torch_model, examples, batch_size, torch_device)

    ours(), ours_per_option(), theirs()  # compile / warm up
    assert np.max(np.abs(results["ours"] - results["per_option"])) < 1e-3
    assert np.max(np.abs(results["ours"] - results["torch"])) < 1e-3
    ours_s, per_option_s, torch_s = timing.best_times([ours, ours_per_option, theirs], repeats)
    n = len(examples)
    option_tokens = np.mean([len(o) for ex in examples for o in ex.options])
    common = (f"bloom d={shape['hidden_size']} L={shape['n_layer']} V={v.vocab_size}, "
              f"{n} real MMLU prompts ({min(lengths)}-{max(lengths)} tokens), 4 options of "
              f"{option_tokens:.1f} tokens avg, batch {batch_size}")
    rows.append({"benchmark": "evaluation", "metric": f"examples/s, {name}, vs torch harness",
                 "ours": n / ours_s, "pytorch": n / torch_s, "ratio": torch_s / ours_s,
                 "notes": common + "; pytorch = transformers, one request per option"})
    rows.append({"benchmark": "evaluation",
                 "metric": f"examples/s, {name}, batched vs per-option (same model)",
                 "ours": n / ours_s, "pytorch": "", "ratio": per_option_s / ours_s,
                 "notes": f"ours per-option requests: {n / per_option_s:.3g} ex/s; " + common})
  return rows
