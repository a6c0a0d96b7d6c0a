"""Rank classification: our batched shared-prefix scorer equals transformers per-option scoring."""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT
from teacherlm_jax.data import mixtures
from teacherlm_jax.data import prompts
from teacherlm_jax.data import tasks
from teacherlm_jax.data import vocab
from teacherlm_jax.evaluation import evaluate

torch = pytest.importorskip("torch")
hf = pytest.importorskip("teacherlm_jax.models.hf")
hf_peers = pytest.importorskip("hf_peers")

NUM_MMLU = 200
CHECKPOINT_DIRS = {}  # family -> the HF directory the `peers` fixture wrote


@pytest.fixture(scope="module")
def mmlu_rows():
  from conftest import data_dir
  if not (data_dir() / "mmlu").is_dir():
    pytest.skip("real MMLU data is absent")
  rows = []
  for subject in tasks.MMLU_SUBJECTS:  # 8 questions from each subject, the 200 shortest
    rows.extend(ex for _, ex in zip(range(8), tasks.mmlu_examples(subject)))
  return sorted(rows, key=lambda r: len(r["inputs"]))[:NUM_MMLU]


@pytest.fixture(scope="module")
def vocabulary(mmlu_rows, tmp_path_factory):
  directory = vocab.build_bpe_tokenizer([r["inputs"] for r in mmlu_rows], 512,
                                        tmp_path_factory.mktemp("tok"))
  return vocab.HFTokenizerVocabulary(str(directory))


@pytest.fixture(scope="module", params=["bloom", "opt"])
def peers(request, vocabulary, tmp_path_factory):
  """(torch model, our imported model) with the same random weights."""
  directory = tmp_path_factory.mktemp(request.param)
  # The model's special ids are its tokenizer's (evaluate() checks that they agree).
  overrides = {"vocab_size": vocabulary.vocab_size, "pad_token_id": vocabulary.pad_id,
               "eos_token_id": vocabulary.eos_id, "bos_token_id": vocabulary.bos_id}
  if request.param == "opt":
    overrides["max_position_embeddings"] = 2048
  torch_model = hf_peers.make_hf_model(request.param, directory, **overrides)
  _, model = hf.import_checkpoint(directory)
  CHECKPOINT_DIRS[request.param] = directory
  return request.param, torch_model, model


def _torch_option_logprobs(torch_model, prompt, options):
  """The reference harness: one request per option, input (prompt + option)[:-1]."""
  scores = []
  for option in options:
    tokens = torch.tensor([prompt + option[:-1]])
    with torch.no_grad():
      logp = torch.log_softmax(torch_model(input_ids=tokens).logits.float(), dim=-1)[0]
    positions = range(len(prompt) - 1, len(prompt) - 1 + len(option))
    scores.append(float(sum(logp[p, t] for p, t in zip(positions, option))))
  return np.array(scores)


def test_letter_scores_and_mmlu_accuracy_match_transformers(peers, mmlu_rows, vocabulary):
  family, torch_model, model = peers
  prompt_ids = vocabulary.encode_batch([r["inputs"] for r in mmlu_rows])
  letters = [vocabulary.encode(o) for o in prompts.eval_options(4)]
  assert all(len(l) == 1 for l in letters)
  examples = [evaluate.Example(prompt=p, options=letters, label=r["label"], id=r["id"])
              for p, r in zip(prompt_ids, mmlu_rows)]
  ours = evaluate.RankScorer(model, batch_size=8).score(examples, normalize="sum")
  # One-token options: the harness's K requests all reduce to the prompt's last position.
  # Batched as the harness batches: right-padded rows (causal, so pads after a prompt's last
  # token do not change it), with the attention mask.
  width = max(len(p) for p in prompt_ids)
  tokens = np.zeros((len(prompt_ids), width), np.int64)
  mask = np.zeros_like(tokens)
  for i, p in enumerate(prompt_ids):
    tokens[i, :len(p)], mask[i, :len(p)] = p, 1
  with torch.no_grad():
    logits = torch_model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits
  logp = torch.log_softmax(logits.float(), -1).numpy()
  reference = [logp[i, len(p) - 1, [l[0] for l in letters]].astype(np.float64)
               for i, p in enumerate(prompt_ids)]
  ours_arr, ref_arr = np.stack(ours), np.stack(reference)
  assert np.max(np.abs(ours_arr - ref_arr)) < 1e-4, family
  labels = [r["label"] for r in mmlu_rows]
  ours_acc = tasks.accuracy_from_scores(labels, ours)
  ref_acc = tasks.accuracy_from_scores(labels, reference)
  assert ours_acc["accuracy"] == ref_acc["accuracy"] and ours_acc["num_examples"] == NUM_MMLU
  # The mean gold score sums float32 scores: equal to rounding, not bit for bit.
  assert abs(ours_acc["gold_score"] - ref_acc["gold_score"]) < 1e-4
  np.testing.assert_array_equal(ours_arr.argmax(1), ref_arr.argmax(1))


def test_multi_token_options_match_per_option_requests(peers, mmlu_rows, vocabulary):
  family, torch_model, model = peers
  rows = [r for r in mmlu_rows if len(vocabulary.encode(r["inputs"])) < 120][:12]
  examples = []
  for r in rows:
    # The option texts as continuations: multi-token, different lengths per option.
    question = r["inputs"]
    texts = [question.split(f"({l}) ")[1].split(" (")[0] for l in "ABCD"]
    examples.append(evaluate.Example(prompt=vocabulary.encode(question),
                                     options=[vocabulary.encode(" " + t) for t in texts],
                                     label=r["label"], id=r["id"]))
  assert max(len(o) for ex in examples for o in ex.options) > 2
  scorer = evaluate.RankScorer(model, batch_size=4)
  summed = scorer.score(examples, normalize="sum")
  means = scorer.score(examples, normalize="mean")
  for ex, s, m in zip(examples, summed, means):
    expected = _torch_option_logprobs(torch_model, ex.prompt, ex.options)
    assert np.max(np.abs(s - expected)) < 1e-4, family
    np.testing.assert_allclose(m, expected / [len(o) for o in ex.options], atol=1e-5)
  # Sharded over the 8 simulated devices (batch over data x fsdp, params by logical axes).
  from teacherlm_jax.runtime import partitioning
  # (The tiny OPT peer has 3 heads, so no tensor axis here.)
  mesh = partitioning.make_mesh(data=2, fsdp=4, tensor=1)
  sharded = evaluate.RankScorer(model, batch_size=8, mesh=mesh).score(examples, normalize="sum")
  # Sums of up to ~150 nats: float32 rounding alone (another batch shape, another summation
  # order) reaches 2e-7 of them, above 1e-5 absolute.
  np.testing.assert_allclose(np.concatenate(sharded), np.concatenate(summed), rtol=1e-6,
                             atol=1e-5)
  with pytest.raises(ValueError, match="batch_size=4 does not divide"):
    evaluate.RankScorer(model, batch_size=4, mesh=mesh)


def test_evaluate_tasks_writes_reports(peers, vocabulary, tmp_path):
  family, _, model = peers
  if family != "bloom":
    pytest.skip("report plumbing is family independent")
  mixtures.register_all(vocabulary)
  report = evaluate.evaluate(model, vocabulary, ["creak", "strategyqa"], max_examples=24,
                             batch_size=8, progress=False)
  assert set(report["tasks"]) == {"creak", "strategyqa"}
  for metrics in report["tasks"].values():
    assert metrics["num_examples"] == 24 and 0 <= metrics["accuracy"] <= 100
  assert report["macro"] == {}  # mmlu subjects were not all evaluated
  json_path, md_path = evaluate.write_report(report, tmp_path)
  assert json.loads(json_path.read_text())["tasks"]["creak"]["num_examples"] == 24
  assert "| creak |" in md_path.read_text()
  macro = evaluate.macro_averages({**{t: {"accuracy": 50.0} for t in tasks.MMLU_TASKS},
                                   "creak": {"accuracy": 70.0}, "ecqa": {"accuracy": 30.0},
                                   "strategyqa": {"accuracy": 90.0}})
  assert macro == {"mmlu": 50.0, "teacherlm_eval": 60.0}
  # The same scorer drives seqio.Evaluator through the tasks' score metric.
  import seqio
  evaluator = seqio.Evaluator("creak", evaluate.RankClassificationFeatureConverter(), eval_split="test",
                              num_examples=24, use_memory_cache=True)
  scorer = evaluate.RankScorer(model, batch_size=8)
  future, _ = evaluator.evaluate(compute_metrics=True,
                                 score_fn=evaluate.seqio_score_fn(scorer, vocabulary))
  seqio_metrics = future.result()["creak"]
  assert seqio_metrics["num_examples"] == 24
  assert seqio_metrics["accuracy"] == pytest.approx(report["tasks"]["creak"]["accuracy"])
  with pytest.raises(ValueError, match="normalize="):
    evaluate.RankScorer(model).score([], normalize="bytes")


def test_evaluate_script(peers, vocabulary, shared_data, tmp_path):
  family, _, _ = peers
  if family != "opt":
    pytest.skip("one family is enough for the command line")
  out = subprocess.run(
      [sys.executable, str(REPO_ROOT / "scripts" / "evaluate.py"), "--gin_file=gin/eval.gin",
       f"--checkpoint={CHECKPOINT_DIRS[family]}", f"--tokenizer={vocabulary.tokenizer_dir}",
       f"--output_dir={tmp_path}", f"--data_dir={shared_data}",
       "--gin.evaluate.task_names=['ecqa', 'mmlu_anatomy']", "--gin.evaluate.max_examples=8",
       "--gin.evaluate.progress=False", "--gin.evaluate.mesh_shape=(2, 4, 1)"],
      capture_output=True, text=True, cwd=REPO_ROOT, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads((tmp_path / "eval_results.json").read_text())
  assert {t: m["num_examples"] for t, m in report["tasks"].items()} == {"ecqa": 8,
                                                                       "mmlu_anatomy": 8}
  assert "| ecqa |" in out.stdout and report["normalize"] == "mean"
