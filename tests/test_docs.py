"""The docs are data-backed and the README is for users: size, generated tables, no work log."""
import re

from conftest import REPO_ROOT
from teacherlm_jax.benchmarks import results_table

# A dated log of the work reads like this; the README and the code say what is, not what happened.
WORK_LOG = re.compile(r"\b(session|A/B|same-process|20\d\d-\d\d-\d\d)\b", re.IGNORECASE)


def test_benchmarks_page_regenerates_byte_for_byte_from_the_result_files():
  page = (REPO_ROOT / "docs" / "benchmarks.md").read_text()
  assert page == results_table.render(REPO_ROOT / "benchmarks" / "results"), (
      "docs/benchmarks.md is stale: run python scripts/benchmark_table.py")


def test_results_table_renders_every_file_with_its_rows(tmp_path):
  (tmp_path / "2026-01-02_b.json").write_text(
      '{"title": "B", "date": "2026-01-02", "rows": [{"metric": "x", "ours": 2.0}]}')
  (tmp_path / "2026-01-01_a.json").write_text('[{"step": "train", "fits": true}]')
  page = results_table.render(tmp_path)
  assert page.index("## 2026-01-01_a") < page.index("## B")
  assert "| train | yes |" in page and "| x | 2 |" in page


def test_readme_is_short_and_carries_no_work_log():
  readme = (REPO_ROOT / "README.md").read_text()
  assert len(readme.encode()) <= 15 * 1024
  assert not WORK_LOG.findall(readme), WORK_LOG.findall(readme)


def test_readme_links_resolve():
  readme = (REPO_ROOT / "README.md").read_text()
  for target in re.findall(r"\]\(([^)#:]+)\)", readme):
    assert (REPO_ROOT / target).exists(), f"README links to missing {target}"


def test_code_carries_no_work_log_or_ab_figures():
  """Comments say why in a line; one machine's A/B figures live in benchmarks/results/."""
  pattern = re.compile(r"\b(A/B|same-process|\w+th session)\b|\b20\d\d-\d\d-\d\d\b", re.IGNORECASE)
  found = []
  for folder in ("teacherlm_jax", "scripts", "gin", "tpu"):
    for path in sorted((REPO_ROOT / folder).rglob("*")):
      if path.suffix in (".py", ".gin"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
          if pattern.search(line):
            found.append(f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}")
  assert not found, "\n".join(found)
