"""Optimizer and learning-rate schedules for every training stage.

AdamW (decay on matrices only) behind global-norm clipping, wrapped in `optax.MultiSteps` for
gradient accumulation. Schedules count optimizer updates, not microbatches: MultiSteps calls the
inner transformation once per accumulated update.
"""
from __future__ import annotations

from typing import Callable, Tuple

import jax
import optax

from teacherlm_jax.training.train_config import OptimizerConfig

SCHEDULES = ("constant", "cosine", "linear")


def learning_rate_schedule(learning_rate: float, schedule: str = "cosine", warmup_steps: int = 0,
                           num_steps: int = 1, end_fraction: float = 0.1) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then constant, cosine or linear decay.

  The decay ends at `end_fraction * learning_rate` after `num_steps` updates. The paper's
  students use a constant rate; teachers a warmup + cosine.
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule={schedule!r}: expected one of {SCHEDULES}")
  if warmup_steps < 0 or num_steps <= 0:
    raise ValueError(f"warmup_steps={warmup_steps} must be >= 0 and num_steps={num_steps} > 0")
  decay_steps = max(num_steps - warmup_steps, 1)
  if schedule == "constant":
    after = optax.constant_schedule(learning_rate)
  elif schedule == "cosine":
    after = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=end_fraction)
  else:
    after = optax.linear_schedule(learning_rate, learning_rate * end_fraction, decay_steps)
  if warmup_steps == 0:
    return after
  warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  return optax.join_schedules([warmup, after], [warmup_steps])


def _decay_mask(params):
  # Biases, norm scales and other vectors are not decayed (standard AdamW practice).
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config: OptimizerConfig, num_steps: int = 1
                   ) -> Tuple[optax.GradientTransformation, Callable]:
  """(optimizer, schedule): clip -> AdamW, accumulated over `config.grad_accum_steps`
  microbatches, the schedule decaying over `num_steps` updates."""
  lr = learning_rate_schedule(config.learning_rate, config.schedule, config.warmup_steps,
                              num_steps, config.end_fraction)
  parts = []
  if config.clip_norm and config.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.clip_norm))
  parts.append(optax.adamw(lr, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                           weight_decay=config.weight_decay, mask=_decay_mask))
  tx = optax.chain(*parts)
  if config.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum_steps)
  return tx, lr


def state_shardings(tx: optax.GradientTransformation, abstract_params, param_shardings,
                    replicated):
  """Shardings of `tx`'s state: every copy of the parameter tree inside it (Adam moments,
  accumulated gradients) is sharded like the parameters; counters are replicated."""
  params_def = jax.tree.structure(abstract_params)
  abstract_state = jax.eval_shape(tx.init, abstract_params)
  is_params = lambda x: jax.tree.structure(x) == params_def
  return jax.tree.map(lambda x: param_shardings if is_params(x) else replicated, abstract_state,
                      is_leaf=is_params)
