"""Our sampling follows the reference's: HF `generate(do_sample=True)` with the same settings.

The reference annotates with `generate(do_sample=True, max_new_tokens=2048)` and HF's default
warpers (temperature 1.0, top-k 50, top-p 1.0). On a tiny random BLOOM we draw many first
tokens with our decoder and test them against (a) the distribution HF samples from (softmax of
the scores `generate` returns after its warpers) with a chi-square goodness-of-fit test, and
(b) tokens HF `generate` itself sampled, with a chi-square test of homogeneity. A negative
control shows the tests can tell a different distribution apart.
"""
import numpy as np
import pytest
from scipy import stats

from hf_peers import make_hf_model
from teacherlm_jax.annotation import decoding
from teacherlm_jax.models import hf

NUM_SAMPLES = 6000
PROMPT = [5, 17, 33, 8, 61, 12, 40]
# The reference's settings (HF's defaults for do_sample=True), and a nucleus-heavy variant so
# the top-p path is exercised too.
SETTINGS = {"reference": dict(temperature=1.0, top_k=50, top_p=1.0),
            "nucleus": dict(temperature=0.7, top_k=0, top_p=0.8)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  directory = tmp_path_factory.mktemp("sampling") / "bloom"
  # Small embeddings keep the next-token distribution broad, so many tokens get mass.
  torch_model = make_hf_model("bloom", directory, seed=3)
  import torch
  with torch.no_grad():
    torch_model.transformer.word_embeddings.weight.mul_(0.25)
  torch_model.save_pretrained(str(directory))
  _, model = hf.import_checkpoint(directory)
  return torch_model, model


def _hf_distribution(torch_model, settings) -> np.ndarray:
  """The probabilities HF `generate` samples the first token from (after its warpers)."""
  import torch
  out = torch_model.generate(torch.tensor([PROMPT]), do_sample=True, max_new_tokens=1,
                             output_scores=True, return_dict_in_generate=True,
                             pad_token_id=3, eos_token_id=None, **settings)
  return torch.softmax(out.scores[0][0].double(), dim=-1).numpy()


def _hf_samples(torch_model, settings) -> np.ndarray:
  import torch
  torch.manual_seed(0)
  out = torch_model.generate(torch.tensor([PROMPT] * NUM_SAMPLES), do_sample=True,
                             max_new_tokens=1, pad_token_id=3, eos_token_id=None, **settings)
  return out[:, -1].numpy()


def _our_samples(model, settings) -> np.ndarray:
  decoder = decoding.Decoder(model, eos_id=-1)
  sampling = decoding.SamplingConfig(max_new_tokens=1, **settings)
  generations = decoder.generate([PROMPT] * NUM_SAMPLES, sampling, seed=1234)
  return np.asarray([g.tokens[0] for g in generations])


def _bins(expected_probs: np.ndarray, min_expected: float = 5.0) -> np.ndarray:
  """Token -> bin: tokens expected >= min_expected times get their own bin, the rest share
  one (so every bin of the chi-square test is large enough)."""
  big = expected_probs * NUM_SAMPLES >= min_expected
  bins = np.full(expected_probs.shape, int(big.sum()))
  bins[big] = np.arange(int(big.sum()))
  return bins


def _goodness_of_fit(samples: np.ndarray, probs: np.ndarray) -> float:
  bins = _bins(probs)
  num_bins = bins.max() + 1
  observed = np.bincount(bins[samples], minlength=num_bins)
  expected = np.bincount(bins, weights=probs, minlength=num_bins) * NUM_SAMPLES
  keep = expected > 0
  return stats.chisquare(observed[keep], expected[keep] * observed.sum() / expected[keep].sum()
                         ).pvalue


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_first_tokens_follow_hf_generate_distribution(models, name):
  torch_model, model = models
  settings = SETTINGS[name]
  probs = _hf_distribution(torch_model, settings)
  assert (probs > 1e-4).sum() >= 10, "the test needs a broad distribution to mean anything"
  ours = _our_samples(model, settings)
  # Never a token HF's warpers removed (outside top-k / the nucleus).
  assert probs[ours].min() > 0, sorted(set(ours[probs[ours] == 0].tolist()))
  assert _goodness_of_fit(ours, probs) > 1e-3
  # Homogeneity with HF's own samples: one 2 x bins contingency table.
  theirs = _hf_samples(torch_model, settings)
  bins = _bins(probs)
  table = np.stack([np.bincount(bins[s], minlength=bins.max() + 1) for s in (ours, theirs)])
  table = table[:, table.sum(0) > 0]
  assert stats.chi2_contingency(table).pvalue > 1e-3


def test_the_test_tells_other_settings_apart(models):
  """Negative control: samples without the reference's top-k fail against its distribution."""
  torch_model, model = models
  reference = _hf_distribution(torch_model, SETTINGS["reference"])
  untruncated = _our_samples(model, dict(temperature=1.3, top_k=0, top_p=1.0))
  assert (reference[untruncated] == 0).any() or _goodness_of_fit(untruncated, reference) < 1e-6
