"""The paper's recipe end to end on small pretrained checkpoints: a BLOOM teacher in three
stages (multi-task, all three kinds, three specialists) -> annotation by sampling -> BLOOM and
OPT students, each with its own tokenizer -> evaluation; no vocabulary stage."""
import json
import pathlib

import gin
import numpy as np
import pytest

from teacherlm_jax import cli
from teacherlm_jax.data import hf_tokenizers, prompts
from teacherlm_jax.models import checkpoint_io
from test_pretrained import make_pretrained

SHRUNKEN = [
    "PipelineConfig.seeds = (0,)",
    "PipelineConfig.arms = ('original', 'teacher_annotated')",
    "PipelineConfig.synthetic_creatures = 64",
    "PipelineConfig.annotate_limit = 8",
    "PipelineConfig.eval_max_examples = 12",
    "PipelineConfig.student_epochs = None",
    "teacher_multitask/TrainConfig.num_steps = 2",
    "teacher/TrainConfig.num_steps = 2",
    "teacher_specialist/TrainConfig.num_steps = 2",
    # Learning rate 0: the students' parameters stay their checkpoints' (step 0), which this
    # test compares with transformers; the other stages train.
    "student/TrainConfig.num_steps = 1",
    "student/OptimizerConfig.learning_rate = 0.0",
    "CheckpointConfig.every = 10",
    "DataConfig.batch_size = 2",
    "DataConfig.seq_len = 64",
    "TrainConfig.eval_batches = 1",
    "MeshConfig.devices = 1",
    "SamplingConfig.max_new_tokens = 8",
    "annotate.num_slots = 8",
] + [  # One optimizer for the teacher stages: they then share one compiled train step.
    f"{scope}/OptimizerConfig.{name} = {value}"
    for scope in ("teacher_multitask", "teacher", "teacher_specialist")
    for name, value in (("learning_rate", "1e-3"), ("schedule", "'constant'"),
                        ("warmup_steps", "0"))]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
  from teacherlm_jax.data import synthetic
  from teacherlm_jax.pipeline import pipeline
  root = tmp_path_factory.mktemp("recipe")
  records = [r for split in synthetic.make_splits(64, seed=0).values() for r in split]
  texts = list(synthetic.iter_text(records)) + [
      prompts.sample_text(r["question"], r["options"], r["answer"]) for r in records]
  make_pretrained(root / "bloom", "bloom", texts)
  make_pretrained(root / "opt", "opt", texts)
  gin.clear_config()
  try:
    cli.parse(["gin/pipeline_pretrained_tiny.gin"], SHRUNKEN + [
        f"PipelineConfig.teacher_checkpoint = '{root / 'bloom'}'",
        f"PipelineConfig.students = {{'bloom': '{root / 'bloom'}', 'opt': '{root / 'opt'}'}}"])
    report = pipeline.Pipeline(pipeline.PipelineConfig(), root / "exp").run()
  finally:
    gin.clear_config()
  return root, root / "exp", report


def test_no_vocabulary_is_trained(experiment):
  _, exp, report = experiment
  assert report.exists()
  assert not (exp / "vocab").exists()


def test_teacher_runs_three_stages_and_three_specialists_annotate(experiment):
  root, exp, _ = experiment
  for stage in ("teacher_multitask", "teacher"):
    assert (exp / stage / "DONE.json").exists()
  rows = [json.loads(line) for line in (exp / "annotations" / "annotations.jsonl").open()]
  assert len(rows) == 8
  for kind in prompts.ANNOTATION_KINDS:
    specialist = json.loads((exp / f"teacher_{kind}" / "DONE.json").read_text())
    # Started from stage 2, which started from stage 1, which started from the checkpoint.
    assert json.loads((exp / f"teacher_{kind}" / "train_config.json").read_text())[
        "model"]["init_checkpoint"] == str(exp / "teacher")
    assert all(row["teacher"][kind] == str(pathlib.Path(specialist["hf_dir"]).resolve())
               for row in rows)
  assert json.loads((exp / "teacher" / "train_config.json").read_text())[
      "model"]["init_checkpoint"] == str(exp / "teacher_multitask")
  assert json.loads((exp / "teacher_multitask" / "train_config.json").read_text())[
      "model"]["init_hf_checkpoint"] == str(root / "bloom")
  # Sampled as the reference does.
  assert rows[0]["decoding"]["temperature"] == 1.0 and rows[0]["decoding"]["top_k"] == 50


def test_exported_teachers_carry_their_tokenizer(experiment):
  import transformers
  root, exp, _ = experiment
  bloom = hf_tokenizers.load(root / "bloom").get_vocab()
  for kind in prompts.ANNOTATION_KINDS:
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(exp / f"teacher_hf_{kind}"))
    assert tokenizer.get_vocab() == bloom


@pytest.mark.parametrize("student", ["bloom", "opt"])
def test_each_student_uses_its_own_tokenizer_and_starts_from_its_checkpoint(experiment,
                                                                           student):
  import torch
  import transformers
  root, exp, _ = experiment
  own = hf_tokenizers.load(root / student)
  # Each student's arms are compared with each other in a report of its own.
  assert (exp / "report" / student / "report.md").exists()
  for variant in ("original", "teacher_annotated"):
    model_dir = exp / "students" / student / f"{variant}_seed0"
    assert hf_tokenizers.load(model_dir).get_vocab() == own.get_vocab()
    assert (exp / "eval" / student / f"{variant}_seed0" / "DONE.json").exists()
    # Step-0 logits: what the trainer started from is the checkpoint, as transformers reads it.
    ids = own.encode("Q: What is 4 - 9 + 6? A: The answer is (D).", add_special_tokens=False)
    ours = np.asarray(checkpoint_io.load_model(model_dir)(np.asarray([ids], np.int32))[0])
    peer = transformers.AutoModelForCausalLM.from_pretrained(str(root / student)).eval()
    with torch.no_grad():
      theirs = peer(torch.tensor([ids])).logits.float().numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=2e-4)
