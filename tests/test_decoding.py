"""Decoding: greedy parity with transformers generate, sampling, slot engine, sharding."""
import numpy as np
import pytest

import jax
import torch

from hf_peers import left_padded_batch, make_hf_model
from teacherlm_jax.annotation import decoding
from teacherlm_jax.models import hf
from teacherlm_jax.runtime import partitioning

MAX_NEW = 12
LENGTHS = [5, 9, 3, 12]


@pytest.fixture(scope="module", params=["bloom", "opt"])
def peer(request, tmp_path_factory):
  """(torch model, our config, our model) with identical random weights."""
  directory = tmp_path_factory.mktemp(request.param)
  torch_model = make_hf_model(request.param, directory)
  config, model = hf.import_checkpoint(directory)
  return torch_model, config, model


def _prompts(config, lengths=LENGTHS, seed=0):
  tokens, mask = left_padded_batch(config.vocab_size, lengths, config.pad_token_id, seed=seed)
  prompts = [list(row[mask_row.astype(bool)]) for row, mask_row in zip(tokens, mask)]
  return tokens, mask, prompts


def test_greedy_matches_transformers_generate(peer):
  torch_model, config, model = peer
  tokens, mask, prompts = _prompts(config)
  decoder = decoding.Decoder(model, eos_id=-1)
  unbounded = decoder.generate(prompts, decoding.SamplingConfig(max_new_tokens=MAX_NEW))
  # An EOS id that one row emits mid-way, so per-row stopping is exercised too.
  eos_id = int(unbounded[1].tokens[3])
  ours = decoder.generate(prompts, decoding.SamplingConfig(max_new_tokens=MAX_NEW),
                          eos_id=eos_id)
  with torch.no_grad():
    out = torch_model.generate(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                               do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=eos_id,
                               pad_token_id=config.pad_token_id, output_scores=True,
                               return_dict_in_generate=True)
  theirs = out.sequences[:, tokens.shape[1]:].numpy()
  their_logprobs = torch.log_softmax(torch.stack(out.scores, 1).float(), -1).numpy()
  assert any(g.stopped_at_eos for g in ours) and not all(g.stopped_at_eos for g in ours)
  for row, generation in enumerate(ours):
    n = generation.num_tokens
    np.testing.assert_array_equal(generation.tokens, theirs[row, :n])
    if generation.stopped_at_eos:
      assert generation.tokens[-1] == eos_id and eos_id not in generation.tokens[:-1]
    else:
      assert n == MAX_NEW and eos_id not in generation.tokens
    expected = their_logprobs[row, np.arange(n), generation.tokens]
    np.testing.assert_allclose(generation.logprobs, expected, atol=1e-4)


def test_pack_prompts_places_each_prompt_once_in_fewer_rows():
  rng = np.random.default_rng(0)
  lengths = rng.integers(16, 49, size=32)
  prompts = [list(rng.integers(4, 100, size=n)) for n in lengths]
  packed = decoding.pack_prompts(prompts, 64, pad_id=3, row_multiple=2)
  rows = packed.tokens.shape[0]
  assert rows % 2 == 0 and rows < len(prompts)
  owner = np.full(packed.tokens.shape, -1)
  for index, prompt in enumerate(prompts):
    r, s, n = packed.row[index], packed.start[index], packed.length[index]
    assert n == len(prompt) and s + n <= 64
    assert (owner[r, s:s + n] == -1).all(), "prompts overlap"
    owner[r, s:s + n] = index
    np.testing.assert_array_equal(packed.tokens[r, s:s + n], prompt)
    segment = packed.segment_ids[r, s:s + n]
    assert segment[0] > 0 and (segment == segment[0]).all()
  # Every non-padding token belongs to one prompt, each prompt has its own segment id.
  np.testing.assert_array_equal(packed.segment_ids != 0, owner >= 0)
  for r in range(rows):
    in_row = np.flatnonzero(packed.row == r)
    assert len(set(packed.segment_ids[r, packed.start[in_row]])) == len(in_row)
  assert (packed.tokens[owner < 0] == 3).all()
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    decoding.pack_prompts([[5], []], 8, pad_id=0)
  with pytest.raises(ValueError, match="prompt 0 has 9 tokens, more than the width 8"):
    decoding.pack_prompts([[5] * 9], 8, pad_id=0)


@pytest.fixture(scope="module")
def bloom(tmp_path_factory):
  """(config, model) of a random BLOOM peer: sampling and batching do not depend on family."""
  directory = tmp_path_factory.mktemp("bloom_only")
  make_hf_model("bloom", directory, seed=1)
  return hf.import_checkpoint(directory)


def test_sampling_is_reproducible_and_top_k_1_is_greedy(bloom):
  config, model = bloom
  _, _, prompts = _prompts(config)
  decoder = decoding.Decoder(model, eos_id=-1)
  hot = decoding.SamplingConfig(max_new_tokens=MAX_NEW, temperature=3.0)
  first = decoder.generate(prompts, hot, seed=7)
  again = decoder.generate(prompts, hot, seed=7)
  other = decoder.generate(prompts, hot, seed=8)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a.tokens, b.tokens)
  assert any(not np.array_equal(a.tokens, b.tokens) for a, b in zip(first, other))
  # A row's sample depends on (seed, uid, step) only, not on the batch around it.
  alone = decoder.generate([prompts[2]], hot, seed=7, uids=[2])
  np.testing.assert_array_equal(alone[0].tokens, first[2].tokens)

  greedy = decoder.generate(prompts, decoding.SamplingConfig(max_new_tokens=MAX_NEW))
  top_k_1 = decoder.generate(prompts, decoding.SamplingConfig(
      max_new_tokens=MAX_NEW, temperature=1.0, top_k=1), seed=3)
  tiny_top_p = decoder.generate(prompts, decoding.SamplingConfig(
      max_new_tokens=MAX_NEW, temperature=1.0, top_p=1e-6), seed=3)
  for g, k, p in zip(greedy, top_k_1, tiny_top_p):
    np.testing.assert_array_equal(g.tokens, k.tokens)
    np.testing.assert_array_equal(g.tokens, p.tokens)


def test_slot_engine_returns_the_static_greedy_texts(bloom):
  config, model = bloom
  lengths = [5, 9, 3, 12, 7, 2, 10]
  limits = [12, 3, 8, 1, 12, 6, 9]  # rows finish at different steps, forcing refills
  _, _, prompts = _prompts(config, lengths, seed=1)
  decoder = decoding.Decoder(model, eos_id=-1)
  sampling = decoding.SamplingConfig(max_new_tokens=MAX_NEW)
  static = decoder.generate(prompts, sampling, max_new_tokens=limits)
  engine = decoding.SlotEngine(decoder, sampling, num_slots=3, max_prompt_length=12,
                               sync_every=4)
  requests = [decoding.Request(uid, p, m) for uid, (p, m) in enumerate(zip(prompts, limits))]
  streamed = {g.uid: g for g in engine.run(requests)}
  assert sorted(streamed) == list(range(len(prompts)))
  assert engine.stats["prefills"] > 1  # slots were refilled, not one big batch
  for uid, generation in enumerate(static):
    assert generation.num_tokens == limits[uid]
    np.testing.assert_array_equal(streamed[uid].tokens, generation.tokens)
    np.testing.assert_allclose(streamed[uid].logprobs, generation.logprobs, atol=1e-5)


def test_sharded_decoding_matches_one_device(tmp_path):
  # 4 heads, vocab 128: divisible by the tensor axis.
  make_hf_model("bloom", tmp_path, n_head=4, vocab_size=128)
  config, model = hf.import_checkpoint(tmp_path)
  _, _, prompts = _prompts(config)
  hot = decoding.SamplingConfig(max_new_tokens=MAX_NEW, temperature=2.0, top_k=20)
  single = decoding.Decoder(model, eos_id=-1)
  mesh = partitioning.make_mesh(data=2, fsdp=1, tensor=4)
  sharded = decoding.Decoder(model, eos_id=-1, mesh=mesh)
  assert len(jax.devices()) == 8
  kernel = sharded.params["layers"]["mlp"]["up"]["kernel"]
  assert kernel.sharding.spec == partitioning.logical_to_spec(("layers", "embed", "mlp"),
                                                              mesh=mesh)
  one = single.generate(prompts, hot, seed=5)
  many = sharded.generate(prompts, hot, seed=5)
  for a, b in zip(one, many):
    np.testing.assert_array_equal(a.tokens, b.tokens)
  # Sampling keys depend on (seed, uid, step) only: the sharded slot engine samples the same.
  engine = decoding.SlotEngine(sharded, hot, num_slots=2, max_prompt_length=12)
  streamed = {g.uid: g for g in engine.run(
      (decoding.Request(uid, p) for uid, p in enumerate(prompts)), seed=5)}
  for uid, generation in enumerate(one):
    np.testing.assert_array_equal(streamed[uid].tokens, generation.tokens)


def test_prompt_longer_than_context_is_refused(bloom):
  config, model = bloom
  decoder = decoding.Decoder(model, max_length=16)
  with pytest.raises(ValueError, match="exceeds the model context of 16"):
    decoder.generate([[5] * 10], decoding.SamplingConfig(max_new_tokens=7))


def test_bfloat16_model_decodes_with_the_cache_dtype_its_config_fixes(tmp_path):
  make_hf_model("bloom", tmp_path, seed=2)
  config, model = hf.import_checkpoint(tmp_path, dtype="bfloat16", param_dtype="bfloat16")
  decoder = decoding.Decoder(model, eos_id=-1)
  # The config fixes the numerics, whichever platform runs them: the compute dtype by default.
  assert decoder.cache_dtype == jax.numpy.bfloat16
  wide = model.config.replace(cache_dtype="float32")
  assert wide.kv_cache_dtype == np.float32
  assert decoding.Decoder(model, cache_dtype="float32").cache_dtype == np.float32
  _, _, prompts = _prompts(config)
  generations = decoder.generate(prompts, decoding.SamplingConfig(max_new_tokens=MAX_NEW))
  for prompt, generation in zip(prompts, generations):
    # Each greedy token is the bf16 model's own choice in a cache-free forward of the text
    # (up to bf16 rounding between the two attention paths: near-ties may flip).
    text = np.asarray(list(prompt) + list(generation.tokens))[None]
    logits = np.asarray(model(text)[0][0], np.float32)
    steps = logits[len(prompt) - 1:-1]
    chosen = steps[np.arange(MAX_NEW), generation.tokens]
    assert np.all(chosen >= steps.max(-1) - 0.02 * np.abs(steps).max()), (chosen, steps.max(-1))
    assert np.mean(chosen == steps.max(-1)) >= 0.75
