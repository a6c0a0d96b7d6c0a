"""Every job compiles for real TPU topologies on this CPU host (libtpu's compiler, no TPU).

The tiny pipeline's steps compile for v5e and v4 over an fsdp x tensor mesh; each step is
built for its config's own model (the 7.1B pipeline's for 7.1B parameters); its FLOPs grow
with depth although the compiler's count takes the scanned layers once; the paper-scale
configs (slow) fit the HBM of their stated slices; a step that does not fit makes
scripts/aot_compile.py exit non-zero and say by how much and what to change.
"""
import json
import os
import re
import subprocess
import sys

import gin
import jax
import jax.numpy as jnp
import pytest

from teacherlm_jax import cli
from teacherlm_jax.pipeline import aot_steps
from teacherlm_jax.runtime import aot
from teacherlm_jax.runtime import chips
from teacherlm_jax.runtime import partitioning
from teacherlm_jax.runtime import topologies

from conftest import REPO_ROOT

# The einsum attention, quicker to compile; the TPU default's own test is below.
XLA_ATTENTION = ["ModelSettings.attention_impl = 'xla'", "annotate.attention_impl = 'xla'"]
FSDP_X_TENSOR = ["MeshConfig.fsdp = 2", "MeshConfig.tensor = 2",
                 "annotate.mesh_shape = (1, 2, 2)", "evaluate.mesh_shape = (1, 2, 2)",
                 "evaluate.max_length = 256"] + XLA_ATTENTION


@pytest.fixture
def gin_config():
  """Parses gin files and bindings for one test; the global config is cleared after it."""
  def parse(files, bindings=()):
    gin.clear_config()
    cli.parse([str(REPO_ROOT / f) for f in files], bindings)
  yield parse
  gin.clear_config()


def test_slice_names_map_to_topologies_with_one_device_per_chip():
  assert len(topologies.devices("v5e-16")) == 16
  assert len(topologies.devices("v4-8")) == 4  # Megacore: 4 chips, 8 TensorCores.
  assert len(topologies.devices("v5p-8")) == 4
  # A host's chips compile as a topology of their own (a v5e host is a 2x2 of the 4x4).
  assert topologies.host_topology("v5e-16") == "v5e:2x2"
  assert len(topologies.host_devices("v5e-16")) == 4
  assert topologies.host_topology("v5p-8") == "v5p:2x2x1"
  assert topologies.by_name("v6e-8").chip.peak_bf16_flops == chips.by_name("v6e").peak_bf16_flops
  with pytest.raises(ValueError, match="unknown TPU slice.*v5e-16"):
    topologies.by_name("v9x-8")


def test_tpu_and_cuda_extras_pin_the_jax_this_project_runs():
  setup = (REPO_ROOT / "setup.py").read_text()
  [version] = re.findall(r'^JAX_VERSION = "([^"]+)"', setup, re.MULTILINE)
  assert version == jax.__version__, "setup.py's JAX_VERSION is not the installed jax"
  assert '"tpu": [f"jax[tpu]=={JAX_VERSION}"]' in setup
  assert '"cuda": [f"jax[cuda12]=={JAX_VERSION}"]' in setup
  assert '".[hf,test,tpu]"' in (REPO_ROOT / ".ci" / "run").read_text()


def test_record_hbm_is_arguments_outputs_temporaries_less_aliased():
  mesh = partitioning.make_mesh(1, 2, 2, devices=topologies.devices("v5e:2x2"))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", "tensor"))
  x = jax.ShapeDtypeStruct((1024, 1024), jnp.float32, sharding=sharding)
  lowered = jax.jit(lambda a: (a @ a.T) * 2.0, donate_argnums=0).lower(x)
  record = aot.compile_step("matmul", lowered, "v5e:2x2", mesh)
  memory = lowered.compile().memory_analysis()
  assert record["hbm_bytes_per_device"] == (
      memory.argument_size_in_bytes + memory.output_size_in_bytes
      + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  assert record["fits"] and record["devices"] == 4
  assert record["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
  # 2 * 1024^3 FLOPs of the product, split over 4 devices.
  assert record["flops_per_device"] == pytest.approx(2 * 1024**3 / 4, rel=0.05)
  estimate = aot.estimate(record)
  assert 0 < estimate["mfu"] <= 1 and estimate["step_s"] > 0


@pytest.mark.parametrize("topology", ["v5e:2x2", "v4:2x2x1"])
def test_tiny_pipeline_steps_compile_for_tpu_over_fsdp_and_tensor(gin_config, topology):
  gin_config(["gin/pipeline_tiny.gin"], FSDP_X_TENSOR)
  records = aot_steps.compile_steps(topology)
  assert [r["step"] for r in records] == ["teacher_train", "student_train", "annotate_prefill",
                                          "annotate_decode", "eval_score"]
  capacity = topologies.by_name(topology).chip.hbm_bytes
  for record in records:
    assert record["topology"] == topology and record["devices"] == 4
    assert record["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    assert 0 < record["hbm_bytes_per_device"] < capacity and record["fits"]
    assert record["hbm_capacity_bytes"] == capacity
    assert record["flops_per_device"] > 0 and record["compile_s"] > 0
    assert set(record) >= {"step", "topology", "devices", "mesh", "hbm_bytes_per_device",
                           "hbm_capacity_bytes", "fits", "flops_per_device", "compile_s"}


def test_7b1_pipeline_steps_are_built_for_its_own_models(gin_config):
  # The file includes the tiny pipeline, whose teacher model_overrides a run from an HF
  # checkpoint ignores: the teacher (trained, then annotating) is BLOOM-7.1B.
  gin_config(["gin/pipeline_teacherlm_7b1_tpu.gin"])
  steps = {step.name: step for step in aot_steps.steps("v5e-16")}
  for name in ("teacher_train", "annotate_prefill", "annotate_decode"):
    assert steps[name].params == pytest.approx(7.07e9, rel=0.01), (name, steps[name].model)
    assert "bloom-7b1" in steps[name].model
  # Pretrained OPT-1.3B students, on their own 50,272-token vocabulary.
  for name in ("student_train", "eval_score"):
    assert steps[name].params == pytest.approx(1.32e9, rel=0.01), (name, steps[name].model)
    assert "opt-1.3b" in steps[name].model
  assert steps["teacher_train"].mesh.shape == {"data": 1, "fsdp": 4, "tensor": 4}


def test_a_local_hf_checkpoint_gives_its_config_json_architecture(gin_config, tmp_path):
  from teacherlm_jax.models import hf, presets  # pylint: disable=g-import-not-at-top
  config = presets.get("tiny-bloom", num_layers=3, vocab_size=640)
  (tmp_path / "config.json").write_text(json.dumps(hf.config_to_hf(config)))
  gin_config(["gin/pipeline_tiny.gin"],
             FSDP_X_TENSOR + [f"teacher/ModelSettings.init_hf_checkpoint = '{tmp_path}'"])
  [step] = aot_steps.steps("v5e:2x2", ["teacher_train"])
  assert step.model == str(tmp_path / "config.json")
  assert step.params == config.num_params()  # Not the tiny pipeline's widened teacher.


def test_train_flops_grow_with_depth_where_the_compilers_count_does_not(gin_config):
  records = {}
  for layers in (1, 2, 4):
    gin_config(["gin/pipeline_tiny.gin"], FSDP_X_TENSOR + [
        f"teacher/ModelSettings.overrides = {{'hidden_size': 128, 'num_layers': {layers}}}"])
    [records[layers]] = aot_steps.compile_steps("v5e:2x2", ["teacher_train"])
  flops = {n: r["flops_per_device"] for n, r in records.items()}
  compiled = {n: r["cost_analysis_flops_per_device"] for n, r in records.items()}
  # Where the scan runs once, the analytic count is the compiler's.
  assert flops[1] == pytest.approx(compiled[1], rel=0.05)
  # Linear in depth: each layer adds as much; the compiler counts the scanned body once.
  assert flops[4] - flops[2] == pytest.approx(2 * (flops[2] - flops[1]), rel=1e-6)
  assert flops[4] > 2 * flops[1]
  assert compiled[4] == pytest.approx(compiled[1], rel=0.05)
  for record in records.values():
    assert record["flops_source"] == "analytic"
    assert 0 < record["estimated_mfu"] <= 1


@pytest.mark.parametrize("model", ["tiny-bloom", "tiny-llama"])
def test_tpu_default_attention_compiles_over_a_sharded_mesh(gin_config, model):
  """TPU's default, 'pallas', runs per shard (a shard_map) on fsdp x tensor: every step of the
  tiny pipeline compiles with it (LLaMA's training and scoring through splash attention)."""
  gin_config(["gin/pipeline_tiny.gin"],
             FSDP_X_TENSOR[:-len(XLA_ATTENTION)] + [f"ModelSettings.preset = '{model}'"])
  records = aot_steps.compile_steps("v5e:2x2")
  assert {"teacher_train", "annotate_prefill", "annotate_decode", "eval_score"} <= {
      r["step"] for r in records}
  assert all(r["fits"] for r in records)


def _aot_compile(*args, timeout=1200):
  env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
  return subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "aot_compile.py"), *args],
                        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_oversized_batch_exits_non_zero_saying_what_to_change(tmp_path):
  output = tmp_path / "aot.json"
  result = _aot_compile("--gin_file=gin/pipeline_tiny.gin", "--topology=v5e:2x2",
                        f"--output={output}", "--steps=teacher_train",
                        "--gin.MeshConfig.fsdp=2", "--gin.MeshConfig.tensor=2",
                        "--gin.ModelSettings.attention_impl='xla'",
                        "--gin.teacher/DataConfig.batch_size=65536")
  assert result.returncode != 0
  assert ("teacher train step needs " in result.stderr
          and " GiB of 16 GiB per chip on v5e:2x2: raise teacher/MeshConfig.fsdp, use "
          "teacher/ModelSettings.remat='full' or lower teacher/DataConfig.batch_size"
          in result.stderr), result.stderr[-2000:]
  [record] = json.loads(output.read_text())
  assert record["fits"] is False and record["hbm_bytes_per_device"] > 16 * chips.GiB


def test_a_step_the_config_lacks_is_named(gin_config):
  gin_config(["gin/pipeline_tiny.gin"], FSDP_X_TENSOR)
  with pytest.raises(ValueError, match=r"\['decode'\] are not steps of this config"):
    aot_steps.steps("v5e:2x2", ["decode"])


def _fitting_records(tmp_path, gin_file: str, topology: str, steps):
  """The records of `aot_compile.py` on `gin_file` for `topology`, checked to be `steps` in
  order and all fitting; with the script's result (its printed table)."""
  output = tmp_path / "aot.json"
  result = _aot_compile(f"--gin_file={gin_file}", f"--topology={topology}", f"--output={output}")
  assert result.returncode == 0, result.stderr[-3000:]
  records = json.loads(output.read_text())
  assert [r["step"] for r in records] == steps
  assert all(r["fits"] for r in records), records
  return records, result


@pytest.mark.slow
def test_7b1_pipeline_fits_v5e_16(tmp_path):
  records, result = _fitting_records(
      tmp_path, "gin/pipeline_teacherlm_7b1_tpu.gin", "v5e-16",
      ["teacher_train", "student_train", "annotate_prefill", "annotate_decode", "eval_score"])
  teacher = records[0]
  assert teacher["params"] == pytest.approx(7.07e9, rel=0.01)
  assert 0 < teacher["estimated_mfu"] < 1
  # The 7.1B step's own FLOPs: at least 6 x 7.1B parameters x 16 x 2,048 tokens, over 16.
  assert teacher["flops_per_device"] > 6 * 7.0e9 * 16 * 2048 / 16
  assert "teacher_train" in result.stdout and "7.07B" in result.stdout


@pytest.mark.slow
def test_bloom176b_annotation_fits_v5p_8(tmp_path):
  records, _ = _fitting_records(tmp_path, "gin/annotate_bloom176b_tpu.gin", "v5p-8",
                                ["annotate_prefill", "annotate_decode"])
  assert all(r["params"] == pytest.approx(176e9, rel=0.02) for r in records), records
  assert all(0 < r["estimated_mfu"] <= 1 + 1e-9 for r in records), records
