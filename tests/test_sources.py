"""Raw readers: real files read completely; bad rows name file, line and field (or are counted)."""
import pytest

from teacherlm_jax.data import sources


def test_jsonl_and_arrow_agree_on_real_eval_sets(shared_data):
  for folder, name in (("creak", "creak.jsonl"), ("ecqa", "ecqa.jsonl"),
                       ("strategy_qa", "strategy_qa.jsonl")):
    base = shared_data / "teacherlm_eval" / folder
    from_jsonl = list(sources.read_jsonl(base / name, required=("question", "answer")))
    from_arrow = list(sources.read_arrow_dir(base))
    assert len(from_jsonl) == len(from_arrow) == {"creak": 1371, "ecqa": 2194,
                                                    "strategy_qa": 228}[folder]
    for a, b in zip(from_jsonl, from_arrow):
      assert a["question"] == b["question"] and a["answer"] == b["answer"]


def test_mmlu_csv(shared_data):
  rows = list(sources.read_mmlu_csv(shared_data / "mmlu" / "test" / "abstract_algebra_test.csv"))
  assert len(rows) == 100
  assert rows[0]["subject"] == "abstract_algebra" and rows[0]["answer"] == 1
  assert rows[0]["options"] == ["0", "4", "2", "6"] and rows[0]["_line"] == 2
  # The original headerless layout with letter answers reads the same way.
  early = list(sources.read_mmlu_csv(
      shared_data / "mmlu_hendrycks_test_2020_early" / "test" / "abstract_algebra_test.csv"))
  assert len(early) == 100 and all(0 <= r["answer"] < 4 for r in early)
  total = sum(len(list(sources.read_mmlu_csv(p)))
              for p in sorted((shared_data / "mmlu" / "test").glob("*_test.csv")))
  assert total == 14042


def test_flan_tsv_unescapes_newlines(shared_data):
  rows = list(sources.read_flan_tsv(shared_data / "flan_cot_data" / "ecqa_train.tsv"))
  assert len(rows) == 7112
  assert rows[0]["question"].split("\n")[:2] == [
      "What might a person see at the scene of a brutal killing?", "Options:"]
  assert rows[0]["answer"] == "bloody mess" and "\\n" not in rows[0]["question"]


def test_bad_mmlu_rows(tmp_path):
  path = tmp_path / "anatomy_test.csv"
  path.write_text("question,choice0,choice1,choice2,choice3,answer\n"
                  "ok?,a,b,c,d,0\n"
                  "missing option?,a,,c,d,1\n"
                  "bad answer?,a,b,c,d,4\n"
                  "short?,a,b\n")
  with pytest.raises(ValueError, match=r"anatomy_test.csv:3: field 'choice1' is empty"):
    list(sources.read_mmlu_csv(path))
  skips = sources.SkipLog()
  rows = list(sources.read_mmlu_csv(path, skips=skips))
  assert [r["question"] for r in rows] == ["ok?"]
  assert skips.total == 3 and skips.by_file() == {str(path): 3}
  summary = skips.summary()
  assert ":4: field 'answer' is '4', outside the 4 options" in summary
  assert ":5: field 'choice2' is missing" in summary


def test_bad_jsonl_rows(tmp_path):
  path = tmp_path / "shard.jsonl"
  path.write_text('{"id": "a", "question": "q"}\n{not json}\n[1, 2]\n{"id": "b"}\n')
  with pytest.raises(ValueError, match=r"shard.jsonl:2: is not JSON"):
    list(sources.read_jsonl(path, required=("id", "question")))
  skips = sources.SkipLog()
  rows = list(sources.read_jsonl(path, required=("id", "question"), skips=skips))
  assert [r["id"] for r in rows] == ["a"] and rows[0]["_line"] == 1
  assert skips.total == 3
  assert "shard.jsonl:4: field 'question' is missing" in skips.summary()


def test_bad_tsv_row(tmp_path):
  path = tmp_path / "x_train.tsv"
  path.write_text("q1\ta1\tr1\nq2\ta2\n")
  with pytest.raises(ValueError, match=r"x_train.tsv:2: field 'rationale' is missing"):
    list(sources.read_flan_tsv(path))


def test_data_dir_override(tmp_path, monkeypatch):
  monkeypatch.setenv("TEACHERLM_DATA_DIR", str(tmp_path / "env"))
  assert sources.data_dir() == tmp_path / "env"
  sources.set_data_dir(str(tmp_path))
  try:
    assert sources.data_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match="does not exist"):
      sources.data_path("nope")
  finally:
    sources.set_data_dir(None)
