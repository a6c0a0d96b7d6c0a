"""scripts/convert_hf.py: HF dir -> orbax params -> HF dir keeps every tensor and the logits."""
import subprocess
import sys

import numpy as np

import hf_peers
from conftest import REPO_ROOT
from teacherlm_jax.models import checkpoint_io, hf


def test_convert_script_round_trip(tmp_path):
  hf_dir = tmp_path / "hf"
  torch_model = hf_peers.make_hf_model("opt_post_ln", hf_dir)
  script = str(REPO_ROOT / "scripts" / "convert_hf.py")
  subprocess.run([sys.executable, script, "--direction=import", f"--hf_dir={hf_dir}",
                  f"--output_dir={tmp_path / 'ours'}"], check=True)
  model = checkpoint_io.restore_params(None, tmp_path / "ours")
  tokens, mask = hf_peers.left_padded_batch(model.config.vocab_size, [5, 2], 1)
  ours, _ = model(tokens, segment_ids_BxL=mask)
  expected = hf_peers.hf_logits(torch_model, tokens, mask)
  assert np.abs(np.asarray(ours) - expected)[mask.astype(bool)].max() < 1e-4
  subprocess.run([sys.executable, script, "--direction=export",
                  f"--params_dir={tmp_path / 'ours'}",
                  f"--model_config={tmp_path / 'ours' / 'model_config.json'}",
                  f"--output_dir={tmp_path / 'back'}"], check=True)
  _, back = hf.import_checkpoint(tmp_path / "back")
  original = hf.params_to_hf(hf.import_checkpoint(hf_dir)[1])
  for name, array in hf.params_to_hf(back).items():
    np.testing.assert_array_equal(array, original[name], err_msg=name)
