"""Pretrained checkpoints bring their own tokenizers: a stage trains with its checkpoint's
tokenizer, anything else is an error naming both, and a student trains from an annotation
directory with scripts/train.py alone."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from hf_peers import make_hf_model
from teacherlm_jax.data import hf_tokenizers, prompts, record_tasks, synthetic, vocab
from teacherlm_jax.models import checkpoint_io, checkpoint_vocab
from teacherlm_jax.training import train as train_lib
from teacherlm_jax.training import train_config
from teacherlm_jax.training import train_data

REPO = pathlib.Path(__file__).resolve().parents[1]
# A stage small enough to run in seconds on one CPU device.
TINY_RUN = train_config.TrainConfig(
    data=train_config.DataConfig(seq_len=64, batch_size=2, loss_on="all"),
    optimizer=train_config.OptimizerConfig(learning_rate=0.0),
    mesh=train_config.MeshConfig(devices=1),
    checkpoint=train_config.CheckpointConfig(every=1, async_save=False),
    logging=train_config.LoggingConfig(tensorboard=False, peak_tflops_per_device=0.1),
    num_steps=1, eval_batches=0)


def make_pretrained(directory: pathlib.Path, family: str, texts, **model_overrides):
  """A random HF `family` checkpoint with a BPE tokenizer trained on `texts` beside it."""
  vocab.build_bpe_tokenizer(texts, vocab_size=320, directory=directory, layout=family)
  tokenizer = hf_tokenizers.load(directory)
  special = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                 bos_token_id=tokenizer.bos_token_id)
  config = {"vocab_size": len(tokenizer), **special, **model_overrides}
  if family == "opt":
    config["max_position_embeddings"] = 128
  return make_hf_model(family, directory, **config)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  root = tmp_path_factory.mktemp("pretrained")
  records = synthetic.make_splits(64, seed=0)["student"][:24]
  texts = list(synthetic.iter_text(records)) + [
      prompts.sample_text(r["question"], r["options"], r["answer"]) for r in records]
  make_pretrained(root / "bloom", "bloom", texts)
  make_pretrained(root / "opt", "opt", texts)
  # An annotation job's output: its merged file (rows carry the records and the three kinds).
  (root / "annotations").mkdir()
  rows = [{**r, "qc": {k: [] for k in prompts.ANNOTATION_KINDS}} for r in records]
  rows[0]["qc"]["chain_of_thought"] = ["repetition"]
  synthetic.write_jsonl(rows, root / "annotations" / "merged.jsonl")
  synthetic.write_jsonl(records, root / "student.jsonl")
  spm = vocab.train_sentencepiece(texts, str(root / "spm" / "spm"), 120, "bpe")
  return root, spm


def _task(workdir, spec: str, name: str) -> str:
  root, _ = workdir
  return record_tasks.register_record_tasks(name, vocab.get_vocabulary(spec),
                                            student_path=root / "student.jsonl")["original"]


def _config(task: str, **changes):
  return TINY_RUN.replace(data=dict(train_task=task)).replace(**changes)


def test_sentencepiece_data_with_a_pretrained_checkpoint_fails_naming_both(workdir, tmp_path):
  root, spm = workdir
  task = _task(workdir, f"spm:{spm}", "spm_data")
  with pytest.raises(checkpoint_vocab.VocabularyMismatch) as error:
    train_lib.train(_config(task, model=dict(init_hf_checkpoint=str(root / "bloom"))),
                    str(tmp_path / "a"))
  assert spm in str(error.value) and str(root / "bloom") in str(error.value)
  # Another family's tokenizer is just as wrong.
  task = _task(workdir, f"hf:{root / 'opt'}", "opt_data")
  with pytest.raises(checkpoint_vocab.VocabularyMismatch, match="opt.*bloom"):
    train_lib.train(_config(task, model=dict(init_hf_checkpoint=str(root / "bloom"))),
                    str(tmp_path / "b"))


def test_reinit_embeddings_is_the_one_way_to_change_vocabulary(workdir, tmp_path):
  root, spm = workdir
  task = _task(workdir, f"spm:{spm}", "spm_data")
  result = train_lib.train(
      _config(task, model=dict(init_hf_checkpoint=str(root / "bloom"), reinit_embeddings=True)),
      str(tmp_path / "student"))
  assert result["step"] == 1
  spm_size = vocab.get_vocabulary(f"spm:{spm}").vocab_size
  assert checkpoint_io.read_model_config(tmp_path / "student").vocab_size == spm_size
  # The stage carries its data's vocabulary: the next stage started from it agrees.
  assert checkpoint_vocab.tokenizer_spec(tmp_path / "student").startswith("spm:")


def test_vocab_size_override_contradicting_the_checkpoint_fails(workdir, tmp_path):
  root, _ = workdir
  task = _task(workdir, f"hf:{root / 'bloom'}", "bloom_data")
  config = _config(
      task, model=dict(init_hf_checkpoint=str(root / "bloom"), overrides={"vocab_size": 32000}))
  with pytest.raises(checkpoint_vocab.VocabularyMismatch, match="vocab_size=32000"):
    train_lib.train(config, str(tmp_path / "a"))


def test_tokenizer_larger_than_the_model_fails(workdir, tmp_path):
  root, _ = workdir
  small = tmp_path / "small_bloom"
  size = len(hf_tokenizers.load(root / "bloom"))
  make_hf_model("bloom", small, vocab_size=size - 20, pad_token_id=3, eos_token_id=2)
  hf_tokenizers.load(root / "bloom").save_pretrained(str(small))
  task = _task(workdir, f"hf:{small}", "small_data")
  with pytest.raises(checkpoint_vocab.VocabularyMismatch,
                     match=rf"{size} tokens.*{small}.*vocab_size={size - 20}"):
    train_lib.train(_config(task, model=dict(init_hf_checkpoint=str(small))), str(tmp_path / "a"))


def test_a_token_id_beyond_the_vocabulary_is_an_error_not_clamped(workdir, tmp_path):
  root, _ = workdir
  size = len(hf_tokenizers.load(root / "bloom"))

  def batches(start):
    del start
    while True:
      tokens = np.full((2, 64), 5, np.int32)
      tokens[1, 7] = size  # One past the last embedding row.
      yield {"tokens": tokens, "targets": tokens, "loss_weights": np.ones((2, 64), np.float32),
             "segment_ids": np.ones((2, 64), np.int32),
             "positions": np.tile(np.arange(64, dtype=np.int32), (2, 1))}
  config = _config("", model=dict(init_hf_checkpoint=str(root / "bloom")))
  with pytest.raises(checkpoint_vocab.VocabularyMismatch, match=rf"token id {size}.*bloom"):
    train_lib.train(config, str(tmp_path / "a"), train_batches=batches)


def test_students_keep_the_last_tokens_of_a_text(workdir):
  root, _ = workdir
  spec = f"hf:{root / 'opt'}"
  task = _task(workdir, spec, "tail_data")
  seq_len = 24
  batch = next(train_data.SeqioBatches(task, "train", seq_len, 1, loss_on="all", pack=True,
                                       shuffle=False, repeat=False)())
  example = next(iter(train_data.get_task(task).get_dataset(
      sequence_length=None, split="train", shuffle=False, use_cached=False)))
  full = np.concatenate([example["inputs"].numpy(), example["targets"].numpy()])
  assert len(full) > seq_len, "the text must be longer than seq_len for this test to mean much"
  np.testing.assert_array_equal(batch["targets"][0], full[-seq_len:])
  assert full[-1] == vocab.get_vocabulary(spec).eos_id
  assert batch["loss_weights"][0].all()


def _step0_logits_match_transformers(model_dir: pathlib.Path, hf_dir: pathlib.Path):
  """The parameters a student trained at learning rate 0 holds are its checkpoint's: our
  logits on a tokenised text equal `transformers`' on the same ids."""
  import torch
  import transformers
  tokenizer = hf_tokenizers.load(hf_dir)
  ids = tokenizer.encode("Q: What is 4 - 9 + 6? A: The answer is (D).",
                         add_special_tokens=False)
  model = checkpoint_io.load_model(model_dir)
  ours = np.asarray(model(np.asarray([ids], np.int32))[0], np.float32)
  peer = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
  with torch.no_grad():
    theirs = peer(torch.tensor([ids])).logits.float().numpy()
  np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=2e-4)


def test_student_trains_from_an_annotation_directory_with_scripts_train(workdir, tmp_path):
  root, _ = workdir
  model_dir = tmp_path / "student"
  bindings = {
      "ModelSettings.init_hf_checkpoint": repr(str(root / "opt")),
      "student_input_mixture.dataset": "None",
      "student_input_mixture.fmt": "'CMF'", "student_input_mixture.qc_action": "'skip'",
      "student_input_mixture.original_rate": "1.0",
      "student_input_mixture.annotated_rate": "3.0",
      "ModelSettings.compute_dtype": "'float32'", "MeshConfig.fsdp": "1",
      "TrainConfig.num_steps": "2", "OptimizerConfig.learning_rate": "0.0",
      "TrainConfig.eval_batches": "0", "DataConfig.seq_len": "64",
      "DataConfig.batch_size": "2", "LoggingConfig.tensorboard": "False",
      "LoggingConfig.peak_tflops_per_device": "0.1"}
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
  env.pop("XLA_FLAGS", None)
  result = subprocess.run(
      [sys.executable, str(REPO / "scripts" / "train.py"), "--gin_file=gin/student.gin",
       f"--model_dir={model_dir}", f"--input={root / 'annotations'}"]
      + [f"--gin.{k}={v}" for k, v in bindings.items()],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "done: step 2" in result.stdout + result.stderr
  saved = json.loads((model_dir / train_lib.TRAIN_CONFIG_FILE).read_text())
  assert saved["data"]["train_task"] == "student_input"
  # The student carries the OPT tokenizer it trained with; AutoTokenizer loads it.
  import transformers
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
  assert tokenizer.get_vocab() == hf_tokenizers.load(root / "opt").get_vocab()
  _step0_logits_match_transformers(model_dir, root / "opt")


def test_student_input_mixture_mixes_original_and_annotated_rows(workdir):
  import seqio
  from teacherlm_jax.data import mixtures, tasks
  root, _ = workdir
  skipped_before = tasks.SKIPS.total
  name = mixtures.student_input_mixture(
      str(root / "annotations"), dataset=None, fmt="CM",
      vocabulary=vocab.get_vocabulary(f"hf:{root / 'bloom'}"), original_rate=1.0,
      annotated_rate=2.0, qc_action="skip")
  mixture = seqio.get_mixture_or_task(name)
  assert {t.name for t in mixture.tasks} == {"student_input_original", "student_input_CM"}
  assert mixture.get_rate(seqio.get_mixture_or_task("student_input_CM")) == 2.0
  annotated = list(tasks.task_records("student_input_CM"))
  assert len(annotated) == 23  # Row 0's chain of thought carries a quality flag.
  assert tasks.SKIPS.total == skipped_before + 1
  bloom = vocab.get_vocabulary(f"hf:{root / 'bloom'}")
  assert all(prompts.TRIGGERS["common_mistakes"] in bloom.decode(r["targets"]) for r in annotated)
  with pytest.raises(ValueError, match="qc_action"):
    mixtures.student_input_mixture("x", dataset=None, vocabulary=None, qc_action="drop")


@pytest.mark.parametrize("variant", ["bloom_1b1", "bloom_3b", "bloom_7b1", "opt_1.3b",
                                     "opt_2.7b"])
def test_paper_student_variants_carry_the_paper_hyperparameters(variant):
  import gin
  from teacherlm_jax import cli
  from teacherlm_jax.data import mixtures  # pylint: disable=unused-import  (student.gin's)
  gin.clear_config()
  try:
    cli.parse([f"gin/students/{variant}.gin"], ["ModelSettings.init_hf_checkpoint = '/ckpt'"])
    config = train_lib.TrainConfig()
  finally:
    gin.clear_config()
  assert config.model.preset == variant.replace("_", "-")
  assert (config.optimizer.learning_rate, config.data.batch_size,
          config.optimizer.schedule) == (6e-6, 64, "constant")
  assert (config.data.loss_on, config.data.seq_len) == ("all", 2048)


def test_the_old_paper_config_32k_sentencepiece_with_bloom_7b1_fails(tmp_path):
  """The paper-scale config used to train a 32k SentencePiece vocabulary and feed its ids to
  BLOOM-7.1B (250,880 tokens): the override is refused before any weight is read."""
  from teacherlm_jax.models import hf, presets
  bloom = tmp_path / "bloom-7b1"
  bloom.mkdir()
  (bloom / "config.json").write_text(json.dumps(hf.config_to_hf(presets.get("bloom-7b1"))))
  config = train_lib.TrainConfig(model=train_config.ModelSettings(
      init_hf_checkpoint=str(bloom), overrides={"vocab_size": 32000}))
  with pytest.raises(checkpoint_vocab.VocabularyMismatch,
                     match=rf"vocab_size=32000.*{bloom}.*vocab_size=250880"):
    train_lib.model_config_for(config, str(tmp_path / "teacher"))


def test_annotation_and_evaluation_refuse_a_tokenizer_that_does_not_fit(workdir, tmp_path):
  from teacherlm_jax.annotation import annotate
  from teacherlm_jax.evaluation import evaluate
  from teacherlm_jax.models import hf
  root, _ = workdir
  # The OPT tokenizer's pad id (1) is not BLOOM's (3): same size, other special ids.
  with pytest.raises(checkpoint_vocab.VocabularyMismatch, match=r"opt.*pad id 1.*bloom"):
    annotate.annotate(root / "student.jsonl", tmp_path / "ann", teachers=str(root / "bloom"),
                      tokenizer=f"hf:{root / 'opt'}", progress=False)
  _, model = hf.import_checkpoint(root / "bloom")
  with pytest.raises(checkpoint_vocab.VocabularyMismatch, match=r"opt.*bloom"):
    evaluate.evaluate(model, vocab.get_vocabulary(f"hf:{root / 'opt'}"), ["creak"],
                      model_source=str(root / "bloom"))


def test_paper_pipeline_config_holds_the_paper_recipe():
  import gin
  from teacherlm_jax import cli
  from teacherlm_jax.pipeline import pipeline
  gin.clear_config()
  try:
    cli.parse(["gin/pipeline_teacherlm_7b1_tpu.gin"], [
        "PipelineConfig.teacher_checkpoint = '/ckpt/bloom-7b1'",
        "PipelineConfig.students = {'opt-1.3b': '/ckpt/opt-1.3b'}"])
    config = pipeline.PipelineConfig()
    stages = {}
    for scope in ("teacher_multitask", "teacher", "teacher_specialist", "student"):
      with gin.config_scope(scope):
        stages[scope] = train_lib.TrainConfig()
  finally:
    gin.clear_config()
  assert config.teacher_stages == ("multitask", "personalise", "specialise")
  assert config.eval_tasks == ("teacherlm_eval",)
  for scope in ("teacher_multitask", "teacher", "teacher_specialist"):
    teacher = stages[scope]
    assert teacher.optimizer.learning_rate == 2e-5
    assert teacher.data.batch_size * teacher.optimizer.grad_accum_steps == 768
    assert not teacher.model.overrides  # The vocabulary is the checkpoint's.
  student = stages["student"]
  assert (student.optimizer.learning_rate, student.data.batch_size,
          student.optimizer.schedule) == (6e-6, 64, "constant")
  assert (student.data.loss_on, student.data.seq_len) == ("all", 2048)
