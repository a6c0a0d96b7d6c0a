"""The annotation job: prompts, records, bad input, kill -9 + resume, 2 processes, QC."""
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from hf_peers import make_hf_model
from teacherlm_jax.annotation import annotate
from teacherlm_jax.annotation import decoding
from teacherlm_jax.annotation import io as annotation_io
from teacherlm_jax.annotation import quality as annotation_quality
from teacherlm_jax.data import hf_tokenizers, prompts, sources, vocab
from teacherlm_jax.models import checkpoint_io, hf

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_RECORDS = 16
# Settings shared by in-process runs and the scripts/annotate.py subprocesses.
MAX_NEW_TOKENS = 6
SETTINGS = dict(num_slots=4, chunk_size=2, id_field="ex_id")
# Greedy, as the in-process runs the scripts' output is compared with (gin/annotate.gin samples).
GREEDY = ["--gin.SamplingConfig.temperature=0.0", "--gin.SamplingConfig.top_k=0"]


@pytest.fixture(scope="module")
def creak_rows():
  from conftest import data_dir
  path = data_dir() / "teacherlm_eval" / "creak" / "creak.jsonl"
  if not path.exists():
    pytest.skip(f"real data {path} is absent (set TEACHERLM_DATA_DIR)")
  with path.open() as f:
    return [json.loads(next(f)) for _ in range(64)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, creak_rows):
  """A tiny BLOOM teacher with a BPE tokenizer trained on real rows, and an input file."""
  root = tmp_path_factory.mktemp("annotate")
  teacher = root / "teacher"
  texts = [annotate.teacher_prompt(r, k, question_field="question", answer_field="answer",
                                   options_field=None)
           for r in creak_rows for k in prompts.ANNOTATION_KINDS]
  vocab.build_bpe_tokenizer(texts, vocab_size=300, directory=teacher)
  size = len(hf_tokenizers.load(teacher))
  make_hf_model("bloom", teacher, vocab_size=size, pad_token_id=3, eos_token_id=2)
  records = root / "records.jsonl"
  records.write_text("".join(json.dumps(r) + "\n" for r in creak_rows[:NUM_RECORDS]))
  return root, teacher, records


def _run(workdir, output, temperature=0.0, **overrides):
  _, teacher, records = workdir
  sampling = decoding.SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, temperature=temperature)
  return annotate.annotate(records, output,
                           **{"teachers": str(teacher), **SETTINGS, "sampling": sampling,
                              "progress": False, **overrides})


def _merged(output):
  annotation_io.merge(output, output / "merged.jsonl")
  return annotation_io.read_jsonl(output / "merged.jsonl")


@pytest.fixture(scope="module")
def reference(workdir):
  """The uninterrupted single-process greedy annotation of the input."""
  output = workdir[0] / "reference"
  summary = _run(workdir, output, process_index=0, process_count=1)
  return summary, _merged(output)


def _script(workdir, output, *extra):
  _, teacher, records = workdir
  bindings = [f"--gin.annotate.teachers='{teacher}'",
              f"--gin.SamplingConfig.max_new_tokens={MAX_NEW_TOKENS}", *GREEDY] + [
      f"--gin.annotate.{k}={v!r}" for k, v in SETTINGS.items()]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen(
      [sys.executable, str(REPO / "scripts" / "annotate.py"), "--gin_file=gin/annotate.gin",
       f"--input={records}", f"--output={output}", *bindings, *extra],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_teacher_prompts_equal_the_reference_strings(creak_rows, shared_data):
  golden_path = shared_data / "teacherlm_enhance_creak_validation" / "creak_validation.jsonl"
  golden = {r["ex_id"]: r for r in map(json.loads, golden_path.open())}
  fields = dict(question_field="question", answer_field="answer", options_field=None)
  for row in creak_rows:
    expected = golden[row["ex_id"]]
    assert annotate.teacher_prompt(row, "chain_of_thought", **fields) == expected["cot_text"]
    assert annotate.teacher_prompt(row, "common_mistakes", **fields) == expected["error_text"]
    assert annotate.teacher_prompt(row, "fundamentals", **fields) == expected["fundamental_text"]


def test_records_hold_every_field_and_the_static_greedy_text(workdir, reference, creak_rows):
  summary, records = reference
  _, teacher, _ = workdir
  assert [r["ex_id"] for r in records] == [r["ex_id"] for r in creak_rows[:NUM_RECORDS]]
  assert summary["annotated"] == NUM_RECORDS and summary["generated_tokens"] > 0
  assert summary["tokens_per_s"] > 0 and summary["rejected"] == {}
  tokenizer = annotate.load_tokenizer(f"hf:{teacher}")
  _, model = hf.import_checkpoint(teacher)
  decoder = decoding.Decoder(model, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
  kind = "chain_of_thought"
  prompt_ids = [tokenizer.encode(annotate.teacher_prompt(
      r, kind, question_field="question", answer_field="answer", options_field=None))
                for r in records]
  static = decoder.generate(prompt_ids, decoding.SamplingConfig(max_new_tokens=6))
  for record, source, generation, ids in zip(records, creak_rows, static, prompt_ids):
    for field, value in source.items():
      assert record[field] == value
    assert record["id"] == source["ex_id"]
    for k in prompts.ANNOTATION_KINDS:
      assert isinstance(record[k], str)
      assert record["generated_tokens"][k] > 0
      assert record["teacher"][k] == str(teacher.resolve())
      assert np.isfinite(record["mean_logprob"][k]) and record["mean_logprob"][k] <= 0
    text_ids = generation.tokens[:-1] if generation.stopped_at_eos else generation.tokens
    assert record[kind] == tokenizer.decode(text_ids).strip()
    assert record["all"][kind] == tokenizer.decode(ids + list(text_ids))
    assert record["all"][kind].startswith(annotate.teacher_prompt(
        source, kind, question_field="question", answer_field="answer", options_field=None))
    assert record["stopped_at_eos"][kind] == generation.stopped_at_eos
    assert record["generated_tokens"][kind] == generation.num_tokens
    np.testing.assert_allclose(record["mean_logprob"][kind], generation.mean_logprob, atol=1e-5)
    assert ("hit_limit" in record["qc"][kind]) == (not generation.stopped_at_eos)
    assert record["decoding"] == {"max_new_tokens": 6, "temperature": 0.0, "top_k": 0,
                                  "top_p": 1.0, "num_samples": 1}
    assert record["seed"] == 0
  flags = summary["qc_flags"][kind]
  assert flags.get("hit_limit", 0) == sum(not g.stopped_at_eos for g in static)


def _same_annotations(records, expected):
  assert [r["id"] for r in records] == [r["id"] for r in expected]
  for got, want in zip(records, expected):
    for k in prompts.ANNOTATION_KINDS:
      assert got[k] == want[k] and got["all"][k] == want["all"][k]
      assert got["generated_tokens"][k] == want["generated_tokens"][k]


def test_teacher_from_our_orbax_checkpoint_annotates_like_its_hf_source(workdir, reference):
  """A teacher saved by us (orbax params + model_config.json) needs no HF export."""
  root, teacher, _ = workdir
  _, model = hf.import_checkpoint(teacher)
  params_dir = root / "orbax_teacher"
  checkpoint_io.save_params(model, params_dir)
  with pytest.raises(ValueError, match="no tokenizer given"):
    _run(workdir, root / "no_tokenizer", teachers=str(params_dir))
  output = root / "from_orbax"
  summary = _run(workdir, output, teachers=str(params_dir), tokenizer=f"hf:{teacher}",
                 process_index=0, process_count=1)
  assert summary["annotated"] == NUM_RECORDS
  records = _merged(output)
  _same_annotations(records, reference[1])
  assert records[0]["teacher"]["chain_of_thought"] == str(params_dir.resolve())


def test_kill_9_then_resume_yields_each_id_exactly_once(workdir, reference):
  output = workdir[0] / "killed"
  shard = annotation_io.shard_dir(output, 0, 1)
  process = _script(workdir, output)
  deadline = time.time() + 240
  while not (annotation_io.read_manifest(shard) or {}).get("chunks"):  # Committed: listed.
    assert process.poll() is None, process.stdout.read()
    assert time.time() < deadline, "no chunk committed in time"
    time.sleep(0.02)
  os.kill(process.pid, signal.SIGKILL)
  process.wait()
  manifest = json.loads((shard / "manifest.json").read_text())
  committed = sum(1 for _ in annotation_io.iter_shard_records(shard))
  assert not manifest["complete"] and 0 < committed < NUM_RECORDS
  with pytest.raises(FileExistsError, match="--resume"):
    _run(workdir, output, process_index=0, process_count=1)
  summary = _run(workdir, output, resume=True, process_index=0, process_count=1)
  assert summary["skipped_already_committed"] == committed
  assert summary["annotated"] == NUM_RECORDS - committed
  _same_annotations(_merged(output), reference[1])


def test_two_processes_annotate_halves_whose_merge_equals_one_process(workdir, reference):
  # Each process decodes on a tensor mesh over its own 2 CPU devices (--cpu_devices), as each
  # host of a pod drives its local chips.
  output = workdir[0] / "two"
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  processes = [_script(workdir, output, f"--coordinator_address=127.0.0.1:{port}",
                       "--num_processes=2", f"--process_id={i}", "--cpu_devices=2",
                       "--gin.annotate.mesh_shape=(1, 1, 2)") for i in range(2)]
  for p in processes:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
  halves = [list(annotation_io.iter_shard_records(annotation_io.shard_dir(output, i, 2)))
            for i in range(2)]
  assert [len(h) for h in halves] == [NUM_RECORDS // 2] * 2
  assert not {r["id"] for r in halves[0]} & {r["id"] for r in halves[1]}
  merge = subprocess.run([sys.executable, "scripts/annotate.py", "--merge",
                          f"--output={output}"], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert merge.returncode == 0, merge.stderr
  _same_annotations(annotation_io.read_jsonl(output / "merged.jsonl"), reference[1])


def test_bad_input_names_file_and_line_or_is_rejected_and_counted(workdir, creak_rows):
  root, teacher, _ = workdir
  path = root / "bad.jsonl"
  good = creak_rows[20]
  missing = {k: v for k, v in creak_rows[21].items() if k != "answer"}
  too_long = {**creak_rows[22], "question": "very long " * 2000}
  path.write_text("\n".join([json.dumps(good), json.dumps(missing), "{not json",
                             json.dumps(too_long), json.dumps(creak_rows[20])]) + "\n")
  run = lambda output, **kw: annotate.annotate(
      path, root / output, teachers=str(teacher), progress=False,
      sampling=decoding.SamplingConfig(max_new_tokens=MAX_NEW_TOKENS),
      **{**SETTINGS, "kinds": ("fundamentals",), **kw})
  with pytest.raises(sources.BadRow, match=rf"{path}:2: field 'answer' is missing"):
    run("strict")
  summary = run("lenient", reject_bad_input=True)
  assert summary["rejected"] == {"missing_field": 1, "not_json": 1, "too_long": 1,
                                 "duplicate_id": 1}
  assert summary["annotated"] == 1 and summary["records_in_slice"] == 5
  rejects = annotation_io.read_jsonl(annotation_io.shard_dir(root / "lenient", 0, 1) /
                                     "rejects.jsonl")
  assert [(r["line"], r["reason"]) for r in rejects] == [
      (2, "missing_field"), (3, "not_json"), (5, "duplicate_id"), (4, "too_long")]
  assert all(r["message"].startswith(f"{path}:{r['line']}: ") for r in rejects)
  assert "exceeds the model context" in rejects[-1]["message"]


def test_quality_checks():
  config = annotation_quality.QualityConfig()
  check = lambda text, kind="chain_of_thought", eos=True, gold="B": annotation_quality.check(
      text, kind=kind, stopped_at_eos=eos, gold_letter=gold, config=config)
  assert check("Soup is liquid. So the answer is (B).") == []
  assert check("  ") == ["empty"]
  assert check("cut short", eos=False) == ["hit_limit"]
  assert check("a b c d " * 4) == ["looping"]
  assert check("a b c d " * 3) == []
  assert check("Thus the answer is (A).") == ["wrong_answer"]
  assert check("Choosing (A) is the mistake; the answer is (A).", kind="common_mistakes") == []
  strict = annotation_quality.QualityConfig(max_ngram_repeats=1, ngram_size=2)
  assert annotation_quality.is_looping("x y z x y", 2, strict.max_ngram_repeats)
  assert annotation_quality.pick_sample([["looping"], [], []], [-0.1, -2.0, -1.0]) == 2
  assert annotation_quality.pick_sample([["empty"], ["looping"]], [-3.0, -1.0]) == 1
  with pytest.raises(ValueError, match="action"):
    annotation_quality.QualityConfig(action="delete")


def test_drop_action_and_num_samples_keep_the_most_confident(workdir):
  root, teacher, records = workdir
  # Sharded over the 8 simulated devices (data 4 x tensor 2); checked against one device below.
  summary = _run(workdir, root / "sampled", kinds=("chain_of_thought",), temperature=1.5,
                 num_samples=3, seed=4, process_index=0, process_count=1, mesh_shape=(4, 1, 2),
                 quality=annotation_quality.QualityConfig(action="drop"))
  out = _merged(root / "sampled")
  # Every annotation hits the 6-token limit, so every one is flagged and dropped.
  assert summary["qc_dropped"]["chain_of_thought"] == NUM_RECORDS
  assert all(r["chain_of_thought"] is None and "hit_limit" in r["qc"]["chain_of_thought"]
             for r in out)
  tokenizer = annotate.load_tokenizer(f"hf:{teacher}")
  _, model = hf.import_checkpoint(teacher)
  decoder = decoding.Decoder(model, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
  record = out[3]
  ids = tokenizer.encode(annotate.teacher_prompt(
      record, "chain_of_thought", question_field="question", answer_field="answer",
      options_field=None))
  uids = [annotate._uid(annotation_io.InputRecord(3, 4, "", {}), "chain_of_thought", s, 3)
          for s in range(3)]
  samples = decoder.generate([ids] * 3, decoding.SamplingConfig(max_new_tokens=6,
                                                                temperature=1.5),
                             seed=4, uids=uids)
  best = max(samples, key=lambda g: g.mean_logprob)
  np.testing.assert_allclose(record["mean_logprob"]["chain_of_thought"], best.mean_logprob,
                             atol=1e-5)
  assert record["all"]["chain_of_thought"] == tokenizer.decode(ids + list(best.tokens))


def test_annotates_a_seqio_task_like_the_jsonl_of_its_records(workdir, shared_data, monkeypatch):
  from teacherlm_jax.data import tasks  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("TEACHERLM_DATA_DIR", str(shared_data))
  root, teacher, _ = workdir
  # A second teacher checkpoint for one kind (same weights, another directory).
  mistakes_teacher = root / "mistakes_teacher"
  shutil.copytree(teacher, mistakes_teacher)
  teachers = {"fundamentals": str(teacher), "common_mistakes": str(mistakes_teacher)}
  settings = dict(teachers=teachers, kinds=("fundamentals", "common_mistakes"),
                  sampling=decoding.SamplingConfig(max_new_tokens=2), limit=4, progress=False,
                  process_index=0, process_count=1)
  summary = annotate.annotate("seqio:records_creak", root / "records", **settings)
  assert summary["annotated"] == 4
  out = _merged(root / "records")
  assert [r["id"] for r in out] == ["train_0", "train_1", "train_2", "train_3"]
  assert out[0]["all"]["fundamentals"].startswith(
      "Q: Determine the correctness of the following sentence. Only people named Floyd")
  assert out[0]["teacher"] == {"fundamentals": str(teacher.resolve()),
                               "common_mistakes": str(mistakes_teacher.resolve())}
  assert "chain_of_thought" not in out[0]
  # The same records as a JSONL file annotate to the same texts.
  jsonl = root / "creak_train.jsonl"
  first = [r for r, _ in zip(tasks.original_records("creak"), range(4))]
  jsonl.write_text("".join(json.dumps(r) + "\n" for r in first))
  annotate.annotate(jsonl, root / "records_jsonl", **settings)
  keep = ("id", "question", "options", "answer", "fundamentals", "common_mistakes", "all")
  assert ([{k: r[k] for k in keep} for r in _merged(root / "records_jsonl")]
          == [{k: r[k] for k in keep} for r in out])
  for source, message in (("seqio:no_such_task", "unknown task 'no_such_task'"),
                          ("seqio:records_creak:test", "has no split 'test'")):
    with pytest.raises(annotation_io.InputError, match=f"{source}: .*{message}"):
      annotate.annotate(source, root / "bad_source", **settings)


def test_annotation_tokenizer_is_the_seqio_vocabulary(workdir, creak_rows):
  _, teacher, _ = workdir
  tokenizer = annotate.load_tokenizer(f"hf:{teacher}", add_special_tokens=False)
  vocabulary = vocab.get_vocabulary(f"hf:{teacher}")
  assert tokenizer.vocabulary is vocabulary  # One HF tokenizer adapter: data/vocab.py's.
  text = annotate.teacher_prompt(creak_rows[5], "fundamentals", question_field="question",
                                 answer_field="answer", options_field=None)
  ids = tokenizer.encode(text)
  assert vocabulary.encode(text) == ids
  assert vocabulary.decode(ids) == tokenizer.decode(ids) == text
  # Special tokens are left out of an annotation's text, and the eos id is the tokenizer's.
  assert tokenizer.decode(ids + [tokenizer.eos_id]) == text
  assert vocabulary.eos_id == tokenizer.eos_id == 2
