"""Dispatch tokens to expert buffers, run the experts, combine the outputs back (einsum | sort | dropless).

All three take the router's token-major decision (:class:`stmoe.moe.routing.RouterOutput`) and
give identical results when nothing is dropped:

* :func:`dispatch_einsum`: one-hot dispatch/combine tensors ``[groups, tokens, experts, capacity]``
  and einsums (flaxformer/GShard style). Every op is a dense contraction, which is what TPUs and
  the SPMD partitioner like, but it costs O(tokens * experts * capacity * embed) FLOPs per group.
* :func:`dispatch_sort`: integer row indices; gather tokens into the capacity buffers
  ``[experts, groups * capacity, embed]`` and gather the outputs back per (token, choice). Gathers
  whose transposes are scatter-adds of rows: cheap forward and backward on CPU/GPU.
* :func:`dispatch_dropless`: no capacity. Every kept (token, choice) gets a row in an expert-sorted
  array; a grouped matmul runs each expert on its rows: ``jax.lax.ragged_dot`` ("ragged", GPU/TPU)
  or, on CPU where ragged_dot is slow, each expert's segment padded to a multiple of ``block_size``
  rows and a loop over blocks of one expert each ("blocked", MegaBlocks-style; still exact).

Dropped (token, choice) pairs and padding tokens contribute exactly zero.
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from stmoe.moe.routing import RouterOutput

ExpertsFn = Callable[[jax.Array, Callable[[jax.Array, jax.Array], jax.Array]], jax.Array]

BUFFER_AXES = ("expert", "expert_group", "capacity", "embed")


def batched_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [experts, rows, in] @ w [experts, in, out] -> [experts, rows, out]."""
  return jnp.einsum("end,edf->enf", x, w)


def _combine(out_tok: jax.Array, weights: jax.Array) -> jax.Array:
  """sum_k weights[g, t, k] * out_tok[g, t, k, :] -> [g, t, d] (in the activation dtype)."""
  return jnp.einsum("gtk,gtkd->gtd", weights.astype(out_tok.dtype), out_tok)


# ----------------------------------------------------------------------------------------------------
# einsum
# ----------------------------------------------------------------------------------------------------


def dispatch_einsum(x: jax.Array, route: RouterOutput, experts: ExpertsFn, num_experts: int) -> jax.Array:
  """One-hot dispatch and combine tensors [groups, tokens, experts, capacity] with einsums."""
  g, t, d = x.shape
  c = route.capacity
  dt = x.dtype
  expert_oh = jax.nn.one_hot(route.expert_index, num_experts, dtype=dt) * route.kept[..., None].astype(dt)  # [g,t,k,e]
  slot_oh = jax.nn.one_hot(route.position, c, dtype=dt)  # [g, t, k, c]
  dispatch = jnp.einsum("gtke,gtkc->gtec", expert_oh, slot_oh)  # [g, t, e, c]
  combine = jnp.einsum("gtke,gtkc,gtk->gtec", expert_oh, slot_oh, route.combine_weights.astype(dt))  # [g,t,e,c]
  buffers = jnp.einsum("gtec,gtd->egcd", dispatch, x)  # [e, g, c, d]
  buffers = nn.with_logical_constraint(buffers, BUFFER_AXES)
  out = experts(buffers.reshape(num_experts, g * c, d), batched_matmul).reshape(num_experts, g, c, d)
  out = nn.with_logical_constraint(out, BUFFER_AXES)
  return jnp.einsum("gtec,egcd->gtd", combine, out)  # [g, t, d]


# ----------------------------------------------------------------------------------------------------
# sort (integer gather)
# ----------------------------------------------------------------------------------------------------


def _row_tokens(rows: jax.Array, num_rows: int, num_tokens: int) -> jax.Array:
  """Invert the (token, choice) -> row map: [num_rows] token index of each row (num_tokens if empty).

  rows: [groups, tokens, k] row of each (token, choice), num_rows where it has none.
  """
  g, t, k = rows.shape
  token_id = jnp.broadcast_to(jnp.arange(g * t, dtype=jnp.int32).reshape(g, t, 1), rows.shape)  # [g, t, k]
  return jnp.full((num_rows,), num_tokens, jnp.int32).at[rows.reshape(-1)].set(
      token_id.reshape(-1), mode="drop", unique_indices=True)  # [rows]


def _gather_rows(src: jax.Array, index: jax.Array) -> jax.Array:
  """src[index] along axis 0, zeros where index == len(src) (out of range)."""
  return jnp.take(src, index, axis=0, mode="fill", fill_value=0)


def dispatch_sort(x: jax.Array, route: RouterOutput, experts: ExpertsFn, num_experts: int) -> jax.Array:
  """Capacity buffers by integer gather: row e*(G*C) + g*C + slot; outputs gathered back per choice."""
  g, t, d = x.shape
  c = route.capacity
  num_rows = num_experts * g * c
  group = jnp.arange(g, dtype=jnp.int32)[:, None, None]
  rows = jnp.where(route.kept, route.expert_index * (g * c) + group * c + route.position, num_rows)  # [g, t, k]
  row_token = _row_tokens(rows, num_rows, g * t)  # [e*g*c]
  buffers = _gather_rows(x.reshape(g * t, d), row_token).reshape(num_experts, g, c, d)  # [e, g, c, d]
  buffers = nn.with_logical_constraint(buffers, BUFFER_AXES)
  out = experts(buffers.reshape(num_experts, g * c, d), batched_matmul).reshape(num_experts, g, c, d)
  out = nn.with_logical_constraint(out, BUFFER_AXES)
  out_tok = _gather_rows(out.reshape(num_rows, d), rows.reshape(-1)).reshape(*rows.shape, d)  # [g, t, k, d]
  return _combine(out_tok, route.combine_weights)


# ----------------------------------------------------------------------------------------------------
# dropless
# ----------------------------------------------------------------------------------------------------


@jax.custom_vjp
def block_grouped_matmul(x: jax.Array, w: jax.Array, block_expert: jax.Array) -> jax.Array:
  """Rows in blocks of one expert each: out[b] = x[b] @ w[block_expert[b]].

  x: [blocks, block_size, in]; w: [experts, in, out]; block_expert: [blocks] int32. A loop over
  blocks (lax.scan) that never materialises per-block copies of the weights; the custom VJP
  accumulates dw in place per expert instead of summing a full [experts, in, out] per block.
  """
  return _bgmm_fwd_impl(x, w, block_expert)


def _bgmm_fwd_impl(x, w, block_expert):
  def body(_, xs):
    xb, e = xs
    return None, xb @ jax.lax.dynamic_index_in_dim(w, e, keepdims=False)  # [block, out]
  _, out = jax.lax.scan(body, None, (x, block_expert))
  return out  # [blocks, block, out]


def _bgmm_fwd(x, w, block_expert):
  return _bgmm_fwd_impl(x, w, block_expert), (x, w, block_expert)


def _bgmm_bwd(res, dy):
  x, w, block_expert = res

  def body(dw, xs):
    xb, dyb, e = xs
    we = jax.lax.dynamic_index_in_dim(w, e, keepdims=False)  # [in, out]
    dxb = dyb @ we.T  # [block, in]
    upd = jax.lax.dynamic_index_in_dim(dw, e, keepdims=False) + xb.T.astype(dw.dtype) @ dyb.astype(dw.dtype)
    dw = jax.lax.dynamic_update_index_in_dim(dw, upd, e, 0)
    return dw, dxb

  dw0 = jnp.zeros(w.shape, jnp.promote_types(w.dtype, jnp.float32))
  dw, dx = jax.lax.scan(body, dw0, (x, dy, block_expert))
  return dx.astype(x.dtype), dw.astype(w.dtype), None


block_grouped_matmul.defvjp(_bgmm_fwd, _bgmm_bwd)


def default_dropless_impl() -> str:
  """ragged_dot where it is fast (GPU/TPU); block-padded matmuls on CPU (ragged_dot is ~9x slower there)."""
  return "blocked" if jax.default_backend() == "cpu" else "ragged"


def dispatch_dropless(x: jax.Array, route: RouterOutput, experts: ExpertsFn, num_experts: int,
                      impl: str | None = None, block_size: int = 128) -> jax.Array:
  """No capacity: expert-sorted rows and a grouped matmul (see module docstring).

  ``route`` must come from a router run with capacity = group size (no drops), so ``position`` is
  the rank of each kept choice among its expert's choices in its group.
  """
  impl = impl or default_dropless_impl()
  if impl not in ("ragged", "blocked"):
    raise ValueError(f"dropless impl={impl!r} is not 'ragged' or 'blocked'.")
  g, t, d = x.shape
  k = route.expert_index.shape[-1]
  e = num_experts
  counts = jnp.sum(jax.nn.one_hot(route.expert_index, e, dtype=jnp.int32) * route.kept[..., None],
                   axis=(1, 2))  # [g, e]: kept choices per group and expert
  group_offset = jnp.cumsum(counts, axis=0) - counts  # [g, e]: rows of earlier groups within an expert
  per_expert = jnp.sum(counts, axis=0)  # [e]
  if impl == "ragged":
    segment = per_expert
    num_rows = g * t * k
  else:
    segment = (per_expert + block_size - 1) // block_size * block_size  # [e] padded to whole blocks
    num_blocks = -(-(g * t * k + e * (block_size - 1)) // block_size)  # static bound on sum(segment)/block
    num_rows = num_blocks * block_size
  start = jnp.cumsum(segment) - segment  # [e]
  within = jnp.take_along_axis(group_offset, route.expert_index.reshape(g, t * k), axis=1).reshape(g, t, k)
  rows = jnp.where(route.kept, start[route.expert_index] + within + route.position, num_rows)  # [g, t, k]
  row_token = _row_tokens(rows, num_rows, g * t)  # [rows]
  x_rows = _gather_rows(x.reshape(g * t, d), row_token)  # [rows, d]

  if impl == "ragged":
    group_sizes = per_expert.astype(jnp.int32)

    def matmul(a, w):
      return jax.lax.ragged_dot(a, w, group_sizes)  # [rows, out]
  else:
    end = start + segment  # [e]
    block_start = jnp.arange(num_blocks, dtype=jnp.int32) * block_size  # [blocks]
    block_expert = jnp.minimum(jnp.sum(block_start[:, None] >= end[None, :], axis=1), e - 1).astype(jnp.int32)

    def matmul(a, w):
      out = block_grouped_matmul(a.reshape(num_blocks, block_size, a.shape[-1]), w, block_expert)
      return out.reshape(num_rows, w.shape[-1])  # [rows, out]

  out_rows = experts(x_rows, matmul)  # [rows, d]
  out_tok = _gather_rows(out_rows, rows.reshape(-1)).reshape(g, t, k, d)  # [g, t, k, d]
  return _combine(out_tok, route.combine_weights)


DISPATCHERS: dict[str, Callable[..., jax.Array]] = {
    "einsum": dispatch_einsum,
    "sort": dispatch_sort,
    "dropless": dispatch_dropless,
}
