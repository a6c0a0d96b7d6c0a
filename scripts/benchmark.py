r"""Benchmarks ours against PyTorch `transformers` on the same machine, in one run.

  python scripts/benchmark.py                       # all: training, decoding, evaluation,
                                                    # head_loss (the LM head + loss at
                                                    # BLOOM's 250,880-token vocabulary)
  python scripts/benchmark.py --only=decoding --output=/tmp/bench.json
  python scripts/benchmark.py --precisions=float32  # skip the bf16-vs-bf16 rows
  python scripts/benchmark.py --only=training --training_families=bloom,opt,llama
  python scripts/benchmark.py --only=training --training_shapes=8x256  # default: 8x256,1x2048
  python scripts/benchmark.py --device              # JAX GPU vs PyTorch CUDA when present
  python scripts/benchmark.py --cpu_devices=1       # no CPU mesh rows (default: one device
                                                    # per core, up to 8)

Prints one table (benchmark, metric, ours, pytorch, ratio, notes) and writes it, with the date,
commit, machine and versions, to benchmarks/results/ (`python scripts/benchmark_table.py` then
regenerates docs/benchmarks.md).
"""
import datetime
import functools
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

from absl import app, flags, logging

from teacherlm_jax import cli  # --cpu_devices
from teacherlm_jax.benchmarks import models

_ONLY = flags.DEFINE_list("only", ["training", "decoding", "evaluation", "head_loss"],
                          "Which benchmarks to run.")
_OUTPUT = flags.DEFINE_string(
    "output", None, "JSON file to write (default: benchmarks/results/DATE_PLATFORM_BENCHMARKS.json).")
_DEVICE = flags.DEFINE_bool("device", False, "Run on the accelerator (JAX GPU vs torch CUDA) "
                            "when one is present; default CPU for both.")
_QUICK = flags.DEFINE_bool("quick", False, "Smaller sizes and fewer repeats (smoke runs).")
_PRECISIONS = flags.DEFINE_list(
    "precisions", ["float32", "bfloat16"],
    "Training and decoding run once per precision: float32 against float32, and bfloat16 "
    "(ours bf16 compute / bf16 decoding) against torch bf16 (autocast / bf16 weights).")
_TRAINING_FAMILIES = flags.DEFINE_list(
    "training_families", ["bloom"],
    "Model families the training benchmark runs (bloom, opt, llama), each at d=512, 8 layers.")
flags.register_validator(
    "training_families", lambda families: set(families) <= set(models.FAMILIES),
    message=f"--training_families: each must be one of {', '.join(models.FAMILIES)}")
_TRAINING_SHAPES = flags.DEFINE_list(
    "training_shapes", ["8x256", "1x2048"],
    "Batch shapes (ROWSxTOKENS) the training benchmark runs, each with every family and "
    "precision: 8x256, and 1x2048, the sequence length of gin/student.gin and "
    "gin/teacher_sft.gin at the same 2,048 tokens a step.")
flags.register_validator(
    "training_shapes", lambda shapes: all(_is_shape(shape) for shape in shapes),
    message="--training_shapes: each must be ROWSxTOKENS with both above 0, e.g. 8x256")
_TRAINING_STEPS_PER_CALL = flags.DEFINE_integer(
    "training_steps_per_call", 4,
    "Train steps per jitted call of ours (TrainConfig.steps_per_call); torch runs as many per "
    "timed run. Above 1, a second row times ours at one step per call.", lower_bound=1)


def _is_shape(text: str) -> bool:
  from teacherlm_jax.benchmarks import training
  try:
    training.parse_shape(text)
  except ValueError:
    return False
  return True


def _format(value):
  if isinstance(value, float):
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
  return str(value)


def print_table(rows):
  columns = ["benchmark", "metric", "ours", "pytorch", "ratio", "notes"]
  table = [[_format(row.get(c, "")) for c in columns] for row in rows]
  widths = [max(len(c), *(len(r[i]) for r in table)) if table else len(c)
            for i, c in enumerate(columns)]
  line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
  print(line(columns))
  print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
  for r in table:
    print(line(r))


def _commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=pathlib.Path(__file__).parent, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def _cpu_name() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def main(argv):
  del argv
  if not _DEVICE.value:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    cli.configure_cpu_devices()  # Decoding adds rows for ours on a tensor mesh over them.
  runners = {}
  if "training" in _ONLY.value:
    from teacherlm_jax.benchmarks import training
    for shape in _TRAINING_SHAPES.value:
      batch_size, seq_len = training.parse_shape(shape)
      for family in _TRAINING_FAMILIES.value:
        for precision in _PRECISIONS.value:
          runners[f"training {family} {precision} {shape}"] = functools.partial(
              training.benchmark_training, device=_DEVICE.value, quick=_QUICK.value,
              batch_size=batch_size, seq_len=seq_len, precision=precision, family=family,
              steps_per_call=_TRAINING_STEPS_PER_CALL.value)
  if "decoding" in _ONLY.value:
    from teacherlm_jax.benchmarks import decoding
    for precision in _PRECISIONS.value:
      runners[f"decoding {precision}"] = functools.partial(
          decoding.benchmark_decoding, device=_DEVICE.value, quick=_QUICK.value,
          precision=precision)
  if "evaluation" in _ONLY.value:
    from teacherlm_jax.benchmarks import evaluation
    runners["evaluation"] = lambda: evaluation.benchmark_evaluation(device=_DEVICE.value,
                                                                    quick=_QUICK.value)
  if "head_loss" in _ONLY.value:
    from teacherlm_jax.benchmarks import head_loss
    runners["head_loss"] = lambda: head_loss.benchmark_head_loss(device=_DEVICE.value,
                                                                 quick=_QUICK.value)
  rows = []
  for name, run in runners.items():
    start = time.time()
    logging.info("running %s benchmark", name)
    result = run()
    rows.extend(result if isinstance(result, list) else [result])
    logging.info("%s benchmark took %.0f s", name, time.time() - start)
  print_table(rows)
  import jax
  import torch
  from teacherlm_jax.runtime import backend
  today = datetime.date.today().isoformat()
  platform_name = jax.devices()[0].platform
  record = {"title": f"{', '.join(_ONLY.value)} on {platform_name}: ours vs PyTorch transformers",
            "date": today, "commit": _commit(),
            "command": " ".join(["python", "scripts/benchmark.py", *sys.argv[1:]]),
            "machine": {"platform": platform.platform(), "cpu": _cpu_name(),
                        "cpus": os.cpu_count(), "jax_devices": len(jax.devices()),
                        "device_kind": jax.devices()[0].device_kind,
                        # Train steps on CPU use oneDNN dots only where True.
                        "onednn_dots": backend.onednn_dots_supported(),
                        # glibc malloc settings move both sides' CPU steps alike.
                        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")},
            "versions": {"jax": jax.__version__, "torch": torch.__version__},
            "rows": rows}
  output = pathlib.Path(_OUTPUT.value or (
      pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results" /
      f"{today}_{platform_name}_{'-'.join(_ONLY.value)}.json"))
  output.parent.mkdir(parents=True, exist_ok=True)
  output.write_text(json.dumps(record, indent=2, default=str) + "\n")
  print(f"wrote {output}")


if __name__ == "__main__":
  flags.FLAGS.set_default("cpu_devices", min(8, os.cpu_count() or 1))
  app.run(main)
