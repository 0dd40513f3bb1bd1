"""Learning-rate schedules (step -> learning rate), gin-configurable.

All schedules take the optimizer step count (0-based, the number of updates already applied) and return
a float32 scalar, so they can be traced inside the jitted train step and logged as `learning_rate`.
"""

from __future__ import annotations

from typing import Callable

import gin
import jax.numpy as jnp

Schedule = Callable[[jnp.ndarray], jnp.ndarray]


@gin.configurable
def rsqrt_with_warmup(base_learning_rate: float = 1.0, warmup_steps: int = 10_000) -> Schedule:
  """T5 / t5x pretraining schedule: lr = base / sqrt(max(step, warmup_steps)).

  Constant at base / sqrt(warmup_steps) during warm-up, then inverse-square-root decay.
  """
  if warmup_steps < 1:
    raise ValueError(f"rsqrt_with_warmup: warmup_steps must be >= 1, got {warmup_steps}.")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    return base_learning_rate / jnp.sqrt(jnp.maximum(step, float(warmup_steps)))

  return schedule


@gin.configurable
def constant(base_learning_rate: float = 1e-3) -> Schedule:
  """lr = base (ST-MoE fine-tuning uses a constant 1e-3)."""

  def schedule(step):
    return jnp.full((), base_learning_rate, jnp.float32) + 0.0 * jnp.asarray(step, jnp.float32)

  return schedule


def _warmup(step, warmup_steps: int):
  """Linear ramp from 0 (exclusive) to 1 over `warmup_steps` steps; 1 without warm-up."""
  if warmup_steps <= 0:
    return jnp.ones((), jnp.float32)
  return jnp.minimum(1.0, (step + 1.0) / float(warmup_steps))


def _decay_progress(step, warmup_steps: int, decay_steps: int):
  """Fraction of the decay phase done at `step` (0 during warm-up, 1 after warm-up + decay_steps)."""
  return jnp.clip((step - warmup_steps) / float(decay_steps), 0.0, 1.0)


@gin.configurable
def linear(base_learning_rate: float = 1e-3, decay_steps: int = 10_000, end_learning_rate: float = 0.0,
           warmup_steps: int = 0) -> Schedule:
  """Optional linear warm-up, then linear decay from base to `end_learning_rate` over `decay_steps`."""
  if decay_steps < 1:
    raise ValueError(f"linear: decay_steps must be >= 1, got {decay_steps}.")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    t = _decay_progress(step, warmup_steps, decay_steps)
    lr = base_learning_rate + (end_learning_rate - base_learning_rate) * t
    return lr * _warmup(step, warmup_steps)

  return schedule


@gin.configurable
def cosine(base_learning_rate: float = 1e-3, decay_steps: int = 10_000, alpha: float = 0.0,
           warmup_steps: int = 0) -> Schedule:
  """Optional linear warm-up, then cosine decay to `alpha * base` over `decay_steps` steps."""
  if decay_steps < 1:
    raise ValueError(f"cosine: decay_steps must be >= 1, got {decay_steps}.")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    t = _decay_progress(step, warmup_steps, decay_steps)
    lr = base_learning_rate * (alpha + (1.0 - alpha) * 0.5 * (1.0 + jnp.cos(jnp.pi * t)))
    return lr * _warmup(step, warmup_steps)

  return schedule
