r"""Regenerates docs/benchmarks.md from benchmarks/results/*.json.

  python scripts/benchmark_table.py            # rewrite docs/benchmarks.md
  python scripts/benchmark_table.py --check    # exit 1 if it is out of date
"""
import pathlib
import sys

from absl import app, flags

from teacherlm_jax.benchmarks import results_table

ROOT = pathlib.Path(__file__).resolve().parents[1]
_RESULTS = flags.DEFINE_string("results", str(ROOT / "benchmarks" / "results"),
                               "Folder of result JSON files.")
_OUTPUT = flags.DEFINE_string("output", str(ROOT / "docs" / "benchmarks.md"), "Page to write.")
_CHECK = flags.DEFINE_bool("check", False, "Only compare; exit 1 when the page is stale.")


def main(argv):
  del argv
  page = results_table.render(_RESULTS.value)
  output = pathlib.Path(_OUTPUT.value)
  if _CHECK.value:
    if not output.exists() or output.read_text() != page:
      sys.exit(f"{output} is out of date: run python scripts/benchmark_table.py")
    return
  output.parent.mkdir(parents=True, exist_ok=True)
  output.write_text(page)
  print(f"wrote {output}")


if __name__ == "__main__":
  app.run(main)
