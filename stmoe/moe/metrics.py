"""Per-layer router losses and metrics (MoeAux) from one routing decision.

Capacity metrics (tokens left behind, buffer usage) describe what the dispatch did; the balance
metrics (importance / load CV, max/mean load) describe what the router *asked for*, before capacity
dropped anything, over every real token of the batch at once (all token groups together, like the
batch-level CV of Shazeer et al. 2017 Table 6); the logit-scale metrics track what the router z-loss
regularises (ST-MoE Table 4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from stmoe.moe.routing import RouterOutput

_F32 = jnp.float32


@struct.dataclass
class MoeAux:
  """Per-layer router losses and metrics (scalars float32, over the layer's real tokens).

  auxiliary_loss: load-balancing loss (Switch; averaged over groups); for noisy top-k and hierarchical,
    importance_loss_weight * CV(importance)^2 + load_loss_weight * CV(load)^2; 0 for expert choice
    (balanced by construction).
  router_z_loss: mean over real tokens of logsumexp(router logits)^2.
  fraction_tokens_left_behind: fraction of real tokens that got *no* expert at all (all of their
    choices dropped, so the layer outputs zero for them). A token whose first choice was dropped but
    whose second was kept is served and not counted.
  expert_usage: kept (token, expert) assignments / buffer slots (num_experts * capacity * groups);
    dropless counts group_size slots per expert per group.
  router_confidence: mean over real tokens of the sum of their kept combine weights.
  expert_fractions [experts]: fraction of real tokens with a kept assignment to each expert, counting
    all k choices (sums to at most k).
  importance_cv: CV (population std / mean) over experts of importance_i = sum over the batch's real
    tokens of the gate the router gave expert i, before capacity dropping.
  load_cv: CV over experts of the realised load: load_i = number of (token, choice) assignments the
    router made to expert i, before capacity dropping.
  max_mean_load: max_i load_i / mean_i load_i of the same realised load (1 = perfectly balanced).
  router_logsumexp: mean over real tokens of logsumexp over experts of the raw router logits (what the
    z-loss squares); hierarchical: averaged over each token's primary and secondary gating networks.
  router_max_abs_logit: max over real tokens and experts of |raw router logit| (hierarchical: over all
    its gating networks).
  smooth_load_cv: noisy_top_k and hierarchical only (None otherwise): CV of Shazeer's smooth load
    estimator over the whole batch (sum_x P(x, i); hierarchical: Load_H, eq. 14), the load of the
    paper's training loss; without noise (evaluation) it is the realised count, so it equals load_cv.
  """

  auxiliary_loss: jax.Array  # []
  router_z_loss: jax.Array  # []
  fraction_tokens_left_behind: jax.Array  # []
  expert_usage: jax.Array  # []
  router_confidence: jax.Array  # []
  expert_fractions: jax.Array  # [experts]
  importance_cv: jax.Array  # []
  load_cv: jax.Array  # []
  max_mean_load: jax.Array  # []
  router_logsumexp: jax.Array  # []
  router_max_abs_logit: jax.Array  # []
  smooth_load_cv: jax.Array | None = None  # []


def coefficient_of_variation(v: jax.Array) -> jax.Array:
  """std / mean over the last axis (population std); 0 where the mean is 0."""
  mean = jnp.mean(v, axis=-1)
  std = jnp.sqrt(jnp.mean((v - mean[..., None]) ** 2, axis=-1))
  return jnp.where(mean > 0, std / jnp.where(mean > 0, mean, 1.0), 0.0)


def _per_expert(expert_index: jax.Array, weights: jax.Array, num_experts: int) -> jax.Array:
  """Sum of `weights` [g, t, k] into the experts named by `expert_index` [g, t, k] -> [experts]."""
  onehot = jax.nn.one_hot(expert_index, num_experts, dtype=_F32)  # [g, t, k, e]
  return jnp.sum(onehot * weights[..., None], axis=(0, 1, 2))


def aux_from_route(route: RouterOutput, mask: jax.Array, num_experts: int, slots_per_group: int) -> MoeAux:
  """Layer metrics from the routing decision; `mask` [groups, G] float32 (1 real)."""
  n_real = jnp.maximum(jnp.sum(mask), 1.0)
  kept = route.kept.astype(_F32) * mask[..., None]  # [g, t, k]
  served = jnp.max(kept, axis=-1)  # [g, t]
  groups = route.kept.shape[0]
  routed = route.routed.astype(_F32) * mask[..., None]  # [g, t, k]
  load = _per_expert(route.expert_index, routed, num_experts)  # [e]
  importance = _per_expert(route.expert_index, route.gates * routed, num_experts)  # [e]
  mean_load = jnp.mean(load)
  smooth_cv = None if route.smooth_load is None else coefficient_of_variation(route.smooth_load.astype(_F32))
  return MoeAux(
      auxiliary_loss=route.auxiliary_loss.astype(_F32),
      router_z_loss=route.router_z_loss.astype(_F32),
      fraction_tokens_left_behind=jnp.sum(mask - served) / n_real,
      expert_usage=jnp.sum(kept) / (num_experts * slots_per_group * groups),
      router_confidence=jnp.sum(route.combine_weights * kept) / n_real,
      expert_fractions=_per_expert(route.expert_index, kept, num_experts) / n_real,
      importance_cv=coefficient_of_variation(importance),
      load_cv=coefficient_of_variation(load),
      max_mean_load=jnp.where(mean_load > 0, jnp.max(load) / jnp.where(mean_load > 0, mean_load, 1.0), 0.0),
      router_logsumexp=jnp.sum(route.logit_logsumexp * mask) / n_real,
      router_max_abs_logit=jnp.max(jnp.where(mask > 0, route.logit_max_abs, 0.0)),
      smooth_load_cv=smooth_cv,
  )
