r"""Ahead-of-time compiles for a TPU topology, once per attention implementation: HBM per chip
and the bytes XLA's cost analysis counts, written as JSON and as the tables in
docs/attention.md and docs/benchmarks.md.

  JAX_PLATFORMS=cpu python scripts/attention_aot.py                  # v5e, BLOOM-7b1, 2,048
  JAX_PLATFORMS=cpu python scripts/attention_aot.py --topology=v4:2x2x1 \
      --output=benchmarks/results/attention_aot_v4.json
  python scripts/attention_aot.py --docs_only   # regenerate the docs table from the JSON files

Nothing runs on a TPU: libtpu compiles for the named topology on this host.
"""
import json
import os
import pathlib
import re

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app
from absl import flags

_TOPOLOGY = flags.DEFINE_string("topology", "v5e:2x2", "TPU topology to compile for.")
_MODELS = flags.DEFINE_list("models", ["bloom-7b1"], "Model presets.")
_IMPLS = flags.DEFINE_list("impls", ["xla", "pallas"], "Attention implementations.")
_LAYERS = flags.DEFINE_integer("layers", 1, "Blocks in the compiled train step.")
_BATCH = flags.DEFINE_integer("batch", 1, "Rows per chip.")
_LENGTH = flags.DEFINE_integer("length", 2048, "Tokens per row.")
_OUTPUT = flags.DEFINE_string("output", "benchmarks/results/attention_aot_v5e.json",
                              "JSON results file.")
_DOCS = flags.DEFINE_string("docs", "docs/attention.md", "Page whose table is regenerated.")
_DOCS_ONLY = flags.DEFINE_bool("docs_only", False, "Only regenerate the docs table.")

ROOT = pathlib.Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- attention_aot table: begin -->", "<!-- attention_aot table: end -->"


def write_docs_table(docs: pathlib.Path) -> None:
  """Replaces the table between BEGIN and END in `docs` with every results file's rows, and
  regenerates docs/benchmarks.md (every results file) to match."""
  from teacherlm_jax.benchmarks import attention_aot
  from teacherlm_jax.benchmarks import results_table
  (ROOT / "docs" / "benchmarks.md").write_text(results_table.render(ROOT / "benchmarks" /
                                                                    "results"))
  results = []
  for path in sorted((ROOT / "benchmarks" / "results").glob("attention_aot_*.json")):
    results += json.loads(path.read_text())["rows"]
  text = docs.read_text()
  table = f"{BEGIN}\n{attention_aot.docs_table(results)}\n{END}"
  docs.write_text(re.sub(re.escape(BEGIN) + ".*" + re.escape(END), lambda _: table, text,
                         flags=re.S))


def main(argv):
  del argv
  if not _DOCS_ONLY.value:
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from teacherlm_jax.benchmarks import attention_aot
    results = []
    for model in _MODELS.value:
      for impl in _IMPLS.value:
        for compile_fn, kwargs in ((attention_aot.compile_attention_step, {}),
                                   (attention_aot.compile_train_step,
                                    {"layers": _LAYERS.value})):
          result = compile_fn(model, impl, _TOPOLOGY.value, batch=_BATCH.value,
                              length=_LENGTH.value, **kwargs)
          print(json.dumps(result), flush=True)
          results.append(result)
    output = ROOT / _OUTPUT.value
    output.parent.mkdir(parents=True, exist_ok=True)
    command = "JAX_PLATFORMS=cpu python scripts/attention_aot.py " + " ".join(
        f"--{flag.name}={flag.value}" if not isinstance(flag.value, list)
        else f"--{flag.name}={','.join(flag.value)}"
        for flag in (_TOPOLOGY, _MODELS, _IMPLS, _LAYERS, _BATCH, _LENGTH))
    output.write_text(json.dumps({
        "title": f"Attention implementations: ahead-of-time compiles for {_TOPOLOGY.value}",
        "estimate": True, "command": command,
        "provenance": ("XLA's memory and cost analyses of compiles for one chip, Pallas "
                       "kernels counted by their cost estimates; see docs/attention.md"),
        "rows": results}, indent=2) + "\n")
  write_docs_table(ROOT / _DOCS.value)


if __name__ == "__main__":
  app.run(main)
