"""Token-level losses: cross-entropy with label smoothing and T5's output-logit z-loss; MoE loss totals."""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

Array = jax.Array


def cross_entropy_with_z_loss(logits: Array, targets: Array, *, label_smoothing: float = 0.0,
                              z_loss: float = 0.0) -> tuple[Array, Array]:
  """Per-token loss and z-loss term, both [batch, length].

  loss = -sum_v q(v) log softmax(logits)_v - H(q)  +  z_loss * logsumexp(logits)^2
  where q is the (smoothed) target distribution; subtracting its entropy H(q) makes a perfect prediction
  score 0 with smoothing too (t5x's convention). The z-loss term is returned separately for reporting.
  """
  vocab = logits.shape[-1]
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)  # [batch, length]
  log_probs = logits - log_z[..., None]  # [batch, length, vocab]
  confidence = 1.0 - label_smoothing
  if label_smoothing > 0:
    low = label_smoothing / (vocab - 1)
    soft = jax.nn.one_hot(targets, vocab) * (confidence - low) + low  # [batch, length, vocab]
    entropy = -(confidence * math.log(confidence) + (vocab - 1) * low * math.log(low + 1e-20))
    ce = -jnp.sum(soft * log_probs, axis=-1) - entropy
  else:
    # A masked sum, not take_along_axis: its gradient is then a select fused into the softmax gradient,
    # not a scatter into a zeroed [batch, length, vocab] array (12 ms/step in the CPU benchmark).
    is_target = jax.lax.broadcasted_iota(jnp.int32, log_probs.shape, log_probs.ndim - 1) == targets[..., None]
    ce = -jnp.sum(jnp.where(is_target, log_probs, 0.0), axis=-1)
  z_term = z_loss * jnp.square(log_z)
  return ce + z_term, z_term


def first_argmax(logits: Array) -> Array:
  """jnp.argmax over the last axis (first index of the maximum) as two plain reductions.

  XLA:CPU lowers argmax to a variadic (value, index) reduction that took 18 ms per step on the
  benchmark's [16, 64, 8000] logits; a max and a masked min of the iota cost a fraction of that.
  """
  top = jnp.max(logits, axis=-1, keepdims=True)
  iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  return jnp.min(jnp.where(logits == top, iota, logits.shape[-1]), axis=-1)


# Scalar MoeAux fields reported as metrics (expert_fractions is per expert; smooth_load_cv only for the routers
# that have a smooth load estimator, where every layer reports it).
MOE_SCALAR_METRICS = ("auxiliary_loss", "router_z_loss", "fraction_tokens_left_behind", "expert_usage",
                      "router_confidence", "importance_cv", "load_cv", "max_mean_load", "router_logsumexp",
                      "router_max_abs_logit", "smooth_load_cv")


def moe_losses_and_metrics(auxes: Mapping[str, Mapping[str, Any]], *, aux_loss_coef: float,
                           router_z_loss_coef: float) -> tuple[Array, dict[str, Array]]:
  """Sum of the weighted router losses (means over MoE layers) and every router metric.

  auxes: {"encoder"|"decoder": {"layer_i": MoeAux}}. Metric names follow t5x: experts/<name> is the mean over
  all MoE layers; experts/<stack>/layer_<i>/<name> per layer, plus per-expert token fractions. The mean over
  layers is used for every metric, also for router_max_abs_logit and max_mean_load (a mean of per-layer maxima;
  the per-layer keys hold each layer's own value).
  """
  layers = [(stack, name, aux) for stack, per_stack in auxes.items() for name, aux in per_stack.items()]
  if not layers:
    raise ValueError("The model has MoE layers but none returned router statistics; the auxiliary and router "
                     "z-losses would silently be 0. This is a bug in the stack wiring.")
  metrics: dict[str, Array] = {}
  for key in MOE_SCALAR_METRICS:
    if any(getattr(aux, key) is None for _, _, aux in layers):
      continue
    values = jnp.stack([getattr(aux, key) for _, _, aux in layers])
    metrics[f"experts/{key}"] = jnp.mean(values)
    for stack, name, aux in layers:
      metrics[f"experts/{stack}/{name}/{key}"] = getattr(aux, key)
  for stack, name, aux in layers:
    for e in range(aux.expert_fractions.shape[-1]):
      metrics[f"experts/{stack}/{name}/expert_fraction/{e}"] = aux.expert_fractions[e]
  total = aux_loss_coef * metrics["experts/auxiliary_loss"] + router_z_loss_coef * metrics["experts/router_z_loss"]
  return total, metrics
