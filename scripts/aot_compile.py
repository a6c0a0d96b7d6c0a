r"""Compiles every step of a job for a TPU slice ahead of time, on this host, without a TPU.

  python scripts/aot_compile.py --gin_file=gin/pipeline_teacherlm_7b1_tpu.gin \
      --topology=v5e-16 --output=aot.json
  python scripts/aot_compile.py --gin_file=gin/annotate_bloom176b_tpu.gin --topology=v5p-8
  python scripts/aot_compile.py ... --steps=teacher_train --gin.teacher/ModelSettings.remat="'full'"

Each step (teacher/student train steps, annotation prefill and decode, evaluation scoring) is
compiled by the real TPU compiler with the config's own mesh, shardings, dtypes and remat, for
the devices libtpu describes for --topology. Writes a JSON list, one object per step (HBM per
device from memory_analysis, the model's parameter count, analytic FLOPs per device beside
cost_analysis's count, compile seconds), prints a table with a roofline estimate of step time
and MFU, and exits non-zero naming each step that does not fit its chips' HBM and what to
change.
"""
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # Compiles for TPU; runs nothing anywhere.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

from teacherlm_jax import cli

_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU slice to compile for: v4-8, v4-32, v5p-8, v5e-16, v5e-256, v6e-8, "
    "... (runtime/topologies.py) or a raw topology such as v5e:2x2", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "JSON file for the per-step records")
_STEPS = flags.DEFINE_list("steps", None, "compile only these steps (default: every step of "
                           "the config)")
_RESULTS = flags.DEFINE_string(
    "results", None, "also write the records as a benchmarks/results file (title, date, commit, "
    "command; GiB and TFLOP rows) that scripts/benchmark_table.py renders into docs")
_TITLE = flags.DEFINE_string("title", None, "title of the --results section")

GiB = 1024**3


def _tflop(value) -> str:
  return "-" if value is None else f"{value / 1e12:.3f}"


def _count(params) -> str:
  if params is None:
    return "-"
  return f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"


def table(records) -> str:
  lines = ["step              params  HBM/chip (GiB)  fits   TFLOP/chip  (cost_analysis)  "
           "est. step s  est. MFU  compile s"]
  for r in records:
    step_s, mfu = r["estimated_step_s"], r["estimated_mfu"]
    lines.append(
        f"{r['step']:<17} {_count(r.get('params')):>6}"
        f" {r['hbm_bytes_per_device'] / GiB:6.2f} / {r['hbm_capacity_bytes'] / GiB:<5.3g}"
        f" {str(r['fits']):<6} {_tflop(r['flops_per_device']):>10}"
        f"  {'(' + _tflop(r.get('cost_analysis_flops_per_device')) + ')':>15}"
        f"  {'-' if step_s is None else f'{step_s:.4g}':>11}"
        f"  {'-' if mfu is None else f'{mfu:.1%}':>8}  {r['compile_s']:8.1f}")
  lines += [
      "params: the step's model, counted from its shapes (" + "; ".join(
          f"{r['step']}: {r['model']}" for r in records if r.get("model")) + ").",
      "TFLOP/chip: analytic FLOPs of the step (6 x matmul parameters per trained token plus "
      "attention, plus what remat recomputes; forward steps 2 x); (cost_analysis): the "
      "compiled program's own count, which takes a scanned loop's body once (one layer). "
      "Decode FLOPs are one token step.",
      "est. = roofline estimate from the analytic FLOPs (FLOPs at bf16 peak or HBM traffic at "
      "full bandwidth, whichever is slower; no communication): a bound, not a measurement; "
      "MFU counts useful FLOPs only (100%: compute-bound with nothing recomputed, the "
      "roofline's ceiling)."]
  return "\n".join(lines)


def host() -> dict:
  """The compiling host, which the compile seconds depend on (shared hosts: its load)."""
  return {"host": f"{platform.system()} {platform.machine()}, no TPU", "cpus": os.cpu_count(),
          "load average at start": round(os.getloadavg()[0], 1)}


def results_file(records, title: str, machine: dict) -> dict:
  """The records as a benchmarks/results file: metadata plus one readable row per step."""
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
  rows = []
  tflop = lambda value: None if value is None else round(value / 1e12, 3)
  for r in records:
    mfu = r["estimated_mfu"]
    rows.append({
        "step": r["step"], "slice": r["topology"],
        "mesh (data x fsdp x tensor)": "x".join(str(v) for v in r["mesh"].values()),
        "params": r.get("params"),
        "HBM GiB/chip": round(r["hbm_bytes_per_device"] / GiB, 2),
        "of GiB": round(r["hbm_capacity_bytes"] / GiB, 2), "fits": r["fits"],
        "TFLOP/chip/step": tflop(r["flops_per_device"]),
        "cost_analysis TFLOP/chip": tflop(r.get("cost_analysis_flops_per_device")),
        "est. step s": (None if r["estimated_step_s"] is None
                        else float(f"{r['estimated_step_s']:.4g}")),
        "est. MFU %": None if mfu is None else round(100 * mfu, 1),
        "compile s": r["compile_s"]})
  return {"title": title, "date": datetime.date.today().isoformat(),
          "commit": commit.stdout.strip() or None, "estimate": True, "machine": machine,
          "command": "python scripts/aot_compile.py " + " ".join(
              shlex.quote(a) for a in sys.argv[1:] if not a.startswith(("--results", "--title"))),
          "provenance": "TPU estimates from ahead-of-time compiles by libtpu on a CPU host, no "
                        "TPU run; HBM from memory_analysis; TFLOP/chip/step analytic (6 x "
                        "matmul parameters per trained token plus attention, plus remat's "
                        "recomputation; forward steps 2 x; a decode step is one token), "
                        "cost_analysis TFLOP/chip the compiler's count (a scanned loop's body "
                        "once); step time and MFU a roofline estimate from the analytic FLOPs; "
                        "compile s the wall time of each compile on the machine named above",
          "rows": rows}


def main(argv, gin_bindings=()):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from teacherlm_jax.pipeline import aot_steps  # pylint: disable=g-import-not-at-top
  cli.parse_flags_and_gin(gin_bindings)  # After the import, which registers AotConfig.
  machine = host()
  records = aot_steps.compile_steps(_TOPOLOGY.value, _STEPS.value,
                                    progress=lambda line: print(line, flush=True))
  print(table(records), flush=True)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump(records, f, indent=1)
    print(f"wrote {_OUTPUT.value}", flush=True)
  if _RESULTS.value:
    title = _TITLE.value or f"AOT compile: {', '.join(cli.GIN_FILES.value)} on {_TOPOLOGY.value}"
    with open(_RESULTS.value, "w") as f:
      json.dump(results_file(records, title, machine), f, indent=1)
      f.write("\n")
    print(f"wrote {_RESULTS.value}", flush=True)
  misfits = [r["message"] for r in records if not r["fits"]]
  if misfits:
    sys.exit("\n".join(misfits))


if __name__ == "__main__":
  cli.run(main)
