"""Dispatch tokens to expert buffers, run the experts, combine the outputs back.

All paths (einsum | sort | grouped | dropless) take the router's token-major decision (:class:`stmoe.moe.routing.RouterOutput`) and
give identical results when nothing is dropped:

* :func:`dispatch_einsum`: one-hot dispatch/combine tensors ``[groups, tokens, experts, capacity]``
  and einsums (flaxformer/GShard style). Every op is a dense contraction, which is what TPUs and
  the SPMD partitioner like, but it costs O(tokens * experts * capacity * embed) FLOPs per group.
* :func:`dispatch_sort`: integer row indices; gather each group's tokens into its capacity buffers
  ``[groups, experts, capacity, embed]``, transpose to expert-major (the all-to-all under expert
  parallelism) and gather the outputs back per (token, choice). Gathers whose transposes are gathers
  too: cheap forward and backward on CPU/GPU.
* :func:`dispatch_dropless`: no capacity. Every kept (token, choice) gets a row in an expert-sorted
  array; a grouped matmul runs each expert on its rows: ``jax.lax.ragged_dot`` ("ragged", GPU/TPU)
  or, on CPU where ragged_dot is slow, each expert's segment padded to a multiple of ``block_size``
  rows and a loop over blocks of one expert each ("blocked", MegaBlocks-style; still exact).
  With a capacity-limited route (``MoeConfig.dispatch="grouped"``) the same function computes exactly
  what einsum/sort compute, drops included, but only for the kept rows: no FLOPs on empty capacity
  slots (half of sort's expert FLOPs at capacity factor 2). Its row array is global (all groups), which
  suits one device or pure data parallelism; under expert parallelism MoeLayer uses
  :func:`stmoe.moe.expert_parallel.dispatch_dropless_expert_parallel` instead, which sorts each
  device's rows locally and moves them to their experts' devices with ragged all-to-alls.

Dropped (token, choice) pairs and padding tokens contribute exactly zero.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from stmoe.layers.matmul import matmul, product, product_contract_rows
from stmoe.moe.routing import RouterOutput
from stmoe.platform import target_platform

ExpertsFn = Callable[[jax.Array, Callable[[jax.Array, jax.Array], jax.Array]], jax.Array]

BUFFER_AXES = ("expert", "expert_group", "capacity", "embed")


def batched_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [experts, rows, in] @ w [experts, in, out] -> [experts, rows, out] (see stmoe.layers.matmul)."""
  return matmul(x, w)


def _combine(out_tok: jax.Array, weights: jax.Array) -> jax.Array:
  """sum_k weights[g, t, k] * out_tok[g, t, k, :] -> [g, t, d] (in the activation dtype)."""
  # Elementwise multiply + sum, not an einsum: XLA:CPU would lower that to a dot with g*t tiny batches.
  return jnp.sum(weights.astype(out_tok.dtype)[..., None] * out_tok, axis=2)


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


def _gather_to_rows(x: jax.Array, rows: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
  """Move tokens into rows and return (x_rows [num_rows, d], row_assign [num_rows]).

  x: [groups, tokens, d]; rows: [groups, tokens, k] row of each (token, choice), num_rows where it has
  none. row_assign inverts that map: the flat (token, choice) index of each row, g*t*k if empty.
  """
  g, t, k = rows.shape
  n, a = g * t, g * t * k
  flat_rows = rows.reshape(n, k)  # [tokens, k]
  row_assign = jnp.full((num_rows,), a, jnp.int32).at[flat_rows.reshape(-1)].set(
      jnp.arange(a, dtype=jnp.int32), mode="drop", unique_indices=True)  # [rows]
  row_token = jnp.where(row_assign < a, row_assign // k, n)  # [rows]
  x_rows = permute_rows(x.reshape(n, x.shape[-1]), row_token, flat_rows)  # [rows, d]
  return x_rows, row_assign


def _gather_from_rows(out_rows: jax.Array, rows: jax.Array, row_assign: jax.Array) -> jax.Array:
  """[num_rows, d] expert outputs -> [groups, tokens, k, d] per (token, choice), 0 where none."""
  out_tok = permute_rows(out_rows, rows.reshape(-1), row_assign[:, None])  # [g*t*k, d]
  return out_tok.reshape(*rows.shape, out_rows.shape[-1])


def _take(src: jax.Array, index: jax.Array) -> jax.Array:
  """src[index] along axis 0, zeros where index is out of range (the "empty" sentinel len(src))."""
  return jnp.take(src, index, axis=0, mode="fill", fill_value=0)


@jax.custom_vjp
def permute_rows(src: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
  """out[i] = src[index[i]] (0 where index[i] is out of range), with a gather as its transpose.

  Args:
    src: [n, d]; index: [m] rows of src; inverse: [n, j], for each src row the out rows that read it
      (out-of-range where fewer than j do), i.e. the inverse of the partial map `index`.
  The default transpose of a gather is a scatter-add, which XLA runs slowly (serially) on CPU; since
  our maps are injective per (token, choice), the transpose is a gather plus a sum over j.
  """
  return _take(src, index)


def _permute_fwd(src, index, inverse):
  return _take(src, index), (index, inverse)


def _permute_bwd(res, dout):
  index, inverse = res
  dsrc = jnp.sum(_take(dout, inverse.reshape(-1)).reshape(*inverse.shape, dout.shape[-1]), axis=1)  # [n, d]
  return dsrc, None, None


permute_rows.defvjp(_permute_fwd, _permute_bwd)


GROUP_BUFFER_AXES = ("batch", "unmodeled", "capacity", "embed")


def dispatch_sort(x: jax.Array, route: RouterOutput, experts: ExpertsFn, num_experts: int) -> jax.Array:
  """Capacity buffers by integer gather within each group; outputs gathered back per (token, choice).

  Each group fills its own [experts, capacity] rows (row = expert * C + slot), so the gathers stay local
  to a group's shard; the group-major -> expert-major transpose between the two logical constraints is
  where XLA puts the all-to-all under expert parallelism (tokens travel to their experts and back).
  """
  g, t, d = x.shape
  c = route.capacity
  rows_per_group = num_experts * c
  rows = jnp.where(route.kept, route.expert_index * c + route.position, rows_per_group)  # [g, t, k]
  x_rows, row_assign = jax.vmap(lambda xg, rg: _gather_to_rows(xg[None], rg[None], rows_per_group))(x, rows)
  x_rows = nn.with_logical_constraint(x_rows.reshape(g, num_experts, c, d), GROUP_BUFFER_AXES)  # [g, e, c, d]
  buffers = nn.with_logical_constraint(jnp.swapaxes(x_rows, 0, 1), BUFFER_AXES)  # [e, g, c, d]
  out = experts(buffers.reshape(num_experts, g * c, d), batched_matmul).reshape(num_experts, g, c, d)
  out = nn.with_logical_constraint(out, BUFFER_AXES)
  out = nn.with_logical_constraint(jnp.swapaxes(out, 0, 1), GROUP_BUFFER_AXES)  # [g, e, c, d]
  out_tok = jax.vmap(lambda og, rg, ag: _gather_from_rows(og, rg[None], ag))(
      out.reshape(g, rows_per_group, d), rows, row_assign)  # [g, 1, t, k, d]
  return _combine(out_tok[:, 0], route.combine_weights)


# ----------------------------------------------------------------------------------------------------
# dropless
# ----------------------------------------------------------------------------------------------------


@jax.custom_vjp
def block_grouped_matmul(x: jax.Array, w: jax.Array, block_start: jax.Array, block_end: jax.Array) -> jax.Array:
  """Rows in blocks of one expert each: out[b] = x[b] @ w[e] for block_start[e] <= b < block_end[e].

  x: [blocks, block_size, in]; w: [experts, in, out]; block_start, block_end: [experts] int32 block
  ranges (contiguous, ascending; blocks outside every range give 0). A loop over experts, and inside
  it a dynamic-length loop over that expert's blocks: the expert's weights are sliced once per expert
  (not per block), the unused slack blocks of the static bound cost nothing, and the custom VJP
  accumulates each expert's weight gradient in a local [in, out] sum.
  """
  return _bgmm_fwd_impl(x, w, block_start, block_end)


def varying_axes(x: jax.Array) -> frozenset[str]:
  """The manual mesh axes `x` varies over inside jax.shard_map (empty outside)."""
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)
  return frozenset(manual.varying) if manual is not None else frozenset(getattr(aval, "vma", ()))


def _varying_like(z: jax.Array, *refs: jax.Array) -> jax.Array:
  """A fresh loop carry `z` marked varying over the manual mesh axes `refs` vary over (inside shard_map, as in
  stmoe/moe/expert_parallel.py); the identity elsewhere."""
  missing = tuple(sorted(frozenset().union(*map(varying_axes, refs)) - varying_axes(z)))
  return jax.lax.pcast(z, missing, to="varying") if missing else z


def _sum_to_primal_axes(ct: jax.Array, primal: jax.Array) -> jax.Array:
  """A cotangent summed over the manual axes it varies over and its primal does not (a weight replicated over
  `data` inside shard_map gets the sum of the devices' gradients); the identity outside shard_map."""
  extra = tuple(sorted(varying_axes(ct) - varying_axes(primal)))
  return jax.lax.psum(ct, extra) if extra else ct


def _bgmm_fwd_impl(x, w, block_start, block_end):
  out_dtype = jnp.result_type(x, w)

  def per_expert(e, out):
    we = jax.lax.dynamic_index_in_dim(w, e, keepdims=False)  # [in, out]

    def body(carry):
      b, out = carry
      xb = jax.lax.dynamic_index_in_dim(x, b, keepdims=False)  # [block, in]
      return b + 1, jax.lax.dynamic_update_index_in_dim(out, product(xb, we, out_dtype=out_dtype), b, 0)

    _, out = jax.lax.while_loop(lambda c: c[0] < block_end[e], body, (block_start[e], out))
    return out

  out0 = _varying_like(jnp.zeros((x.shape[0], x.shape[1], w.shape[-1]), out_dtype), x, w)  # [blocks, block, out]
  return jax.lax.fori_loop(0, w.shape[0], per_expert, out0)


def _bgmm_fwd(x, w, block_start, block_end):
  return _bgmm_fwd_impl(x, w, block_start, block_end), (x, w, block_start, block_end)


def _bgmm_bwd(res, dy):
  x, w, block_start, block_end = res
  dy = dy.astype(x.dtype)
  acc = jnp.promote_types(w.dtype, jnp.float32)
  dx_dtype = jnp.result_type(dy, w)

  def per_expert(e, carry):
    dx, dw = carry
    we = jax.lax.dynamic_index_in_dim(w, e, keepdims=False)  # [in, out]

    def body(c):
      b, dx, dwe = c
      xb = jax.lax.dynamic_index_in_dim(x, b, keepdims=False)  # [block, in]
      dyb = jax.lax.dynamic_index_in_dim(dy, b, keepdims=False)  # [block, out]
      dx = jax.lax.dynamic_update_index_in_dim(dx, product(dyb, we, transpose_b=True, out_dtype=dx_dtype), b, 0)
      return b + 1, dx, dwe + product_contract_rows(xb, dyb, acc)

    _, dx, dwe = jax.lax.while_loop(lambda c: c[0] < block_end[e], body,
                                    (block_start[e], dx, _varying_like(jnp.zeros(w.shape[1:], acc), x, dy, w)))
    return dx, jax.lax.dynamic_update_index_in_dim(dw, dwe, e, 0)

  dx0 = _varying_like(jnp.zeros(x.shape, dx_dtype), x, dy, w)
  dw0 = _varying_like(jnp.zeros(w.shape, acc), x, dy, w)
  dx, dw = jax.lax.fori_loop(0, w.shape[0], per_expert, (dx0, dw0))
  return (_sum_to_primal_axes(dx.astype(x.dtype), x), _sum_to_primal_axes(dw.astype(w.dtype), w), None, None)


block_grouped_matmul.defvjp(_bgmm_fwd, _bgmm_bwd)


def default_dropless_impl() -> str:
  """ragged_dot where it is fast (GPU/TPU); block-padded matmuls on CPU (ragged_dot is ~9x slower there)."""
  return "blocked" if target_platform() == "cpu" else "ragged"


def segment_rows(per_expert: jax.Array, impl: str, block_size: int) -> jax.Array:
  """Rows each expert's segment takes in an expert-sorted array: its count, or whole blocks for "blocked"."""
  if impl == "ragged":
    return per_expert
  return (per_expert + block_size - 1) // block_size * block_size  # [e] padded to whole blocks


def sorted_num_rows(num_choices: int, num_experts: int, impl: str, block_size: int) -> int:
  """Static rows of an expert-sorted array holding `num_choices` rows (plus block padding for "blocked")."""
  if impl == "ragged":
    return num_choices
  return -(-(num_choices + num_experts * (block_size - 1)) // block_size) * block_size  # bound on sum(segments)


def sort_by_expert(expert_index: jax.Array, position: jax.Array, kept: jax.Array, num_experts: int,
                   num_rows: int, impl: str = "ragged", block_size: int = 128) -> tuple[jax.Array, jax.Array]:
  """(rows [g, t, k], per_expert [e]): each kept choice's row in an expert-sorted array of `num_rows` rows.

  Experts' segments follow one another (each padded to whole blocks for "blocked"); within a segment,
  groups in order and, within a group, the choice's `position`. Dropped choices get `num_rows` (no row).
  """
  g, t, k = expert_index.shape
  counts = jnp.sum(jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32) * kept[..., None],
                   axis=(1, 2))  # [g, e]: kept choices per group and expert
  group_offset = jnp.cumsum(counts, axis=0) - counts  # [g, e]: rows of earlier groups within an expert
  per_expert = jnp.sum(counts, axis=0)  # [e]
  segment = segment_rows(per_expert, impl, block_size)
  start = jnp.cumsum(segment) - segment  # [e]
  within = jnp.take_along_axis(group_offset, expert_index.reshape(g, t * k), axis=1).reshape(g, t, k)
  rows = jnp.where(kept, start[expert_index] + within + position, num_rows)  # [g, t, k]
  return rows, per_expert


def grouped_matmul(a: jax.Array, w: jax.Array, group_sizes: jax.Array, impl: str, block_size: int) -> jax.Array:
  """a [rows, in] expert-sorted (segments as `sort_by_expert` lays them out), w [e, in, out] -> [rows, out]."""
  if impl == "ragged":
    return jax.lax.ragged_dot(a, w, group_sizes.astype(jnp.int32))
  segment = segment_rows(group_sizes, impl, block_size)
  start = jnp.cumsum(segment) - segment  # [e]
  num_blocks = a.shape[0] // block_size
  out = block_grouped_matmul(a.reshape(num_blocks, block_size, a.shape[-1]), w,
                             (start // block_size).astype(jnp.int32),  # first block of each expert
                             ((start + segment) // block_size).astype(jnp.int32))  # its end (exclusive)
  return out.reshape(a.shape[0], w.shape[-1])


def dispatch_dropless(x: jax.Array, route: RouterOutput, experts: ExpertsFn, num_experts: int,
                      impl: str | None = None, block_size: int = 128) -> jax.Array:
  """Expert-sorted rows of the kept choices and a grouped matmul (see module docstring).

  ``position`` must be the rank of each kept choice among its expert's kept choices in its group, which
  the router guarantees with any capacity: capacity = group size gives dropless, a smaller one the
  capacity drops of einsum/sort (dispatch="grouped").
  """
  impl = impl or default_dropless_impl()
  if impl not in ("ragged", "blocked"):
    raise ValueError(f"dropless impl={impl!r} is not 'ragged' or 'blocked'.")
  g, t, d = x.shape
  k = route.expert_index.shape[-1]
  num_rows = sorted_num_rows(g * t * k, num_experts, impl, block_size)
  rows, per_expert = sort_by_expert(route.expert_index, route.position, route.kept, num_experts, num_rows,
                                    impl, block_size)  # [g, t, k], [e]
  x_rows, row_assign = _gather_to_rows(x, rows, num_rows)  # [rows, d], [rows]

  def matmul(a, w):
    return grouped_matmul(a, w, per_expert, impl, block_size)  # [rows, out]

  out_rows = experts(x_rows, matmul)  # [rows, d]
  out_tok = _gather_from_rows(out_rows, rows, row_assign)  # [g, t, k, d]
  return _combine(out_tok, route.combine_weights)


DISPATCHERS: dict[str, Callable[..., jax.Array]] = {  # dropless/grouped: MoeLayer calls dispatch_dropless
    "einsum": dispatch_einsum,
    "sort": dispatch_sort,
    "dropless": dispatch_dropless,
}
