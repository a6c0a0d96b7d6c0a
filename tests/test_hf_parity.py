"""Our models reproduce `transformers` (PyTorch, CPU) logits on the same weights."""
import numpy as np
import pytest

import hf_peers
from teacherlm_jax.benchmarks import models
from teacherlm_jax.models import attention, hf, transformer

FAMILIES = sorted(hf_peers.FAMILY_CONFIGS)


def _assert_logits_close(got, want, mask, tolerance, label=""):
  """Max |logit difference| over the real (mask != 0) tokens below `tolerance`."""
  diff = np.abs(np.asarray(got) - np.asarray(want))[np.asarray(mask).astype(bool)]
  assert diff.max() < tolerance, f"{label}: max |logit diff| {diff.max()}"


@pytest.fixture(scope="module", params=FAMILIES)
def peer(request, tmp_path_factory):
  directory = tmp_path_factory.mktemp(request.param)
  torch_model = hf_peers.make_hf_model(request.param, directory)
  config, model = hf.import_checkpoint(directory)
  return request.param, torch_model, config, model, directory


def test_left_padded_batch_logits_match_transformers(peer):
  family, torch_model, config, model, _ = peer
  tokens, mask = hf_peers.left_padded_batch(config.vocab_size, [9, 4, 1, 7], config.pad_token_id)
  expected = hf_peers.hf_logits(torch_model, tokens, mask)
  ours, _ = model(tokens, segment_ids_BxL=mask)
  _assert_logits_close(ours, expected, mask, 1e-4, family)


def test_cached_decoding_equals_full_forward(peer):
  _, _, config, model, _ = peer
  tokens, mask = hf_peers.left_padded_batch(config.vocab_size, [8, 5, 3], config.pad_token_id, 1)
  full, _ = model(tokens, segment_ids_BxL=mask)
  prefill = 4
  cache = transformer.init_cache(config, tokens.shape[0], 16)
  pieces, cache = model(tokens[:, :prefill], segment_ids_BxL=mask[:, :prefill], cache=cache)
  pieces = [pieces]
  for t in range(prefill, tokens.shape[1]):
    step, cache = model(tokens[:, t:t + 1], segment_ids_BxL=mask[:, t:t + 1], cache=cache)
    pieces.append(step)
  cached = np.concatenate([np.asarray(p) for p in pieces], axis=1)
  _assert_logits_close(cached, full, mask, 1e-5, "cached vs full")


def _assert_packed_equals_separate_runs(model, config, lengths, pads, seed):
  """Segments of `lengths` random tokens packed in one row (then `pads` pad tokens) give the
  logits each gives alone."""
  rng = np.random.default_rng(seed)
  segments = [rng.integers(3, config.vocab_size, n) for n in lengths]
  packed = np.concatenate(segments + [np.full(pads, config.pad_token_id)])[None]
  segment_ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)]
                               + [np.zeros(pads, int)])[None]
  packed_logits, _ = model(packed, segment_ids_BxL=segment_ids)
  start = 0
  for segment in segments:
    alone, _ = model(segment[None])
    np.testing.assert_allclose(packed_logits[0, start:start + len(segment)], alone[0], atol=1e-5)
    start += len(segment)


def test_packed_segments_equal_separate_runs(peer):
  _, _, config, model, _ = peer
  _assert_packed_equals_separate_runs(model, config, [5, 7], pads=2, seed=3)


def test_attention_in_query_blocks_matches_transformers(peer, monkeypatch):
  """A cache-free forward attends in blocks of query rows, each seeing only the keys up to
  its own last row: the same logits as transformers (left-padded) and as separate runs
  (packed segments that cross the blocks' boundaries)."""
  family, torch_model, config, model, _ = peer
  monkeypatch.setattr(attention, "MIN_QUERY_BLOCK_ROWS", 4)
  assert attention.causal_query_blocks(16) == 4
  tokens, mask = hf_peers.left_padded_batch(config.vocab_size, [16, 9, 3, 14],
                                            config.pad_token_id, 4)
  ours, _ = model(tokens, segment_ids_BxL=mask)
  _assert_logits_close(ours, hf_peers.hf_logits(torch_model, tokens, mask), mask, 1e-4, family)
  _assert_packed_equals_separate_runs(model, config, [6, 7, 3], pads=0, seed=5)


def test_export_round_trip_and_transformers_reload(peer, tmp_path):
  import transformers
  family, torch_model, config, model, directory = peer
  exported = hf.export_checkpoint(model, tmp_path / "exported")
  config_again, model_again = hf.import_checkpoint(exported)
  assert config_again == config
  first = hf.params_to_hf(model)
  again = hf.params_to_hf(model_again)
  assert first.keys() == again.keys()
  for name in first:
    np.testing.assert_array_equal(first[name], again[name], err_msg=name)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(exported)).eval()
  tokens, mask = hf_peers.left_padded_batch(config.vocab_size, [6, 3], config.pad_token_id, 2)
  np.testing.assert_allclose(hf_peers.hf_logits(reloaded, tokens, mask)[mask.astype(bool)],
                             hf_peers.hf_logits(torch_model, tokens, mask)[mask.astype(bool)],
                             atol=1e-5)


@pytest.mark.parametrize("family", models.FAMILIES)
def test_training_benchmark_models_are_the_same_on_both_sides(family, tmp_path):
  """`scripts/benchmark.py --training_families`: the torch model of each family's benchmark
  config, imported, has its parameter count and its logits."""
  import torch
  import transformers
  torch.manual_seed(0)
  torch_model = transformers.AutoModelForCausalLM.from_config(
      models.hf_config(family, "quick")).eval()
  torch_model.save_pretrained(tmp_path)
  config, model = hf.import_checkpoint(tmp_path)
  assert config.num_params() == sum(p.numel() for p in torch_model.parameters())
  tokens, mask = hf_peers.left_padded_batch(config.vocab_size, [6, 3], config.pad_token_id)
  expected = hf_peers.hf_logits(torch_model, tokens, mask)
  ours, _ = model(tokens, segment_ids_BxL=mask)
  _assert_logits_close(ours, expected, mask, 1e-4, family)
