r"""Resume at a deep step of a seqio mixture: replaying the input vs the saved position.

  python scripts/benchmark_resume.py --step=100000 \
      --output=benchmarks/results/resume_seqio_mixture.json

Reads the FLAN CoT data of $TEACHERLM_DATA_DIR (default ../shared/data). Prints and writes
{replay_first_batch_s, saved_position_first_batch_s, speedup, position_bytes, ...}.
"""
import json
import os
import pathlib
import platform

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position

_STEP = flags.DEFINE_integer("step", 100_000, "The step (batch number) to resume at.")
_OUTPUT = flags.DEFINE_string("output", "benchmarks/results/resume_seqio_mixture.json",
                              "JSON file to write.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "FLAN CoT data (default $TEACHERLM_DATA_DIR "
                                "or ../shared/data).")


def main(argv):
  del argv
  from teacherlm_jax.benchmarks import resume  # pylint: disable=g-import-not-at-top
  data_dir = _DATA_DIR.value or os.environ.get(
      "TEACHERLM_DATA_DIR", str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"))
  result = resume.run(data_dir, _STEP.value)
  result["machine"] = {"cpu_count": os.cpu_count(), "platform": platform.platform()}
  print(json.dumps(result, indent=1))
  output = pathlib.Path(_OUTPUT.value)
  output.parent.mkdir(parents=True, exist_ok=True)
  output.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
  app.run(main)
