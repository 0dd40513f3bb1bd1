"""Routers: which expert buffer slot each token goes to, with which weight, and the router losses.

Four routers, each a small linen module (the MoE layer names it ``router``) over pure routing
functions that the tests drive directly with fixed logits and fixed random draws:

* :func:`tokens_choose_top_k`: every token picks its top-k experts (k=1 Switch, k=2 ST-MoE/GShard);
  per-group expert capacity, all first choices get slots before any second choice; optional batch
  prioritized routing; top-2 renormalisation and second-expert policies.
* :func:`expert_choice`: every expert picks its top-C tokens of the group (encoder only).
* :func:`noisy_top_k`: Shazeer et al. 2017 noisy top-k gating with importance and load losses.
* :func:`hierarchical_noisy_top_k`: its two-level form (Appendix B): a primary noisy top-k gate picks
  expert groups, each picked group's own noisy top-k gate picks experts within it.

All four return a :class:`RouterOutput` in one *token-major* layout, so that every dispatch
implementation (einsum, sort, dropless) works with every router: for each token of each group and
each of its ``k`` choices, the expert, the slot in that expert's buffer, whether it is kept, and the
combine weight. Expert-choice uses ``k = num_experts`` (choice ``e`` is "expert e"); hierarchical
uses ``k = num_selected_groups * num_selected_experts`` over the flat expert index ``i * b + j``.

Router math is float32 whatever the activation dtype (ST-MoE section 3: bfloat16 router logits
are unstable); ``MoeConfig.router_dtype`` states this and accepts only "float32".
"""

from __future__ import annotations

import math
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from stmoe.config import MoeConfig, check_router_allowed

_F32 = jnp.float32


@struct.dataclass
class RouterOutput:
  """What a router decided for one batch of token groups (token-major layout)."""

  expert_index: jax.Array  # [groups, tokens, k] int32: the expert of each choice
  position: jax.Array  # [groups, tokens, k] int32: slot in that expert's buffer (meaningful where kept)
  kept: jax.Array  # [groups, tokens, k] bool: routed (real token, chosen) and within capacity
  combine_weights: jax.Array  # [groups, tokens, k] float32: gate of each choice, exactly 0 where not kept
  router_probs: jax.Array  # [groups, tokens, experts] float32: softmax of the router logits
  # [groups, tokens, experts] float32: raw logits (noisy top-k: clean logits; hierarchical: see there)
  router_logits: jax.Array
  auxiliary_loss: jax.Array  # []: load-balancing loss (noisy top-k, hierarchical: importance + load loss)
  router_z_loss: jax.Array  # []: mean over real tokens of logsumexp(logits)^2
  # What the router decided before capacity dropped anything (for the balance metrics of MoeAux):
  routed: jax.Array  # [groups, tokens, k] bool: a choice the router made for a real token
  gates: jax.Array  # [groups, tokens, k] float32: gate of each choice before dropping, 0 where not routed
  # Scale of the raw router logits per token (the quantities the z-loss squares / bounds): logsumexp over
  # experts and max |logit|; hierarchical: over its primary and every secondary gating network.
  logit_logsumexp: jax.Array  # [groups, tokens] float32
  logit_max_abs: jax.Array  # [groups, tokens] float32
  capacity: int = struct.field(pytree_node=False, default=0)  # slots per expert per group
  # [experts] float32 or None: Shazeer's smooth load estimate over all the batch's real tokens (noisy_top_k:
  # sum_x P(x, i); hierarchical: Load_H of eq. 14 with X = the whole batch); None for the other routers.
  smooth_load: jax.Array | None = None


# ----------------------------------------------------------------------------------------------------
# Losses.
# ----------------------------------------------------------------------------------------------------


def _real_mask(padding_mask: jax.Array | None, shape: tuple[int, int]) -> jax.Array:
  """`padding_mask` as float32 `[groups, tokens]` (1 real, 0 padding); all ones if None."""
  if padding_mask is None:
    return jnp.ones(shape, _F32)
  return padding_mask.astype(_F32)


def logit_scale(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per token: logsumexp over the last axis and max |logit| of float32 logits [g, t, e] -> [g, t] each."""
  logits = logits.astype(_F32)
  return jax.nn.logsumexp(logits, axis=-1), jnp.max(jnp.abs(logits), axis=-1)


def router_z_loss(logits: jax.Array, padding_mask: jax.Array | None = None) -> jax.Array:
  """ST-MoE router z-loss: mean over real tokens of logsumexp(logits)^2."""
  mask = _real_mask(padding_mask, logits.shape[:2])  # [groups, tokens]
  lse = jax.nn.logsumexp(logits.astype(_F32), axis=-1)  # [groups, tokens]
  return jnp.sum(lse**2 * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def load_balancing_loss(router_probs: jax.Array, expert_index: jax.Array,
                        padding_mask: jax.Array | None = None, count: str = "all") -> jax.Array:
  """Switch load-balancing loss E * sum_i f_i * P_i per group, averaged over groups.

  f_i: fraction of the group's real tokens that chose expert i (before capacity): among their top-1
  choice only (``count="top1"``, mesh-tf/fairseq) or among any of their k choices (``count="all"``,
  flaxformer; then sum_i f_i = k and a perfectly balanced router scores k, not 1).
  P_i: mean router probability of expert i over the group's real tokens.
  """
  num_experts = router_probs.shape[-1]
  mask = _real_mask(padding_mask, router_probs.shape[:2])  # [groups, tokens]
  if count == "top1":
    expert_index = expert_index[..., :1]
  chosen = jnp.max(jax.nn.one_hot(expert_index, num_experts, dtype=_F32), axis=-2)  # [groups, tokens, experts]
  n = jnp.maximum(jnp.sum(mask, axis=1), 1.0)[:, None]  # [groups, 1]
  f = jnp.sum(chosen * mask[..., None], axis=1) / n  # [groups, experts]
  p = jnp.sum(router_probs * mask[..., None], axis=1) / n  # [groups, experts]
  return jnp.mean(num_experts * jnp.sum(f * p, axis=-1))


def cv_squared(v: jax.Array) -> jax.Array:
  """Squared coefficient of variation over the last axis: var(v) / mean(v)^2 (population variance).

  Shazeer et al. 2017 eq. 7 and 10; 0 for a single expert.
  """
  if v.shape[-1] <= 1:
    return jnp.zeros(v.shape[:-1], _F32)
  mean = jnp.mean(v, axis=-1)
  var = jnp.mean((v - mean[..., None]) ** 2, axis=-1)
  return var / (mean**2 + 1e-10)


# ----------------------------------------------------------------------------------------------------
# Slot assignment.
# ----------------------------------------------------------------------------------------------------


def _assign_slots(expert_index: jax.Array, routed: jax.Array, num_experts: int, capacity: int,
                  token_order: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Buffer positions by priority (choice rank, then token order); keep those below capacity.

  Args:
    expert_index: [groups, tokens, k] chosen experts.
    routed: [groups, tokens, k] bool, choices that compete for a slot at all.
    token_order: optional [groups, tokens] permutation: the order in which tokens are admitted
      (batch prioritized routing); None means token order.
  Returns:
    position [groups, tokens, k] int32 and kept [groups, tokens, k] bool.
  """
  g, t, k = expert_index.shape
  onehot = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32) * routed[..., None]  # [g, t, k, e]
  if token_order is not None:
    onehot = jnp.take_along_axis(onehot, token_order[:, :, None, None], axis=1)  # [g, t(sorted), k, e]
  # Priority: all first choices (in admission order), then all second choices, ...
  by_rank = jnp.swapaxes(onehot, 1, 2).reshape(g, k * t, num_experts)  # [g, k*t, e]
  pos = jnp.cumsum(by_rank, axis=1) - 1  # [g, k*t, e]
  pos = jnp.sum(pos * by_rank, axis=-1).reshape(g, k, t).swapaxes(1, 2)  # [g, t(sorted), k]
  if token_order is not None:
    inverse = jnp.argsort(token_order, axis=1)  # [g, t]
    pos = jnp.take_along_axis(pos, inverse[:, :, None], axis=1)  # [g, t, k]
  kept = routed & (pos < capacity)
  return pos.astype(jnp.int32), kept


# ----------------------------------------------------------------------------------------------------
# Tokens choose top-k.
# ----------------------------------------------------------------------------------------------------


def tokens_choose_top_k(
    logits: jax.Array,
    padding_mask: jax.Array | None,
    *,
    num_selected: int,
    capacity: int,
    renormalize: str = "none",
    second_expert_policy: str = "all",
    second_expert_threshold: float = 0.2,
    batch_prioritized: bool = False,
    load_balance_count: str = "all",
    uniform: jax.Array | None = None,
) -> RouterOutput:
  """Tokens-choose top-k routing with per-group capacity (Switch k=1, ST-MoE/GShard k=2).

  Steps, per group: probs = softmax(logits); choice 0 = argmax; choices 1..k-1 = next largest
  (``second_expert_policy="sampling"`` instead samples choice 1 from the remaining probabilities
  renormalised, by inverse CDF with ``uniform``); gates = probs of the choices, divided by their
  sum if ``renormalize="before_drop"``; ``"random"`` keeps choice 1 iff
  ``uniform < gate_1 / second_expert_threshold``; padding tokens are never routed; slots by
  priority (every first choice before any second choice; within a rank, token order, or descending
  top-1 probability with ``batch_prioritized``); choices beyond ``capacity`` are dropped;
  ``renormalize="after_drop"`` divides the kept gates by their sum.

  Args:
    logits: [groups, tokens, experts] float32 router logits.
    padding_mask: [groups, tokens] (1 real, 0 padding) or None.
    uniform: [groups, tokens] U(0,1) draws for the "sampling"/"random" policies. None turns the
      policy off (deterministic evaluation behaves like "all").
  """
  logits = logits.astype(_F32)
  g, t, num_experts = logits.shape
  k = num_selected
  if second_expert_policy != "all" and k != 2:
    raise ValueError(f"second_expert_policy={second_expert_policy!r} is defined for top-2 routing only; "
                     f"got num_selected_experts={k}. Use second_expert_policy='all'.")
  probs = jax.nn.softmax(logits, axis=-1)  # [g, t, e]
  real = _real_mask(padding_mask, (g, t)) > 0  # [g, t]

  policy_on = uniform is not None and second_expert_policy != "all"
  if policy_on and second_expert_policy == "sampling":
    first = jnp.argmax(probs, axis=-1)  # [g, t]
    rest = probs * (1.0 - jax.nn.one_hot(first, num_experts, dtype=_F32))  # [g, t, e]
    cdf = jnp.cumsum(rest, axis=-1) / jnp.sum(rest, axis=-1, keepdims=True)  # [g, t, e]
    second = jnp.sum((cdf <= uniform[..., None]).astype(jnp.int32), axis=-1)  # [g, t]
    # Guard round-off at the top of the CDF and never pick the first expert again.
    second = jnp.minimum(second, num_experts - 1)
    second = jnp.where(jnp.take_along_axis(rest, second[..., None], -1)[..., 0] > 0, second,
                       jnp.argmax(rest, axis=-1))
    expert_index = jnp.stack([first, second], axis=-1).astype(jnp.int32)  # [g, t, 2]
    gates = jnp.take_along_axis(probs, expert_index, axis=-1)  # [g, t, 2]
  else:
    gates, expert_index = jax.lax.top_k(probs, k)  # [g, t, k]
    expert_index = expert_index.astype(jnp.int32)

  if renormalize == "before_drop":
    gates = gates / jnp.maximum(jnp.sum(gates, axis=-1, keepdims=True), jnp.finfo(_F32).tiny)

  routed = jnp.broadcast_to(real[..., None], (g, t, k))  # [g, t, k]
  if policy_on and second_expert_policy == "random":
    keep_second = uniform < gates[..., 1] / second_expert_threshold  # [g, t]
    routed = routed.at[..., 1].set(routed[..., 1] & keep_second)

  gates_before_drop = gates * routed  # [g, t, k]
  token_order = None
  if batch_prioritized:
    # Highest top-1 probability first; stable, so ties keep token order. Padding goes last.
    confidence = jnp.where(real, jnp.max(probs, axis=-1), -1.0)  # [g, t]
    token_order = jnp.argsort(-confidence, axis=1, stable=True).astype(jnp.int32)  # [g, t]
  position, kept = _assign_slots(expert_index, routed, num_experts, capacity, token_order)

  gates = gates * kept  # [g, t, k]
  if renormalize == "after_drop":
    denom = jnp.sum(gates, axis=-1, keepdims=True)  # [g, t, 1]
    gates = jnp.where(denom > 0, gates / jnp.where(denom > 0, denom, 1.0), 0.0)

  mask = real.astype(_F32)
  lse, max_abs = logit_scale(logits)  # [g, t] each
  return RouterOutput(
      expert_index=expert_index, position=position, kept=kept, combine_weights=gates,
      router_probs=probs, router_logits=logits,
      auxiliary_loss=load_balancing_loss(probs, expert_index, mask, load_balance_count),
      router_z_loss=router_z_loss(logits, mask), routed=routed, gates=gates_before_drop,
      logit_logsumexp=lse, logit_max_abs=max_abs, capacity=capacity)


# ----------------------------------------------------------------------------------------------------
# Expert choice.
# ----------------------------------------------------------------------------------------------------


def expert_choice(logits: jax.Array, padding_mask: jax.Array | None, *, capacity: int) -> RouterOutput:
  """Expert-choice routing (Zhou et al. 2022): each expert takes its top-`capacity` tokens of the group.

  Scores are the softmax over experts (as in the paper); an expert ranks the group's real tokens by
  their score for it (ties: lower token index first) and takes the best ``capacity``; the token's
  combine weight for that expert is the score. Padding tokens are never taken. In the token-major
  output, choice ``e`` of a token is expert ``e`` (k = num_experts) and ``position`` is the token's
  rank in that expert's buffer. Balanced by construction, so the auxiliary loss is 0; the z-loss
  is reported as for the other routers. It looks at the whole group, so it is encoder-only. The
  experts' selections are the routing decision itself, so ``routed`` is ``kept`` (nothing is chosen
  and then dropped).
  """
  logits = logits.astype(_F32)
  g, t, num_experts = logits.shape
  capacity = min(capacity, t)
  probs = jax.nn.softmax(logits, axis=-1)  # [g, t, e]
  real = _real_mask(padding_mask, (g, t)) > 0  # [g, t]
  scores = jnp.where(real[..., None], probs, -1.0)  # [g, t, e]
  top_scores, top_tokens = jax.lax.top_k(jnp.swapaxes(scores, 1, 2), capacity)  # [g, e, c]
  gi = jnp.arange(g)[:, None, None]
  ei = jnp.arange(num_experts)[None, :, None]
  ci = jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32)[None, None, :], top_tokens.shape)
  taken = top_scores >= 0  # [g, e, c]: a real token
  position = jnp.full((g, t, num_experts), capacity, jnp.int32).at[gi, top_tokens, ei].set(
      jnp.where(taken, ci, capacity))  # [g, t, e]
  kept = position < capacity  # [g, t, e]
  expert_index = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32), (g, t, num_experts))
  mask = real.astype(_F32)
  lse, max_abs = logit_scale(logits)  # [g, t] each
  return RouterOutput(
      expert_index=expert_index, position=jnp.where(kept, position, 0), kept=kept,
      combine_weights=probs * kept, router_probs=probs, router_logits=logits,
      auxiliary_loss=jnp.zeros((), _F32), router_z_loss=router_z_loss(logits, mask),
      routed=kept, gates=probs * kept, logit_logsumexp=lse, logit_max_abs=max_abs, capacity=capacity)


# ----------------------------------------------------------------------------------------------------
# Noisy top-k (Shazeer et al. 2017).
# ----------------------------------------------------------------------------------------------------


@struct.dataclass
class NoisyGates:
  """One noisy top-k gating network's decision for every token (``...`` = any leading axes)."""

  index: jax.Array  # [..., k] int32: the k largest entries of H, largest first
  gates: jax.Array  # [..., k] float32: softmax over those k entries of H
  dense: jax.Array  # [..., n] float32: G(x), the gates scattered over all n options (0 elsewhere)
  selected: jax.Array  # [..., n] float32: 1 for the k selected options, else 0
  load: jax.Array  # [..., n] float32: P(x, i) with noise (eq. 8-9), else `selected`


def noisy_gating(clean_logits: jax.Array, noise_std: jax.Array, k: int,
                 normal: jax.Array | None = None) -> NoisyGates:
  """Noisy top-k gating over the last axis (Shazeer et al. 2017, eq. 3-5 and 8-9), per token.

  H = clean + normal * noise_std (``normal=None``: H = clean); G = softmax over the top k of H.
  With noise, ``load`` is P(x, i) = Phi((clean_i - kth_excluding(H, k, i)) / noise_std_i), the
  probability that option i is still selected when only its own noise is redrawn; without noise
  (or with k = n, where every option is always selected) it is the 0/1 selection itself.

  Args:
    clean_logits: [..., n] x W_g.
    noise_std: [..., n] softplus(x W_noise) * noise scale (unused when ``normal`` is None).
    normal: [..., n] N(0, 1) draws, or None (deterministic).
  """
  clean = clean_logits.astype(_F32)
  n = clean.shape[-1]
  noisy = clean if normal is None else clean + normal.astype(_F32) * noise_std  # [..., n]
  top_vals, index = jax.lax.top_k(noisy, min(k + 1, n))  # [..., k(+1)]
  gates = jax.nn.softmax(top_vals[..., :k], axis=-1)  # [..., k]
  index = index[..., :k].astype(jnp.int32)  # [..., k]
  onehot = jax.nn.one_hot(index, n, dtype=_F32)  # [..., k, n]
  selected = jnp.sum(onehot, axis=-2)  # [..., n]
  dense = jnp.sum(onehot * gates[..., None], axis=-2)  # [..., n]
  if normal is not None and k < n:
    thr_in = top_vals[..., k:k + 1]  # [..., 1]: (k+1)-th largest: threshold for an option inside the top k
    thr_out = top_vals[..., k - 1:k]  # [..., 1]: k-th largest: threshold for an option outside it
    std = jnp.maximum(noise_std, 1e-9)
    load = jnp.where(selected > 0, jax.scipy.stats.norm.cdf((clean - thr_in) / std),
                     jax.scipy.stats.norm.cdf((clean - thr_out) / std))  # [..., n]
  else:
    load = selected
  return NoisyGates(index=index, gates=gates, dense=dense, selected=selected, load=load)


def noisy_top_k(clean_logits: jax.Array, noise_std: jax.Array, padding_mask: jax.Array | None, *,
                num_selected: int, normal: jax.Array | None = None, importance_weight: float = 1.0,
                load_weight: float = 1.0) -> RouterOutput:
  """Noisy top-k gating (Shazeer et al. 2017, eq. 3-5 and 6-10); no capacity, nothing dropped.

  Gates from :func:`noisy_gating`. Losses per group, averaged over groups:
  importance = CV(sum_x G(x))^2; load = CV(sum_x P(x, i))^2 in training and, without noise, CV of
  the number of tokens routed to each expert (Shazeer's evaluation-time load). The auxiliary loss is
  ``importance_weight * importance + load_weight * load``; the model multiplies it by
  ``MoeConfig.aux_loss_coef``, so the paper's (w_importance, w_load) = aux_loss_coef * (importance_weight,
  load_weight).

  Args:
    clean_logits: [groups, tokens, experts] x W_g.
    noise_std: [groups, tokens, experts] softplus(x W_noise) * noise scale.
    normal: [groups, tokens, experts] N(0, 1) draws, or None (deterministic).
    importance_weight, load_weight: relative weights of the two loss terms (MoeConfig.importance_loss_weight,
      load_loss_weight).
  """
  clean = clean_logits.astype(_F32)
  g, t, num_experts = clean.shape
  k = num_selected
  real = _real_mask(padding_mask, (g, t))  # [g, t]
  gating = noisy_gating(clean, noise_std, k, normal)
  routed = jnp.broadcast_to(real[..., None] > 0, (g, t, k))
  position, kept = _assign_slots(gating.index, routed, num_experts, capacity=t)
  importance = jnp.sum(gating.dense * real[..., None], axis=1)  # [g, e]
  load = jnp.sum(gating.load * real[..., None], axis=1)  # [g, e]
  aux = jnp.mean(importance_weight * cv_squared(importance) + load_weight * cv_squared(load))
  lse, max_abs = logit_scale(clean)  # [g, t] each
  return RouterOutput(
      expert_index=gating.index, position=position, kept=kept, combine_weights=gating.gates * kept,
      router_probs=jax.nn.softmax(clean, axis=-1), router_logits=clean, auxiliary_loss=aux,
      router_z_loss=router_z_loss(clean, real), routed=routed, gates=gating.gates * routed,
      logit_logsumexp=lse, logit_max_abs=max_abs, capacity=t, smooth_load=jnp.sum(load, axis=0))


# ----------------------------------------------------------------------------------------------------
# Hierarchical noisy top-k (Shazeer et al. 2017, Appendix B).
# ----------------------------------------------------------------------------------------------------


def hierarchical_balance(primary: NoisyGates, secondary: NoisyGates,
                         padding_mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """Importance_H and Load_H of Shazeer et al. 2017, eq. 13-14, per group of tokens.

  Importance_H[i, j] = sum_x G_primary(x)_i * G_i(x)_j.
  Load_H[i, j] = Load_primary(X)_i * Load_i(X^(i))_j / |X^(i)|, X^(i) = the tokens whose primary gate
  selected expert group i, Load_* = sum over the tokens of P(x, .) (training) or of the 0/1 selection
  (no noise); 0 where |X^(i)| = 0. The primary factor is what gives Load_H a gradient with respect to
  the primary gating network. Padding tokens are not in X.

  Args:
    primary: gates over [groups, tokens, expert_groups].
    secondary: gates over [groups, tokens, expert_groups, experts_per_group] (every group's secondary
      network on every token; only the selected groups' enter the sums).
  Returns:
    importance, load: [groups, expert_groups, experts_per_group] float32.
  """
  g, t = primary.dense.shape[:2]
  real = _real_mask(padding_mask, (g, t))[..., None]  # [g, t, 1]
  importance = jnp.sum((primary.dense * real)[..., None] * secondary.dense, axis=1)  # [g, a, b]
  in_group = primary.selected * real  # [g, t, a]: x in X^(i)
  group_size = jnp.sum(in_group, axis=1)  # [g, a]: |X^(i)|
  primary_load = jnp.sum(primary.load * real, axis=1)  # [g, a]
  secondary_load = jnp.sum(in_group[..., None] * secondary.load, axis=1)  # [g, a, b]
  load = primary_load[..., None] * secondary_load / jnp.maximum(group_size, 1.0)[..., None]  # [g, a, b]
  return importance, load


def hierarchical_noisy_top_k(
    primary_logits: jax.Array,
    primary_noise_std: jax.Array,
    logits: jax.Array,
    noise_std: jax.Array,
    padding_mask: jax.Array | None,
    *,
    num_selected_groups: int,
    num_selected: int,
    capacity: int,
    renormalize: str = "none",
    primary_normal: jax.Array | None = None,
    normal: jax.Array | None = None,
    importance_weight: float = 1.0,
    load_weight: float = 1.0,
) -> RouterOutput:
  """Two-level noisy top-k gating (Shazeer et al. 2017, Appendix B, eq. 12-14).

  A primary noisy top-k gate picks ``num_selected_groups`` of the ``a`` expert groups; the secondary
  noisy top-k gate of each picked group i picks ``num_selected`` of its ``b`` experts. Token x goes
  to expert ``i * b + j`` with weight G_primary(x)_i * G_i(x)_j, so each real token has
  k = num_selected_groups * num_selected choices; their weights sum to 1. Choices are ordered by
  weight, heaviest first (ties: primary rank, then secondary rank), and get buffer slots like
  tokens-choose choices (every token's heaviest choice before any second heaviest, ...); choices
  beyond ``capacity`` are dropped (``capacity`` = tokens per group drops nothing, as in the paper).
  ``renormalize="after_drop"`` divides the kept weights by their sum ("before_drop" changes nothing:
  they already sum to 1).

  Losses per group of tokens, averaged over groups: auxiliary_loss = importance_weight *
  CV(Importance_H)^2 + load_weight * CV(Load_H)^2 over all a * b experts (:func:`hierarchical_balance`;
  computed before capacity);
  router_z_loss = z-loss of the primary logits + mean over expert groups of each secondary's z-loss.
  ``router_logits`` [.., a * b] is primary_i + log_softmax(secondary_i)_j, whose softmax
  (``router_probs``) is the noise-free dense probability softmax(primary)_i * softmax(secondary_i)_j.

  ``router_logits`` is not a gating network's raw logits, so the logit-scale fields are taken over the
  raw primary and secondary logits instead: ``logit_logsumexp`` is the mean of logsumexp over the token's
  1 + a gating networks and ``logit_max_abs`` the max |logit| over all of them.

  Args:
    primary_logits, primary_noise_std: [groups, tokens, expert_groups] x W_primary and
      softplus(x W_primary_noise) * noise scale.
    logits, noise_std: [groups, tokens, expert_groups, experts_per_group] the same for the secondary
      networks (group i's network is [..., i, :]).
    primary_normal, normal: N(0, 1) draws shaped like the logits, or None (deterministic).
    importance_weight, load_weight: relative weights of the two loss terms (MoeConfig.importance_loss_weight,
      load_loss_weight).
  """
  primary_clean = primary_logits.astype(_F32)
  clean = logits.astype(_F32)
  g, t, a, b = clean.shape
  kp, ks = num_selected_groups, num_selected
  real = _real_mask(padding_mask, (g, t))  # [g, t]
  primary = noisy_gating(primary_clean, primary_noise_std, kp, primary_normal)  # over [g, t, a]
  secondary = noisy_gating(clean, noise_std, ks, normal)  # over [g, t, a, b]

  chosen = primary.index[..., None]  # [g, t, kp, 1]
  inner = jnp.take_along_axis(secondary.index, chosen, axis=2)  # [g, t, kp, ks]
  inner_gates = jnp.take_along_axis(secondary.gates, chosen, axis=2)  # [g, t, kp, ks]
  flat_index = (chosen * b + inner).reshape(g, t, kp * ks)  # [g, t, k]
  weights = (primary.gates[..., None] * inner_gates).reshape(g, t, kp * ks)  # [g, t, k]
  weights, order = jax.lax.top_k(weights, kp * ks)  # [g, t, k]: heaviest first
  expert_index = jnp.take_along_axis(flat_index, order, axis=-1).astype(jnp.int32)  # [g, t, k]

  routed = jnp.broadcast_to(real[..., None] > 0, (g, t, kp * ks))  # [g, t, k]
  position, kept = _assign_slots(expert_index, routed, a * b, capacity)
  weights_before_drop = weights
  weights = weights * kept  # [g, t, k]
  if renormalize == "after_drop":
    denom = jnp.sum(weights, axis=-1, keepdims=True)  # [g, t, 1]
    weights = jnp.where(denom > 0, weights / jnp.where(denom > 0, denom, 1.0), 0.0)

  gates_before_drop = weights_before_drop * routed  # [g, t, k]
  importance, load = hierarchical_balance(primary, secondary, real)  # [g, a, b] each
  aux = jnp.mean(importance_weight * cv_squared(importance.reshape(g, a * b))
                 + load_weight * cv_squared(load.reshape(g, a * b)))
  # Load_H over the whole batch (eq. 14 with X = every real token), for the smooth_load_cv metric.
  flat = lambda gates: jax.tree.map(lambda v: v.reshape((1, g * t) + v.shape[2:]), gates)
  _, batch_load = hierarchical_balance(flat(primary), flat(secondary), real.reshape(1, g * t))  # [1, a, b]
  secondary_real = jnp.broadcast_to(real[..., None], (g, t, a)).reshape(g, t * a)  # [g, t*a]
  z_loss = router_z_loss(primary_clean, real) + router_z_loss(clean.reshape(g, t * a, b), secondary_real)
  # Logit scale over the 1 + a gating networks of each token: mean logsumexp and max |logit|.
  primary_lse, primary_max = logit_scale(primary_clean)  # [g, t] each
  secondary_lse, secondary_max = logit_scale(clean)  # [g, t, a] each
  lse = (primary_lse + jnp.sum(secondary_lse, axis=-1)) / (1 + a)  # [g, t]
  max_abs = jnp.maximum(primary_max, jnp.max(secondary_max, axis=-1))  # [g, t]
  flat_logits = (primary_clean[..., None] + jax.nn.log_softmax(clean, axis=-1)).reshape(g, t, a * b)
  return RouterOutput(
      expert_index=expert_index, position=position, kept=kept, combine_weights=weights,
      router_probs=jax.nn.softmax(flat_logits, axis=-1), router_logits=flat_logits, auxiliary_loss=aux,
      router_z_loss=z_loss, routed=routed, gates=gates_before_drop, logit_logsumexp=lse,
      logit_max_abs=max_abs, capacity=capacity, smooth_load=batch_load.reshape(a * b))


# ----------------------------------------------------------------------------------------------------
# Linen modules.
# ----------------------------------------------------------------------------------------------------


def _router_init():
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), ("embed", "unmodeled"))


class Router(nn.Module):
  """The router of one MoE layer: float32 logits x @ w (w [embed, experts]) and the routing decision.

  ``router_type`` "tokens_choose" and "expert_choice" use ``w`` only; "noisy_top_k" adds
  ``w_noise [embed, experts]`` (zeros init, as the paper allows). "hierarchical" reads ``w`` and
  ``w_noise`` as the stacked secondary gating networks (expert group i's network is columns
  ``i*b .. i*b + b - 1``, b = experts per group) and adds the primary network ``w_primary`` and
  ``w_primary_noise [embed, expert_groups]``. Multiplicative jitter U(1-eps, 1+eps) is applied to the
  router input only, in training only. Every random draw comes from the "dropout" rng stream.
  With ``causal=True`` (decoder layers) routers that look at future tokens are rejected
  (:func:`stmoe.config.check_router_allowed`).
  """

  config: MoeConfig
  causal: bool = False

  @nn.compact
  def __call__(self, tokens: jax.Array, padding_mask: jax.Array | None, *, capacity: int,
               deterministic: bool) -> RouterOutput:
    """tokens [groups, group_size, embed] (any dtype), padding_mask [groups, group_size]."""
    cfg = self.config
    check_router_allowed(cfg, causal=self.causal)
    x = tokens.astype(_F32)  # [g, t, d]
    embed, experts = x.shape[-1], cfg.num_experts
    if cfg.jitter_noise > 0 and not deterministic:
      eps = cfg.jitter_noise
      x = x * jax.random.uniform(self.make_rng("dropout"), x.shape, _F32, 1.0 - eps, 1.0 + eps)
    w = self.param("w", _router_init(), (embed, experts), _F32)
    logits = jnp.einsum("gtd,de->gte", x, w, precision=jax.lax.Precision.HIGHEST)  # [g, t, e]

    if cfg.router_type == "tokens_choose":
      uniform = None
      if not deterministic and cfg.second_expert_policy != "all" and cfg.num_selected_experts == 2:
        uniform = jax.random.uniform(self.make_rng("dropout"), logits.shape[:2], _F32)
      return tokens_choose_top_k(
          logits, padding_mask, num_selected=cfg.num_selected_experts, capacity=capacity,
          renormalize=cfg.renormalize, second_expert_policy=cfg.second_expert_policy,
          second_expert_threshold=cfg.second_expert_threshold,
          batch_prioritized=cfg.batch_prioritized_routing, load_balance_count=cfg.load_balance_count,
          uniform=uniform)
    if cfg.router_type == "expert_choice":
      return expert_choice(logits, padding_mask, capacity=capacity)

    def noise_std(name: str, n: int) -> jax.Array:  # [g, t, n] softplus(x W_noise) * noise scale
      w_noise = self.param(
          name, nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "unmodeled")), (embed, n), _F32)
      raw = jnp.einsum("gtd,de->gte", x, w_noise, precision=jax.lax.Precision.HIGHEST)
      return jax.nn.softplus(raw) * cfg.noisy_gating_noise_std

    if cfg.router_type == "noisy_top_k":
      normal = None if deterministic else jax.random.normal(self.make_rng("dropout"), logits.shape, _F32)
      return noisy_top_k(logits, noise_std("w_noise", experts), padding_mask,
                         num_selected=cfg.num_selected_experts, normal=normal,
                         importance_weight=cfg.importance_loss_weight, load_weight=cfg.load_loss_weight)
    if cfg.router_type == "hierarchical":
      g, t = logits.shape[:2]
      a = cfg.num_expert_groups
      b = experts // a
      w_primary = self.param("w_primary", _router_init(), (embed, a), _F32)
      primary = jnp.einsum("gtd,da->gta", x, w_primary, precision=jax.lax.Precision.HIGHEST)  # [g, t, a]
      primary_std = noise_std("w_primary_noise", a)  # [g, t, a]
      std = noise_std("w_noise", experts).reshape(g, t, a, b)  # [g, t, a, b]
      primary_normal = normal = None
      if not deterministic:  # one draw for both levels: [..., :a] primary, [..., a:] secondary
        draw = jax.random.normal(self.make_rng("dropout"), (g, t, a + experts), _F32)  # [g, t, a + a*b]
        primary_normal, normal = draw[..., :a], draw[..., a:].reshape(g, t, a, b)
      return hierarchical_noisy_top_k(
          primary, primary_std, logits.reshape(g, t, a, b), std, padding_mask,
          num_selected_groups=cfg.num_selected_groups, num_selected=cfg.num_selected_experts,
          capacity=capacity, renormalize=cfg.renormalize, primary_normal=primary_normal, normal=normal,
          importance_weight=cfg.importance_loss_weight, load_weight=cfg.load_loss_weight)
    raise ValueError(f"Unknown router_type {cfg.router_type!r}.")


def expert_capacity(config: MoeConfig, group_size: int, *, deterministic: bool) -> int:
  """Slots per expert per group of `group_size` tokens, capped at `group_size`.

  "stmoe": max(min_expert_capacity, round(cf * G / E)), cf = train or eval capacity factor (not
  multiplied by k; flaxformer/ST-MoE). "gshard": max(min_expert_capacity, 2 * ceil(G / E)) (fairseq
  top-2 training convention; the capacity factors are not used). "absolute": ``expert_capacity``.
  """
  e = config.num_experts
  if config.capacity_convention == "stmoe":
    cf = config.eval_capacity_factor if deterministic else config.train_capacity_factor
    cap = max(config.min_expert_capacity, int(round(cf * group_size / e)))
  elif config.capacity_convention == "gshard":
    cap = max(config.min_expert_capacity, 2 * math.ceil(group_size / e))
  else:
    cap = int(config.expert_capacity)
  return max(1, min(cap, group_size))

