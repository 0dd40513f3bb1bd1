"""Dropless / grouped dispatch under expert parallelism: ragged all-to-alls instead of gathered weights.

:func:`stmoe.moe.dispatch.dispatch_dropless` sorts every kept (token, choice) of the whole batch into one
global expert-sorted row array. Under a mesh with an ``expert`` axis, GSPMD can only partition that global
sort by replicating it: the row array is all-reduced to every device and the expert weights, sharded over
``expert``, are all-gathered (forward and backward) so that every device can multiply every row. Here the
same computation is written per device with ``jax.shard_map``, so the only traffic is the rows themselves:

1. exchange (:func:`_exchange_local`): each device sorts its own token groups' kept choices by expert
   (the rows for the experts held by expert shard ``j`` are then contiguous), tells every peer on the
   ``expert`` axis how many rows of each of its experts it will get (a small ``all_to_all`` of counts),
   learns where its rows land there (a second one, of offsets), and sends the rows with
   ``jax.lax.ragged_all_to_all``. The receiver holds its senders' rows back to back ("packed",
   sender-major) and permutes them into expert-major order for its local experts.
2. experts: the :class:`~stmoe.moe.experts.Experts` module runs unchanged (same parameters, same
   shardings) with a ``matmul`` that is a shard_map over a grouped matmul of the local rows by the local
   experts' weights (``ragged_dot``; the block-padded loop on CPU), d_ff split over ``model`` like the
   dense MLPs (``psum`` over ``model`` after ``wo``). Activation and expert dropout stay ordinary ops.
3. reverse (:func:`_reverse_local`): the inverse permutation, the ragged all-to-all back to the senders
   and the gather of each (token, choice)'s output; the combine is the usual one.

The receive buffer has a static size: by default ``expert shards x local rows`` rows per device, the
worst case in which every peer sends all its rows to one device, so nothing can be dropped.
``MoeConfig.expert_parallel_buffer_factor`` bounds it to ``factor x local rows``; the rows that do not fit
(the tail of the packed buffer: the last senders' last experts) are dropped and output zero, like
capacity drops.

XLA:CPU has no ``ragged-all-to-all``. When the target platform is CPU the exchange sends a dense
``all_to_all`` of per-destination buffers padded to the local row count instead (``expert shards`` times
the bytes), whose receive side reproduces the packed buffer exactly, so everything but the ragged
collective itself (bookkeeping, permutations, grouped matmul, gradients) is tested on simulated CPU devices.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from stmoe.moe.dispatch import (ExpertsFn, _combine, _gather_from_rows, _gather_to_rows, default_dropless_impl,
                                grouped_matmul, permute_rows, segment_rows, sort_by_expert, sorted_num_rows,
                                varying_axes)
from stmoe.moe.routing import RouterOutput
from stmoe.platform import target_platform

EXCHANGES = ("ragged", "dense")


@dataclasses.dataclass(frozen=True)
class ExpertParallelPlan:
  """The mesh axes of an expert-parallel dispatch, read from the mesh and logical-axis rules in context."""

  mesh: jax.sharding.AbstractMesh
  batch_axes: tuple[str, ...]  # mesh axes the token groups are split over (logical "batch")
  expert_axis: str  # the mesh axis the experts are split over (logical "expert"); part of batch_axes
  model_axis: str | None  # the mesh axis d_ff is split over (logical "mlp"), None if none

  def size(self, axis: str | None) -> int:
    return 1 if axis is None else int(dict(self.mesh.shape)[axis])

  @property
  def num_shards(self) -> int:
    """Devices holding distinct token groups: the product of the batch axes."""
    return math.prod(self.size(a) for a in self.batch_axes)

  @property
  def expert_shards(self) -> int:
    return self.size(self.expert_axis)


def _mesh_axes_of(logical: str) -> tuple[str, ...]:
  entry = nn.logical_to_mesh_axes((logical,))[0]
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def expert_axis_size() -> int:
  """Devices the mesh in context splits the experts over (1 without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  shape = dict(mesh.shape)
  return math.prod(int(shape[a]) for a in _mesh_axes_of("expert") if a in shape)


def expert_parallel_plan(num_experts: int, num_groups: int) -> ExpertParallelPlan | None:
  """The plan when the mesh in context splits experts over more than one device, else None.

  None also when the layout does not allow it (then the caller keeps the global dispatch): the experts
  or the token groups do not split evenly, or the expert axis is not one of the batch axes.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  shape = dict(mesh.shape)
  expert_axes = [a for a in _mesh_axes_of("expert") if a in shape]
  batch_axes = tuple(a for a in _mesh_axes_of("batch") if a in shape)
  model_axes = [a for a in _mesh_axes_of("mlp") if a in shape]
  if len(expert_axes) != 1 or int(shape[expert_axes[0]]) == 1 or expert_axes[0] not in batch_axes:
    return None
  plan = ExpertParallelPlan(mesh, batch_axes, expert_axes[0], model_axes[0] if len(model_axes) == 1 else None)
  if plan.model_axis in batch_axes:
    return None
  if num_experts % plan.expert_shards or num_groups % plan.num_shards:
    return None
  return plan


def default_exchange() -> str:
  """ragged_all_to_all where XLA has it (TPU, GPU); a padded dense all_to_all on CPU (no ragged-all-to-all)."""
  return "dense" if target_platform() == "cpu" else "ragged"


def receive_rows(local_rows: int, expert_shards: int, buffer_factor: float | None) -> int:
  """Static rows of a device's receive buffer: the worst case expert_shards x local_rows, or the bound."""
  full = local_rows * expert_shards
  if buffer_factor is None:
    return full
  return max(1, min(full, math.ceil(buffer_factor * local_rows)))


# ----------------------------------------------------------------------------------------------------
# Local helpers (inside shard_map: one device's arrays)
# ----------------------------------------------------------------------------------------------------


def _excl_cumsum(a: jax.Array, axis: int = -1) -> jax.Array:
  return jnp.cumsum(a, axis=axis) - a


def _scatter_inverse(index: jax.Array, n: int) -> jax.Array:
  """[n] inverse of an injective partial map index [m] -> [0, n) (out-of-range entries: no image); m where none."""
  m = index.shape[0]
  return jnp.full((n,), m, jnp.int32).at[index].set(jnp.arange(m, dtype=jnp.int32), mode="drop",
                                                    unique_indices=True)


def _permute(src: jax.Array, index: jax.Array, inverse: jax.Array | None = None) -> jax.Array:
  """out[i] = src[index[i]] (0 out of range) for an injective `index`, with a gather as its transpose."""
  if inverse is None:
    inverse = _scatter_inverse(index, src.shape[0])
  return permute_rows(src, index, inverse[:, None])


def _varying(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  """`x` marked as varying over `axes` (a fresh zeros buffer must match the vma of what is written into it)."""
  missing = tuple(a for a in axes if a not in varying_axes(x))
  return jax.lax.pcast(x, missing, to="varying") if missing else x


# Layout of the per-device int32 bookkeeping `meta` [expert_shards, 6]; row j is about expert shard j:
# as a sender: where my rows for j start (in_off), how many I have (send_full), how many fit there (send);
# as a receiver of j's rows: where they start in my packed buffer (recv_off), how many (recv), and where
# j keeps them (its in_off for me: sender_in_off).
IN_OFF, SEND_FULL, SEND, RECV_OFF, RECV, SENDER_IN_OFF = range(6)


def _exchange_local(x, expert_index, position, kept, *, num_experts: int, plan: ExpertParallelPlan,
                    exchange: str, impl: str, block_size: int, buffer_rows: int):
  """One device's groups -> its local experts' rows in expert-major order (step 1 of the module docstring).

  x [gl, t, d]; expert_index, position, kept [gl, t, k]. Returns (rows_em [Rm, d], counts [El] rows per
  local expert, rows [gl, t, k], row_assign [N], dest [Rr], src [Rm], meta [X, 6]).
  """
  axis = plan.expert_axis
  vary = plan.batch_axes
  gl, t, d = x.shape
  k = expert_index.shape[-1]
  e, xs = num_experts, plan.expert_shards
  el = e // xs
  n = gl * t * k
  rr = buffer_rows
  rm = sorted_num_rows(rr, el, impl, block_size)

  # My kept choices, sorted by expert (as dispatch_dropless does, but over my groups only).
  rows, per_expert = sort_by_expert(expert_index, position, kept, e, n)  # [gl, t, k], [e]
  rows = rows.astype(jnp.int32)
  x_send, row_assign = _gather_to_rows(x, rows, n)  # [n, d], [n]
  by_shard = per_expert.reshape(xs, el)  # [X, El]: my rows for each expert shard's experts
  send_full = jnp.sum(by_shard, axis=1)  # [X]
  in_off = _excl_cumsum(send_full)  # [X]

  # Counts and offsets: row s of `got` is what sender s tells me.
  got = jax.lax.all_to_all(jnp.concatenate([by_shard, in_off[:, None]], axis=1), axis, 0, 0, tiled=True)
  recv_counts, sender_in_off = got[:, :el], got[:, el]  # [X, El], [X]
  recv_full = jnp.sum(recv_counts, axis=1)  # [X]
  ends = jnp.cumsum(recv_full)
  recv_off = jnp.minimum(ends - recv_full, rr)  # packed, sender-major; truncated to the buffer
  recv = jnp.minimum(ends, rr) - recv_off  # [X]
  block_off = _excl_cumsum(recv_counts, axis=1)  # [X, El]: expert's offset within a sender's block
  kept_counts = jnp.clip(recv[:, None] - block_off, 0, recv_counts)  # [X, El] rows that fit
  back = jax.lax.all_to_all(jnp.stack([recv_off, recv], axis=1), axis, 0, 0, tiled=True)  # row j: from j
  out_off, send = back[:, 0], back[:, 1]  # where my rows land on j, and how many fit
  meta = jnp.stack([in_off, send_full, send, recv_off, recv, sender_in_off], axis=1).astype(jnp.int32)

  if exchange == "ragged":
    out = _varying(jnp.zeros((rr, d), x_send.dtype), vary)
    packed = jax.lax.ragged_all_to_all(x_send, out, jnp.where(send > 0, in_off, 0), send,
                                       jnp.where(send > 0, out_off, 0), recv, axis_name=axis)  # [rr, d]
  else:  # one padded block of n rows per destination; block s of the result is sender s's
    slot = jnp.arange(xs * n, dtype=jnp.int32)
    j, i = slot // n, slot % n
    buf = _permute(x_send, jnp.where(i < send[j], in_off[j] + i, n))  # [X * n, d]
    received = jax.lax.all_to_all(buf, axis, 0, 0, tiled=True)  # [X * n, d]
    q = jnp.arange(rr, dtype=jnp.int32)
    s = jnp.minimum(jnp.searchsorted(recv_off + recv, q, side="right"), xs - 1)
    packed = _permute(received, jnp.where(q < jnp.sum(recv), s * n + q - recv_off[s], xs * n))  # [rr, d]

  # Packed (sender, expert) segments -> expert-major (expert, sender) segments.
  local_counts = jnp.sum(kept_counts, axis=0)  # [El]
  exp_start = _excl_cumsum(segment_rows(local_counts, impl, block_size))  # [El]
  sender_off = _excl_cumsum(kept_counts, axis=0)  # [X, El]
  flat_end = jnp.cumsum(kept_counts.reshape(-1))  # [X * El], the packed buffer's segments in order
  q = jnp.arange(rr, dtype=jnp.int32)
  seg = jnp.minimum(jnp.searchsorted(flat_end, q, side="right"), xs * el - 1)
  s, le = seg // el, seg % el
  seg_start = flat_end[seg] - kept_counts.reshape(-1)[seg]
  dest = jnp.where(q < flat_end[-1], exp_start[le] + sender_off[s, le] + q - seg_start, rm).astype(jnp.int32)
  src = _scatter_inverse(dest, rm)  # [rm]
  rows_em = permute_rows(packed, src, dest[:, None])  # [rm, d]
  return rows_em, local_counts.astype(jnp.int32), rows, row_assign, dest, src, meta


def _reverse_local(out_em, rows, row_assign, dest, src, meta, *, plan: ExpertParallelPlan, exchange: str):
  """Expert outputs [Rm, d] -> [gl, t, k, d] per (token, choice) of my groups (step 3), 0 where dropped."""
  axis = plan.expert_axis
  xs = plan.expert_shards
  n = row_assign.shape[0]
  rr = dest.shape[0]
  d = out_em.shape[-1]
  in_off, send_full, send = meta[:, IN_OFF], meta[:, SEND_FULL], meta[:, SEND]
  recv_off, recv, sender_in_off = meta[:, RECV_OFF], meta[:, RECV], meta[:, SENDER_IN_OFF]
  packed = permute_rows(out_em, dest, src[:, None])  # [rr, d]
  if exchange == "ragged":
    out = _varying(jnp.zeros((n, d), packed.dtype), plan.batch_axes)
    y_send = jax.lax.ragged_all_to_all(packed, out, jnp.where(recv > 0, recv_off, 0), recv,
                                       jnp.where(recv > 0, sender_in_off, 0), send, axis_name=axis)  # [n, d]
  else:
    slot = jnp.arange(xs * n, dtype=jnp.int32)
    s, i = slot // n, slot % n
    buf = _permute(packed, jnp.where(i < recv[s], recv_off[s] + i, rr))  # [X * n, d]: block s back to s
    returned = jax.lax.all_to_all(buf, axis, 0, 0, tiled=True)  # block j: from expert shard j
    r = jnp.arange(n, dtype=jnp.int32)
    j = jnp.minimum(jnp.searchsorted(in_off + send_full, r, side="right"), xs - 1)
    ok = (r - in_off[j] < send[j]) & (r < jnp.sum(send_full))
    y_send = _permute(returned, jnp.where(ok, j * n + r - in_off[j], xs * n))  # [n, d]
  return _gather_from_rows(y_send, rows, row_assign)  # [gl, t, k, d]


def _experts_matmul(plan: ExpertParallelPlan, counts: jax.Array, impl: str, block_size: int, d_model: int,
                    d_ff: int, num_inputs: int) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The `matmul(x, w)` the Experts module calls, on rows sharded over the batch axes and weights over experts.

  Input projections (w [E, embed, mlp]) give hidden rows split over `model`; the output projection
  (w [E, mlp, embed]) sums its partial products over `model`. Which is which follows the shapes, and, when
  embed == mlp, the Experts module's call order (its `num_inputs` input projections, then wo).
  """
  rows_spec, b = P(plan.batch_axes), plan.batch_axes
  mx = plan.model_axis if plan.size(plan.model_axis) > 1 else None
  calls = [0]

  def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    index = calls[0] % (num_inputs + 1)
    calls[0] += 1
    if d_model != d_ff:
      is_input = w.shape[1] == d_model
    else:
      is_input = index < num_inputs
    if is_input:
      def local(xl, cl, wl):
        return grouped_matmul(xl, wl, cl, impl, block_size)

      f = jax.shard_map(local, mesh=plan.mesh, in_specs=(P(b, None), rows_spec, P(plan.expert_axis, None, mx)),
                        out_specs=P(b, mx))
    else:
      def local(xl, cl, wl):
        out = grouped_matmul(xl, wl, cl, impl, block_size)
        return jax.lax.psum(out, mx) if mx else out

      f = jax.shard_map(local, mesh=plan.mesh, in_specs=(P(b, mx), rows_spec, P(plan.expert_axis, mx, None)),
                        out_specs=P(b, None))
    return f(x, counts, w)

  return matmul


def dispatch_dropless_expert_parallel(x: jax.Array, route: RouterOutput, experts: ExpertsFn, num_experts: int,
                                      plan: ExpertParallelPlan, *, d_ff: int, num_input_projections: int,
                                      impl: str | None = None, block_size: int = 128, exchange: str | None = None,
                                      buffer_factor: float | None = None) -> jax.Array:
  """dispatch_dropless with the experts split over `plan.expert_axis` (see module docstring).

  x [groups, tokens, d] and the route are split over the batch axes; returns [groups, tokens, d]. Equals
  dispatch_dropless (up to float round-off) unless `buffer_factor` makes the receive buffer too small.
  """
  impl = impl or default_dropless_impl()
  exchange = exchange or default_exchange()
  if impl not in ("ragged", "blocked"):
    raise ValueError(f"dropless impl={impl!r} is not 'ragged' or 'blocked'.")
  if exchange not in EXCHANGES:
    raise ValueError(f"expert-parallel exchange={exchange!r} is not one of {EXCHANGES}.")
  g, t, d = x.shape
  k = route.expert_index.shape[-1]
  xs, s = plan.expert_shards, plan.num_shards
  n = (g // s) * t * k  # (token, choice) rows of one device's groups
  rr = receive_rows(n, xs, buffer_factor)
  b = P(plan.batch_axes)
  exchange_fn = jax.shard_map(
      lambda *a: _exchange_local(*a, num_experts=num_experts, plan=plan, exchange=exchange, impl=impl,
                                 block_size=block_size, buffer_rows=rr),
      mesh=plan.mesh, in_specs=(b, b, b, b), out_specs=(b, b, b, b, b, b, b))
  rows_em, counts, rows, row_assign, dest, src, meta = exchange_fn(x, route.expert_index, route.position,
                                                                   route.kept)
  matmul = _experts_matmul(plan, counts, impl, block_size, d, d_ff, num_input_projections)
  out_em = experts(rows_em, matmul)  # [S * Rm, d]
  reverse_fn = jax.shard_map(lambda *a: _reverse_local(*a, plan=plan, exchange=exchange), mesh=plan.mesh,
                             in_specs=(b, b, b, b, b, b), out_specs=b)
  out_tok = reverse_fn(out_em, rows, row_assign, dest, src, meta)  # [g, t, k, d]
  return _combine(out_tok, route.combine_weights)
