"""MoeLayer: group -> route -> dispatch (einsum | sort | dropless) -> experts -> combine.

The sparse replacement of a Transformer MLP. Tokens ``[batch, length, embed]`` are flattened and
split into routing groups of ``MoeConfig.group_size`` tokens (capacity is per group); the router
(submodule ``router``) decides slots and weights; the dispatch implementation chosen by
``MoeConfig.dispatch`` moves tokens to the experts (submodule ``experts``) and back. Dropped tokens
and padding tokens output exactly zero (the model's residual connection carries them).
"""

from __future__ import annotations

import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from stmoe.config import MoeConfig
from stmoe.moe import dispatch as dispatch_lib
from stmoe.moe.experts import Experts
from stmoe.moe.routing import Router, RouterOutput, expert_capacity

_F32 = jnp.float32
_logged_notes: set[str] = set()


def _note_once(msg: str) -> None:
  if msg not in _logged_notes:
    _logged_notes.add(msg)
    logging.info(msg)


@struct.dataclass
class MoeAux:
  """Per-layer router losses and metrics (scalars float32, averaged over the layer's real tokens).

  auxiliary_loss: load-balancing loss (Switch; averaged over groups); for noisy top-k, importance +
    load loss; 0 for expert choice (balanced by construction).
  router_z_loss: mean over real tokens of logsumexp(router logits)^2.
  fraction_tokens_left_behind: fraction of real tokens that got *no* expert at all (all of their
    choices dropped, so the layer outputs zero for them). A token whose first choice was dropped but
    whose second was kept is served and not counted.
  expert_usage: kept (token, expert) assignments / buffer slots (num_experts * capacity * groups);
    dropless counts group_size slots per expert per group.
  router_confidence: mean over real tokens of the sum of their kept combine weights.
  expert_fractions [experts]: fraction of real tokens with a kept assignment to each expert, counting
    all k choices (sums to at most k).
  """

  auxiliary_loss: jax.Array  # []
  router_z_loss: jax.Array  # []
  fraction_tokens_left_behind: jax.Array  # []
  expert_usage: jax.Array  # []
  router_confidence: jax.Array  # []
  expert_fractions: jax.Array  # [experts]


def group_tokens(x: jax.Array, padding_mask: jax.Array | None, group_size: int) -> tuple[jax.Array, jax.Array, int]:
  """[batch, length, embed] -> ([groups, G, embed], mask [groups, G], num_tokens).

  G = group_size, or all tokens if there are fewer (one-token decoding). If the token count is not a
  multiple of G, masked padding tokens fill the last group (logged once).
  """
  b, l, d = x.shape
  n = b * l
  tokens = x.reshape(n, d)  # [tokens, embed]
  mask = jnp.ones((n,), _F32) if padding_mask is None else padding_mask.reshape(n).astype(_F32)
  size = min(group_size, n)
  extra = (-n) % size
  if extra:
    _note_once(f"MoeLayer: {n} tokens is not a multiple of group_size={size}; padding the last group with "
               f"{extra} masked tokens (choose batch*length divisible by group_size to avoid this).")
    tokens = jnp.pad(tokens, ((0, extra), (0, 0)))
    mask = jnp.pad(mask, (0, extra))
  groups = (n + extra) // size
  return tokens.reshape(groups, size, d), mask.reshape(groups, size), n


def aux_from_route(route: RouterOutput, mask: jax.Array, num_experts: int, slots_per_group: int) -> MoeAux:
  """Layer metrics from the routing decision; `mask` [groups, G] float32 (1 real)."""
  n_real = jnp.maximum(jnp.sum(mask), 1.0)
  kept = route.kept.astype(_F32) * mask[..., None]  # [g, t, k]
  served = jnp.max(kept, axis=-1)  # [g, t]
  per_expert = jnp.sum(jax.nn.one_hot(route.expert_index, num_experts, dtype=_F32) * kept[..., None],
                       axis=(0, 1, 2))  # [e]
  groups = route.kept.shape[0]
  return MoeAux(
      auxiliary_loss=route.auxiliary_loss.astype(_F32),
      router_z_loss=route.router_z_loss.astype(_F32),
      fraction_tokens_left_behind=jnp.sum(mask - served) / n_real,
      expert_usage=jnp.sum(kept) / (num_experts * slots_per_group * groups),
      router_confidence=jnp.sum(route.combine_weights * kept) / n_real,
      expert_fractions=per_expert / n_real,
  )


class MoeLayer(nn.Module):
  """Sparse MLP: route each token to experts and sum their outputs weighted by the router.

  Attributes:
    config: routing / capacity / dispatch / expert settings.
    dtype: activation dtype (params are float32; router math always float32).
    causal: True in decoders; the router then rejects routing that looks at future tokens (expert choice,
      batch-prioritized routing; see stmoe.config.check_router_allowed).
  """

  config: MoeConfig
  dtype: Any = jnp.float32
  causal: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, padding_mask: jax.Array | None = None, *,
               deterministic: bool) -> tuple[jax.Array, MoeAux]:
    """x [batch, length, embed], padding_mask [batch, length] (1 real / 0 pad) -> (y like x, MoeAux)."""
    cfg = self.config
    if cfg.dispatch in ("dropless", "grouped") and cfg.router_type == "expert_choice":
      raise ValueError("Expert-choice routing has a fixed per-expert capacity by construction; use "
                       f"dispatch='sort' or 'einsum' with it, not {cfg.dispatch!r}.")
    b, l, d = x.shape
    tokens, mask, n = group_tokens(x, padding_mask, cfg.group_size)  # [g, G, d], [g, G]
    tokens = nn.with_logical_constraint(tokens.astype(self.dtype), ("batch", None, "embed"))
    group_size = tokens.shape[1]
    if cfg.dispatch == "dropless" or cfg.router_type == "noisy_top_k":
      capacity = group_size  # nothing can drop: each expert appears at most once per token
    else:
      capacity = expert_capacity(cfg, group_size, deterministic=deterministic)

    route = Router(cfg, causal=self.causal, name="router")(
        tokens, mask, capacity=capacity, deterministic=deterministic)
    experts = Experts(num_experts=cfg.num_experts, d_ff=cfg.d_ff, activations=cfg.activations,
                      dropout_rate=cfg.expert_dropout, dtype=self.dtype, name="experts")

    def run_experts(inputs, matmul):
      return experts(inputs, matmul, deterministic=deterministic)

    if cfg.dispatch in ("dropless", "grouped"):  # grouped: the capacity-limited route, kept rows only
      impl = None if cfg.dropless_impl == "auto" else cfg.dropless_impl
      y = dispatch_lib.dispatch_dropless(tokens, route, run_experts, cfg.num_experts, impl=impl,
                                         block_size=cfg.dropless_block_size)  # [g, G, d]
    else:
      y = dispatch_lib.DISPATCHERS[cfg.dispatch](tokens, route, run_experts, cfg.num_experts)  # [g, G, d]
    y = nn.with_logical_constraint(y, ("batch", None, "embed"))
    y = y.reshape(-1, d)[:n].reshape(b, l, d).astype(self.dtype)
    return y, aux_from_route(route, mask, cfg.num_experts, capacity)
