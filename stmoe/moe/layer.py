"""MoeLayer: group -> route -> dispatch (einsum | sort | dropless) -> experts -> combine.

The sparse replacement of a Transformer MLP. Tokens ``[batch, length, embed]`` are flattened and
split into routing groups of at most ``MoeConfig.group_size`` tokens that split evenly over the devices
holding the batch (stmoe/moe/grouping.py; capacity is per group); the router
(submodule ``router``) decides slots and weights; the dispatch implementation chosen by
``MoeConfig.dispatch`` moves tokens to the experts (submodule ``experts``) and back. Dropped tokens
and padding tokens output exactly zero (the model's residual connection carries them). With dispatch
"dropless" or "grouped" and a mesh whose ``expert`` axis has more than one device, the rows travel to the
devices holding their experts by (ragged) all-to-alls (stmoe/moe/expert_parallel.py); otherwise, and on
one device, dispatch_dropless sorts all groups' rows globally.
"""

from __future__ import annotations

import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from stmoe.config import MoeConfig
from stmoe.moe import dispatch as dispatch_lib
from stmoe.moe import expert_parallel
from stmoe.moe.experts import Experts
from stmoe.moe.grouping import group_tokens, token_group_shards, ungroup_tokens
from stmoe.moe.metrics import MoeAux, aux_from_route
from stmoe.moe.routing import Router, expert_capacity

_F32 = jnp.float32
_logged_notes: set[str] = set()


def _note_once(msg: str) -> None:
  if msg not in _logged_notes:
    _logged_notes.add(msg)
    logging.info(msg)


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
    tokens, mask, layout = group_tokens(x, padding_mask, cfg.group_size, token_group_shards(b))  # [g, G, d], [g, G]
    _note_once(f"MoeLayer: {b} x {l} = {layout.num_tokens} tokens -> {layout.num_groups} groups of "
               f"{layout.group_size} tokens (group_size bound {cfg.group_size}; groups split over "
               f"{layout.num_shards} devices; {layout.padding} masked padding tokens). Capacity is per group.")
    tokens = nn.with_logical_constraint(tokens.astype(self.dtype), ("batch", None, "embed"))
    group_size = layout.group_size
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
      plan = expert_parallel.expert_parallel_plan(cfg.num_experts, layout.num_groups)
      if plan is not None:  # experts split over devices: rows travel by all-to-all (stmoe/moe/expert_parallel.py)
        _note_once(f"MoeLayer: dispatch={cfg.dispatch} over {plan.expert_shards} expert shards: rows move by "
                   f"{expert_parallel.default_exchange()} all-to-all (receive buffer factor "
                   f"{cfg.expert_parallel_buffer_factor or plan.expert_shards}).")
        y = expert_parallel.dispatch_dropless_expert_parallel(
            tokens, route, run_experts, cfg.num_experts, plan, d_ff=cfg.d_ff,
            num_input_projections=len(cfg.activations), impl=impl, block_size=cfg.dropless_block_size,
            buffer_factor=cfg.expert_parallel_buffer_factor)  # [g, G, d]
      else:
        if expert_parallel.expert_axis_size() > 1:
          _note_once(f"MoeLayer: dispatch={cfg.dispatch}: {layout.num_groups} token groups or {cfg.num_experts} "
                     "experts do not split evenly over the mesh, so the expert-parallel dispatch is off; the "
                     "global row sort all-gathers the expert weights instead.")
        y = dispatch_lib.dispatch_dropless(tokens, route, run_experts, cfg.num_experts, impl=impl,
                                           block_size=cfg.dropless_block_size)  # [g, G, d]
    else:
      y = dispatch_lib.DISPATCHERS[cfg.dispatch](tokens, route, run_experts, cfg.num_experts)  # [g, G, d]
    y = nn.with_logical_constraint(y, ("batch", None, "embed"))
    y = ungroup_tokens(y, layout, (b, l)).astype(self.dtype)
    return y, aux_from_route(route, mask, cfg.num_experts, capacity)
