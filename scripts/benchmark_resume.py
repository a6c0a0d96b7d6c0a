r"""Resume at a deep step of a seqio mixture: replaying the input vs the saved position.

  python scripts/benchmark_resume.py --step=100000 --output=benchmarks/results/DATE_resume.json

Reads the FLAN CoT data of $TEACHERLM_DATA_DIR (default ../shared/data). Writes a result file
in the format of benchmarks/results/ (rendered by scripts/benchmark_table.py): one row with the
time to the first batch from a fresh start, by replay and from the saved position.
"""
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position

_STEP = flags.DEFINE_integer("step", 100_000, "The step (batch number) to resume at.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON file to write (default "
                              "benchmarks/results/<date>_cpu_resume_seqio_mixture.json).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "FLAN CoT data (default $TEACHERLM_DATA_DIR "
                                "or ../shared/data).")


def main(argv):
  del argv
  from teacherlm_jax.benchmarks import resume  # pylint: disable=g-import-not-at-top
  data_dir = _DATA_DIR.value or os.environ.get(
      "TEACHERLM_DATA_DIR", str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"))
  import jax  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  row = resume.run(data_dir, _STEP.value)
  root = pathlib.Path(__file__).resolve().parents[1]
  commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=False).stdout.strip()
  today = datetime.date.today().isoformat()
  result = {
      "title": "Resuming a seqio mixture deep into training: replay vs the saved input position",
      "date": today, "commit": commit or None,
      "command": " ".join(["python", "scripts/benchmark_resume.py", *sys.argv[1:]]),
      "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                  "accelerator": None},
      "versions": {"tensorflow": tf.__version__, "jax": jax.__version__},
      "rows": [row],
  }
  print(json.dumps(result, indent=1))
  output = pathlib.Path(_OUTPUT.value or
                        root / "benchmarks" / "results" / f"{today}_cpu_resume_seqio_mixture.json")
  output.parent.mkdir(parents=True, exist_ok=True)
  output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
  app.run(main)
