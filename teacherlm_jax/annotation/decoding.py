"""Autoregressive decoding over the KV cache: sampling, a static-batch path and a slot engine.

Both paths share one prefill and one single-token step:
  * prefill runs the prompts packed end to end into as few rows as they fit (`pack_prompts`;
    segment ids keep them apart), moves each prompt's keys and values to the start of its own
    cache row, and samples each row's first token;
  * a step feeds each row's last token, writes it at the row's own cache index, and samples.
`Decoder.generate` (static batch) runs prefill then one `lax.while_loop` of steps until every
row hit EOS or its `max_new_tokens`; it is the path the parity tests compare with
`transformers`. `SlotEngine` (continuous batching) keeps a cache of `num_slots` rows, runs steps
until enough rows finished, hands finished rows back and prefills new requests into the freed
rows, so a long job never waits for the longest row of a batch.

Sampling keys are `fold_in(fold_in(key(seed), uid), step)`: a request's sample depends on the
seed, its uid and the token index only, not on which batch or slot it ran in. Greedy is
`temperature=0`; otherwise temperature, then top-k, then top-p (nucleus) filtering. The
log-probability returned for each token is under the model's unmodified distribution
(log_softmax of the logits), so it measures the teacher's confidence whatever the sampling.

Hot paths are plain `jax.jit` over `nnx.split` state (graph static, state an argument), built
by the runtime's `Program` (placement by logical axes, mesh, compiler options); the cache is
donated and sharded by its logical axes (`transformer.cache_logical_axes`). The slot engine
drives the decoder through its public methods only (`new_cache`, `empty_decode_state`,
`insert`, `decode_steps`, `release_cache`). Prompt
lengths are bucketed to powers of two and packed rows counted in steps of 1/16 of the batch, to
bound recompiles. This module does no file I/O.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from teacherlm_jax.models import transformer
from teacherlm_jax.runtime import backend
from teacherlm_jax.runtime import partitioning
from teacherlm_jax.runtime import shapes
from teacherlm_jax.runtime import program as program_lib

DecodeState = Dict[str, jax.Array]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How tokens are chosen (static under jit; the seed is passed separately). Gin binds its
  fields as `SamplingConfig.temperature = ...` (the annotation job takes it whole).

  Attributes:
    max_new_tokens: generated tokens per row at most (EOS included).
    temperature: 0 = greedy (argmax); otherwise logits are divided by it before sampling.
    top_k: keep the k most likely tokens (0 = all).
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p.
  """
  max_new_tokens: int = 64
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"SamplingConfig.max_new_tokens={self.max_new_tokens}: must be >= 1")
    if not (math.isfinite(self.temperature) and self.temperature >= 0):
      raise ValueError(f"SamplingConfig.temperature={self.temperature}: must be a finite "
                       "number >= 0 (0 = greedy)")
    if self.top_k < 0:
      raise ValueError(f"SamplingConfig.top_k={self.top_k}: must be >= 0")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"SamplingConfig.top_p={self.top_p}: must be in (0, 1]")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


@dataclasses.dataclass
class Generation:
  """One decoded row: `tokens` (EOS included when it stopped there) and their log-probs."""
  uid: int
  tokens: np.ndarray
  logprobs: np.ndarray
  stopped_at_eos: bool

  @property
  def num_tokens(self) -> int:
    return int(self.tokens.shape[0])

  @property
  def mean_logprob(self) -> float:
    return float(np.mean(self.logprobs)) if self.num_tokens else float("nan")


@dataclasses.dataclass(frozen=True)
class Request:
  uid: int
  prompt_tokens: Sequence[int]
  max_new_tokens: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class PackedPrompts:
  """Prompts packed end to end into rows of `width` tokens: one prefill, no padding inside.

  Attributes:
    tokens: R x W token ids (the pad id where no prompt lies).
    segment_ids: R x W: 1, 2, ... for the prompts of a row in order, 0 on padding.
    row, start, length: per prompt (B), where it lies: `tokens[row, start:start + length]`.
  """
  tokens: np.ndarray
  segment_ids: np.ndarray
  row: np.ndarray
  start: np.ndarray
  length: np.ndarray


def pack_prompts(prompts: Sequence[Sequence[int]], width: int, pad_id: int,
                 row_multiple: int = 1) -> PackedPrompts:
  """First-fit decreasing: each prompt, longest first, goes to the first row with room.

  The row count is rounded up to `row_multiple`, which bounds the prefill shapes compiled for
  a (batch, width) and keeps rows divisible by the data parallelism. Prompts 16-48 tokens long
  in a 64-wide bucket fill ~18 rows where left padding runs 32 (half of it padding).
  """
  lengths = [len(p) for p in prompts]
  for index, n in enumerate(lengths):
    if n == 0:
      raise ValueError(f"prompt {index} is empty; decoding needs at least one prompt token")
    if n > width:
      raise ValueError(f"prompt {index} has {n} tokens, more than the width {width}")
  row, start, segment = (np.zeros(len(prompts), np.int32) for _ in range(3))
  room, placed = [], []  # per row: free tokens left, prompts placed (left to right)
  for index in sorted(range(len(prompts)), key=lambda i: -lengths[i]):
    target = next((r for r, free in enumerate(room) if free >= lengths[index]), len(room))
    if target == len(room):
      room.append(width)
      placed.append(0)
    row[index], start[index] = target, width - room[target]
    room[target] -= lengths[index]
    placed[target] += 1
    segment[index] = placed[target]
  rows = -(-len(room) // row_multiple) * row_multiple
  tokens = np.full((rows, width), pad_id, np.int32)
  segment_ids = np.zeros((rows, width), np.int32)
  for index, prompt in enumerate(prompts):
    r, s, n = row[index], start[index], lengths[index]
    tokens[r, s:s + n] = np.asarray(prompt, np.int32)
    segment_ids[r, s:s + n] = segment[index]
  return PackedPrompts(tokens, segment_ids, row, start, np.asarray(lengths, np.int32))


def sample_tokens(logits_BxV: jax.Array, keys_B: jax.Array, sampling: SamplingConfig
                  ) -> Tuple[jax.Array, jax.Array]:
  """(tokens_B, logprobs_B): the chosen tokens and their log-prob under the raw logits."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  max_B = jnp.max(logits_BxV, axis=-1)
  if sampling.greedy:
    # argmax as max + first index holding it: two plain reductions, where XLA:CPU's
    # (value, index) argmax reduction took ~4% of a batch-32 decode step.
    vocab_ids_BxV = jax.lax.broadcasted_iota(jnp.int32, logits_BxV.shape, 1)
    tokens_B = jnp.min(jnp.where(logits_BxV == max_B[:, None], vocab_ids_BxV,
                                 logits_BxV.shape[1]), axis=-1)
  else:
    scaled_BxV = logits_BxV / sampling.temperature
    if sampling.top_k > 0:
      kth_Bx1 = jax.lax.top_k(scaled_BxV, sampling.top_k)[0][:, -1:]
      scaled_BxV = jnp.where(scaled_BxV < kth_Bx1, -jnp.inf, scaled_BxV)
    if sampling.top_p < 1.0:
      sorted_BxV = -jnp.sort(-scaled_BxV, axis=-1)
      probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
      before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
      # The most likely token is always kept (before = 0 < top_p).
      threshold_Bx1 = jnp.min(jnp.where(before_BxV < sampling.top_p, sorted_BxV, jnp.inf),
                              axis=-1, keepdims=True)
      scaled_BxV = jnp.where(scaled_BxV < threshold_Bx1, -jnp.inf, scaled_BxV)
    tokens_B = jax.vmap(jax.random.categorical)(keys_B, scaled_BxV).astype(jnp.int32)
  # log p(token) = logit - logsumexp(logits): one pass over the vocabulary, no B x V table.
  log_z_B = max_B + jnp.log(jnp.sum(jnp.exp(logits_BxV - max_B[:, None]), axis=-1))
  token_logit_B = jnp.take_along_axis(logits_BxV, tokens_B[:, None], axis=-1)[:, 0]
  return tokens_B, token_logit_B - log_z_B


_STATE_AXES = {
    "tokens": ("cache_batch", None), "logprobs": ("cache_batch", None),
    "count": ("cache_batch",), "done": ("cache_batch",), "eos": ("cache_batch",),
    "last": ("cache_batch",), "uid": ("cache_batch",), "max_new": ("cache_batch",),
    "eos_id": ("cache_batch",),
}


def _initial_state(batch: int, max_new_tokens: int, uid_B, max_new_B, valid_B, eos_id_B
                   ) -> DecodeState:
  return {
      "tokens": jnp.zeros((batch, max_new_tokens), jnp.int32),
      "logprobs": jnp.zeros((batch, max_new_tokens), jnp.float32),
      "count": jnp.zeros((batch,), jnp.int32),
      "done": ~valid_B,
      "eos": jnp.zeros((batch,), bool),
      "last": jnp.zeros((batch,), jnp.int32),
      "uid": uid_B.astype(jnp.int32),
      "max_new": max_new_B.astype(jnp.int32),
      "eos_id": eos_id_B.astype(jnp.int32),
  }


class Decoder:
  """Jitted prefill/step functions over one model's params, optionally sharded on `mesh`.

  The mesh is over the devices this process drives: annotation scales across hosts by giving
  each process its own slice of the input (see annotate.py), not by cross-host model
  parallelism.
  """

  def __init__(self, model: transformer.DecoderLM, *, mesh: Optional[Mesh] = None,
               eos_id: Optional[int] = None, pad_id: Optional[int] = None,
               max_length: Optional[int] = None, cache_dtype: Optional[str] = None):
    """Args:
      model: the LM (its parameters are copied to the mesh when one is given; an abstract
        model from `nnx.eval_shape` gives a decoder whose steps can be traced and lowered).
      mesh: ('data', 'fsdp', 'tensor') mesh; None = default device, unsharded.
      eos_id: token that ends a row (default config.eos_token_id; -1 = never stop early).
      pad_id: token for padding (default config.pad_token_id).
      max_length: longest prompt + generation allowed (default the model's
        max_position_embeddings: OPT and LLaMA have no positions past it).
      cache_dtype: dtype of the KV cache; default the config's (`ModelConfig.cache_dtype`).
    """
    self.config = model.config
    self.runtime = program_lib.Program(mesh)
    self.eos_id = self.config.eos_token_id if eos_id is None else int(eos_id)
    self.pad_id = self.config.pad_token_id if pad_id is None else int(pad_id)
    self.max_length = max_length or self.config.max_position_embeddings
    self.cache_dtype = jnp.dtype(cache_dtype or self.config.kv_cache_dtype)
    self._graphdef, self.params = self.runtime.split(model)
    self._cache_pool: Dict[Tuple[int, int], transformer.Cache] = {}
    jit = functools.partial(self.runtime.jit, program=backend.DECODE,
                            dtype=self.config.compute_dtype, static_argnames=("sampling",))
    self._generate_jit = jit(self._generate, donate_argnames=("cache",))
    # The slot engine's two programs, public for ahead-of-time lowering (`.lower`, `.trace`
    # with `abstract_cache` and `abstract_decode_state`): `insert_fn(params, cache, dstate,
    # packed, uid_G, max_new_G, valid_G, eos_id_G, slots_G, seed, *, sampling)` and
    # `steps_fn(params, cache, dstate, seed, max_steps, refill_at, *, sampling)`.
    self.insert_fn = jit(self._insert, donate_argnames=("cache", "dstate"))
    self.steps_fn = jit(self._steps, donate_argnames=("cache", "dstate"))

  # ---- placement -------------------------------------------------------------------------

  @property
  def mesh(self) -> Optional[Mesh]:
    return self.runtime.mesh

  @property
  def data_parallelism(self) -> int:
    """Rows must come in multiples of this (the cache batch is split over data and fsdp)."""
    return self.runtime.data_parallelism

  def _put(self, array, names):
    return self.runtime.put(array, names)

  def _constrain_cache(self, cache):
    return jax.tree.map(partitioning.constrain, cache, transformer.cache_logical_axes(cache))

  def _constrain_state(self, dstate):
    return jax.tree.map(partitioning.constrain, dstate, {k: _STATE_AXES[k] for k in dstate})

  def cache_shardings(self, cache):
    """Shardings of `cache`'s leaves by their logical axes (None without a mesh)."""
    return self.runtime.shardings(transformer.cache_logical_axes(cache))

  def abstract_cache(self, batch: int, length: int) -> transformer.Cache:
    """`new_cache`'s shapes and shardings, nothing allocated (ahead-of-time lowering)."""
    abstract = jax.eval_shape(functools.partial(transformer.init_cache, self.config, batch,
                                                length, self.cache_dtype))
    return _with_shardings(abstract, self.cache_shardings(abstract))

  def abstract_decode_state(self, rows: int, max_new_tokens: int) -> DecodeState:
    """`empty_decode_state`'s shapes and shardings, nothing allocated."""
    abstract = jax.eval_shape(lambda: _initial_state(
        rows, max_new_tokens, jnp.zeros(rows, jnp.int32), jnp.ones(rows, jnp.int32),
        jnp.zeros(rows, bool), jnp.zeros(rows, jnp.int32)))
    return _with_shardings(abstract, self._state_shardings())

  def _state_shardings(self):
    return (None if self.mesh is None else
            {k: self.runtime.sharding(_STATE_AXES[k]) for k in _STATE_AXES})

  def new_cache(self, batch: int, length: int) -> transformer.Cache:
    """An empty cache placed by its logical axes (reused from a finished call when possible)."""
    cached = self._cache_pool.pop((batch, length), None)
    if cached is not None:
      return cached
    make = functools.partial(transformer.init_cache, self.config, batch, length,
                             self.cache_dtype)
    return self.runtime.jit(make, program=backend.DECODE,
                            out_shardings=self.cache_shardings(jax.eval_shape(make)))()

  def release_cache(self, cache: transformer.Cache):
    """Hands a cache no longer used back for `new_cache` to reuse (its contents are stale)."""
    self._cache_pool[(cache["index"].shape[0], cache["segment_ids"].shape[1])] = cache

  def empty_decode_state(self, rows: int, max_new_tokens: int) -> DecodeState:
    """A decode state of `rows` finished rows (nothing to decode), placed for `decode_steps`."""
    shardings = self._state_shardings()
    make = lambda: _initial_state(rows, max_new_tokens, jnp.zeros(rows, jnp.int32),
                                  jnp.ones(rows, jnp.int32), jnp.zeros(rows, bool),
                                  jnp.full(rows, self.eos_id, jnp.int32))
    return self.runtime.jit(make, program=backend.DECODE, out_shardings=shardings)()

  def check_length(self, prompt_length: int, max_new_tokens: int):
    if prompt_length + max_new_tokens > self.max_length:
      raise ValueError(
          f"prompt of {prompt_length} tokens + max_new_tokens={max_new_tokens} exceeds the "
          f"model context of {self.max_length} tokens")

  def _pack(self, prompts: Sequence[Sequence[int]], width: int):
    """`pack_prompts` on the mesh: (tokens_RxW, segment_ids_RxW, row_B, start_B, length_B)."""
    dp = self.data_parallelism
    # Rows in steps of ~1/16 of the batch: at most 16 prefill shapes per (batch, width).
    row_multiple = dp * max(1, len(prompts) // (16 * dp))
    packed = pack_prompts(prompts, width, self.pad_id, row_multiple)
    return (self._put(packed.tokens, ("batch", "length")),
            self._put(packed.segment_ids, ("batch", "length")),
            self._put(packed.row, ("batch",)), self._put(packed.start, ("batch",)),
            self._put(packed.length, ("batch",)))

  # ---- traced building blocks ------------------------------------------------------------

  def _emit(self, dstate: DecodeState, logits_BxV, seed, sampling) -> DecodeState:
    """Samples one token per unfinished row and records it."""
    base_key = jax.random.key(seed)
    keys_B = jax.vmap(lambda u, c: jax.random.fold_in(jax.random.fold_in(base_key, u), c))(
        dstate["uid"], dstate["count"])
    tokens_B, logprobs_B = sample_tokens(logits_BxV, keys_B, sampling)
    write_B = ~dstate["done"]
    width = dstate["tokens"].shape[1]
    at_BxT = (jnp.arange(width)[None, :] == dstate["count"][:, None]) & write_B[:, None]
    count_B = dstate["count"] + write_B.astype(jnp.int32)
    hit_eos_B = write_B & (tokens_B == dstate["eos_id"])
    return {
        **dstate,
        "tokens": jnp.where(at_BxT, tokens_B[:, None], dstate["tokens"]),
        "logprobs": jnp.where(at_BxT, logprobs_B[:, None], dstate["logprobs"]),
        "count": count_B,
        "done": dstate["done"] | hit_eos_B | (count_B >= dstate["max_new"]),
        "eos": dstate["eos"] | hit_eos_B,
        "last": jnp.where(write_B, tokens_B, dstate["last"]),
    }

  def _prefill(self, model, cache, dstate, packed, seed, sampling):
    """Runs the packed prompts, moves them into their cache rows, samples each first token.

    `packed` is `PackedPrompts`' arrays (tokens_RxW, segment_ids_RxW, row_B, start_B,
    length_B). Row b of `cache` (B x S, S >= W) comes out holding prompt b at slots
    [0, length_b) with positions 0, 1, ... and its index at length_b; the other slots are
    padding (segment 0, never attended) that decoding fills.
    """
    tokens_RxW, segment_ids_RxW, row_B, start_B, length_B = packed
    rows, width = tokens_RxW.shape
    scratch = transformer.init_cache(self.config, rows, width, cache["layers"]["key"].dtype)
    hidden_RxWxD, scratch = model(tokens_RxW, segment_ids_BxL=segment_ids_RxW, cache=scratch,
                                  return_hidden=True)
    columns_BxW = jnp.minimum(start_B[:, None] + jnp.arange(width)[None, :], width - 1)

    @jax.vmap  # Over the stacked layers.
    def unpack(packed_RxKxWxD, cache_BxKxSxD):
      rows_BxKxWxD = jax.vmap(lambda r, c: packed_RxKxWxD[r][:, c])(row_B, columns_BxW)
      return jax.lax.dynamic_update_slice(cache_BxKxSxD, rows_BxKxWxD, (0, 0, 0, 0))

    slots_S = jnp.arange(cache["segment_ids"].shape[1], dtype=jnp.int32)
    held_BxS = slots_S[None, :] < length_B[:, None]
    cache = {
        "layers": jax.tree.map(unpack, scratch["layers"], cache["layers"]),
        "segment_ids": held_BxS.astype(jnp.int32),
        "positions": jnp.where(held_BxS, slots_S[None, :], 0),
        "index": length_B,
    }
    # Only each prompt's last token needs logits (the full R x W x V head was ~10% of a
    # batch-32 run).
    last_BxD = hidden_RxWxD[row_B, start_B + length_B - 1]
    logits_BxV = model.logits(last_BxD[:, None])[:, 0]
    return self._emit(dstate, logits_BxV, seed, sampling), self._constrain_cache(cache)

  def _step(self, model, cache, dstate, seed, sampling):
    logits_Bx1xV, cache = model(dstate["last"][:, None], cache=cache)
    dstate = self._emit(dstate, logits_Bx1xV[:, 0], seed, sampling)
    return self._constrain_cache(cache), self._constrain_state(dstate)

  # ---- static batch ----------------------------------------------------------------------

  def _generate(self, params, cache, packed, uid_B, max_new_B, valid_B, eos_id_B, seed, *,
                sampling):
    model = nnx.merge(self._graphdef, params)
    # The donated cache of an earlier call is reused: prefill rewrites every row's segment
    # ids, positions and index, so its stale keys/values are never attended to.
    dstate = _initial_state(uid_B.shape[0], sampling.max_new_tokens, uid_B, max_new_B,
                            valid_B, eos_id_B)
    dstate, cache = self._prefill(model, cache, dstate, packed, seed, sampling)

    def body(carry):
      cache, dstate = carry
      return self._step(model, cache, dstate, seed, sampling)

    cache, dstate = jax.lax.while_loop(lambda carry: jnp.any(~carry[1]["done"]), body,
                                       (cache, self._constrain_state(dstate)))
    return dstate, cache

  def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
               seed: int = 0, uids: Optional[Sequence[int]] = None,
               max_new_tokens: Optional[Sequence[int]] = None,
               eos_id: Optional[int] = None) -> List[Generation]:
    """Decodes one static batch; returns one Generation per prompt, in order.

    Args:
      prompts: token ids per row (any lengths up to the context; the cache holds a
        power-of-two bucket of the longest).
      sampling: the sampling settings (`max_new_tokens` is the buffer width).
      seed: sampling seed.
      uids: per-row ids that select the sampling keys (default 0..B-1).
      max_new_tokens: per-row limits (<= sampling.max_new_tokens).
      eos_id: stop token for this call (default the decoder's; -1 = none).
    """
    n = len(prompts)
    uids = list(range(n)) if uids is None else list(uids)
    limits = ([sampling.max_new_tokens] * n if max_new_tokens is None
              else [min(int(m), sampling.max_new_tokens) for m in max_new_tokens])
    for prompt, limit in zip(prompts, limits):
      self.check_length(len(prompt), limit)
    dp = self.data_parallelism
    batch = -(-n // dp) * dp
    width = shapes.bucket_length(max(len(p) for p in prompts))
    packed = self._pack(list(prompts) + [[self.pad_id]] * (batch - n), width)
    pad_rows = batch - n
    uid_B = np.asarray(uids + [0] * pad_rows, np.int32)
    max_new_B = np.asarray(limits + [1] * pad_rows, np.int32)
    valid_B = np.arange(batch) < n
    eos_id_B = np.full(batch, self.eos_id if eos_id is None else eos_id, np.int32)
    length = width + sampling.max_new_tokens
    cache = self.new_cache(batch, length)
    dstate, cache = self._generate_jit(
        self.params, cache, packed, self._put(uid_B, ("batch",)),
        self._put(max_new_B, ("batch",)), self._put(valid_B, ("batch",)),
        self._put(eos_id_B, ("batch",)), np.int32(seed), sampling=sampling)
    self.release_cache(cache)
    return _collect(jax.device_get(dstate), range(n))

  # ---- continuous batching ---------------------------------------------------------------

  def _insert(self, params, cache, dstate, packed, uid_G, max_new_G, valid_G, eos_id_G,
              slots_G, seed, *, sampling):
    """Prefills G new requests into a fresh cache and scatters their rows into `slots_G`."""
    model = nnx.merge(self._graphdef, params)
    group = uid_G.shape[0]
    fresh = transformer.init_cache(self.config, group, cache["segment_ids"].shape[1],
                                   cache["layers"]["key"].dtype)
    new_dstate = _initial_state(group, dstate["tokens"].shape[1], uid_G, max_new_G, valid_G,
                                eos_id_G)
    new_dstate, fresh = self._prefill(model, fresh, new_dstate, packed, seed, sampling)

    # Padding rows of the group carry an out-of-range slot and are dropped by the scatter.
    def scatter(big, small, axis=0):
      index = (slice(None),) * axis + (slots_G,)
      return big.at[index].set(small, mode="drop")

    cache = transformer.map_cache_rows(scatter, cache, fresh)
    dstate = jax.tree.map(scatter, dstate, new_dstate)
    return self._constrain_cache(cache), self._constrain_state(dstate)

  def insert(self, cache, dstate: DecodeState, requests: Sequence[Request],
             slots: np.ndarray, seed, sampling: SamplingConfig):
    """Prefills `requests` into the cache rows `slots` (one batched prefill) and starts their
    decoding there: (cache, dstate), both donated."""
    dp = self.data_parallelism
    num_slots = cache["index"].shape[0]
    size = min(num_slots, shapes.bucket_length(len(requests), minimum=1))
    size = -(-size // dp) * dp
    pad = size - len(requests)
    width = shapes.bucket_length(max(len(r.prompt_tokens) for r in requests))
    packed = self._pack([r.prompt_tokens for r in requests] + [[self.pad_id]] * pad, width)
    uid_G = np.asarray([r.uid for r in requests] + [0] * pad, np.int32)
    max_new_G = np.asarray([min(r.max_new_tokens or sampling.max_new_tokens,
                                sampling.max_new_tokens) for r in requests] + [1] * pad,
                           np.int32)
    valid_G = np.arange(size) < len(requests)
    eos_id_G = np.full(size, self.eos_id, np.int32)
    slots_G = np.concatenate([slots, np.full(pad, num_slots)]).astype(np.int32)
    return self.insert_fn(self.params, cache, dstate, packed, self._put(uid_G, ("batch",)),
                            self._put(max_new_G, ("batch",)), self._put(valid_G, ("batch",)),
                            self._put(eos_id_G, ("batch",)), self._put(slots_G, ("batch",)),
                            np.int32(seed), sampling=sampling)

  def _steps(self, params, cache, dstate, seed, max_steps, refill_at, *, sampling):
    """Decode steps until `max_steps`, all rows done, or `refill_at` rows are done."""
    model = nnx.merge(self._graphdef, params)

    def cond(carry):
      i, _, dstate = carry
      done_B = dstate["done"]
      return ((i < max_steps) & jnp.any(~done_B)
              & (jnp.sum(done_B.astype(jnp.int32)) < refill_at))

    def body(carry):
      i, cache, dstate = carry
      cache, dstate = self._step(model, cache, dstate, seed, sampling)
      return i + 1, cache, dstate

    steps, cache, dstate = jax.lax.while_loop(cond, body, (jnp.int32(0), cache, dstate))
    return cache, dstate, steps

  def decode_steps(self, cache, dstate: DecodeState, seed, max_steps: int, refill_at: int,
                   sampling: SamplingConfig):
    """Runs decode steps until `max_steps`, all rows done, or `refill_at` rows are done:
    (cache, dstate, steps run), cache and dstate donated."""
    return self.steps_fn(self.params, cache, dstate, np.int32(seed), np.int32(max_steps),
                         np.int32(refill_at), sampling=sampling)


def _with_shardings(abstract, shardings):
  if shardings is None:
    return abstract
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def _collect(host_state: Dict[str, np.ndarray], rows: Iterable[int]) -> List[Generation]:
  out = []
  for row in rows:
    count = int(host_state["count"][row])
    out.append(Generation(uid=int(host_state["uid"][row]),
                          tokens=np.asarray(host_state["tokens"][row, :count]),
                          logprobs=np.asarray(host_state["logprobs"][row, :count]),
                          stopped_at_eos=bool(host_state["eos"][row])))
  return out


class SlotEngine:
  """Continuous batching: `num_slots` cache rows refilled with new requests as rows finish.

  `run(requests)` yields a Generation per request in completion order. Each round runs up to
  `sync_every` steps on device and returns early once `refill_fraction` of the slots are free
  (while requests are waiting), then the host collects finished rows and prefills waiting
  requests into the free slots in one batched prefill.
  """

  def __init__(self, decoder: Decoder, sampling: SamplingConfig, *, num_slots: int,
               max_prompt_length: int, sync_every: int = 16, refill_fraction: float = 0.25):
    dp = decoder.data_parallelism
    if num_slots < 1 or num_slots % dp:
      raise ValueError(f"num_slots={num_slots} must be a positive multiple of the data "
                       f"parallelism {dp}")
    if sync_every < 1:  # No step between host checks would never finish a row.
      raise ValueError(f"sync_every={sync_every} must be >= 1")
    self.decoder, self.sampling = decoder, sampling
    self.num_slots = num_slots
    self.prompt_width = shapes.bucket_length(max_prompt_length)
    self.length = self.prompt_width + sampling.max_new_tokens
    self.sync_every = sync_every
    self.refill_threshold = max(1, int(num_slots * refill_fraction))
    self.stats = collections.Counter()

  def lower(self) -> Dict[str, jax.stages.Lowered]:
    """The engine's two programs lowered for its mesh, abstract arguments only: 'prefill'
    (`_insert` of a group as large as the slots, prompts of the full width, one per row: the
    largest prefill `run` compiles) and 'decode' (`_steps`, the decode loop of a round)."""
    d, slots = self.decoder, self.num_slots
    rows = lambda dtype, *shape: jax.ShapeDtypeStruct(
        (slots,) + shape, dtype,
        sharding=d.runtime.sharding(("batch", "length")[:1 + len(shape)]))
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=d.runtime.sharding(()))
    cache = d.abstract_cache(slots, self.length)
    dstate = d.abstract_decode_state(slots, self.sampling.max_new_tokens)
    packed = (rows(jnp.int32, self.prompt_width), rows(jnp.int32, self.prompt_width),
              rows(jnp.int32), rows(jnp.int32), rows(jnp.int32))
    prefill = d.insert_fn.lower(d.params, cache, dstate, packed, rows(jnp.int32),
                                rows(jnp.int32), rows(bool), rows(jnp.int32), rows(jnp.int32),
                                scalar, sampling=self.sampling)
    decode = d.steps_fn.lower(d.params, cache, dstate, scalar, scalar, scalar,
                              sampling=self.sampling)
    return {"prefill": prefill, "decode": decode}

  def run(self, requests: Iterable[Request], seed: int = 0) -> Iterator[Generation]:
    d, sampling = self.decoder, self.sampling
    pending = collections.deque(requests)
    for request in pending:
      if len(request.prompt_tokens) > self.prompt_width:
        raise ValueError(f"request {request.uid}: prompt of {len(request.prompt_tokens)} tokens "
                         f"is longer than max_prompt_length={self.prompt_width}")
      d.check_length(len(request.prompt_tokens),
                     request.max_new_tokens or sampling.max_new_tokens)
    cache = d.new_cache(self.num_slots, self.length)
    dstate = d.empty_decode_state(self.num_slots, sampling.max_new_tokens)
    slot_busy = np.zeros(self.num_slots, bool)
    while pending or slot_busy.any():
      free = np.flatnonzero(~slot_busy)
      if pending and len(free):
        group = [pending.popleft() for _ in range(min(len(free), len(pending)))]
        cache, dstate = d.insert(cache, dstate, group, free[:len(group)], seed, sampling)
        self.stats["prefills"] += 1
        slot_busy[free[:len(group)]] = True
      refill_at = (min(self.refill_threshold, len(pending)) if pending
                   else self.num_slots + 1)
      cache, dstate, steps = d.decode_steps(cache, dstate, seed, self.sync_every, refill_at,
                                            sampling)
      self.stats["rounds"] += 1
      done = np.asarray(jax.device_get(dstate["done"]))
      finished = np.flatnonzero(done & slot_busy)
      if len(finished):
        host = jax.device_get({k: dstate[k] for k in ("tokens", "logprobs", "count", "eos",
                                                      "uid")})
        yield from _collect(host, finished)
        slot_busy[finished] = False
    d.release_cache(cache)
