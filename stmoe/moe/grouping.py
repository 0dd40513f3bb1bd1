"""Token groups of the MoE layer: how many, how large, and which tokens go in each.

Capacity and the load-balancing loss are per group, and groups are the unit the token axis is sharded
by: the grouped tokens ``[groups, G, embed]`` are constrained to ``("batch", None, "embed")``, i.e. the
groups are split over the same devices as the batch rows (``data`` x ``expert`` in
stmoe.partitioning's rules). If the number of groups does not split evenly over those devices, or a
group straddles two devices' rows, XLA has to move tokens between devices before routing (all-gathers
of every MoE layer's activations, forward and backward).

So ``MoeConfig.group_size`` is an upper bound (t5x's ``GROUP_SIZE``), and the layout is derived from the
static token count and the mesh in context at trace time:

* ``S`` = the number of devices the token groups are split over: the product of the sizes of the mesh
  axes that the logical axis ``batch`` maps to under the current logical-axis rules (1 without a mesh,
  or when the batch rows do not split evenly over them);
* each device's ``m = tokens / S`` tokens (whole batch rows, contiguous) form ``q = ceil(m / bound)``
  groups of ``G = ceil(m / q)`` tokens: the fewest groups that respect the bound, as equal as possible;
* when ``q * G > m`` (``m`` has no divisor near the bound), each device's last group gets the
  ``q * G - m < q`` missing tokens as masked padding: padding stays on the device, and is less than one
  token per group.

On one device this is the plain split whenever ``group_size`` divides the token count (or exceeds it: one
group of all tokens), as before; other counts now get ``ceil(n / G_bound)`` equal groups instead of full
groups and a padded last one. The layer logs the layout it uses once per shape (capacity is per group,
so the group size actually used matters for reproducing a run).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class GroupLayout:
  """How `num_tokens` tokens are laid into `num_shards * groups_per_shard` groups of `group_size`."""

  num_tokens: int  # batch * length of the layer's input
  num_shards: int  # S: devices the token groups are split over
  groups_per_shard: int  # q
  group_size: int  # G (<= the configured bound unless the bound is below 1 token per group)

  @property
  def num_groups(self) -> int:
    return self.num_shards * self.groups_per_shard

  @property
  def tokens_per_shard(self) -> int:
    return self.num_tokens // self.num_shards

  @property
  def padding(self) -> int:
    """Masked padding tokens in all (each shard's last group holds its shard's)."""
    return self.num_groups * self.group_size - self.num_tokens


def plan_groups(num_tokens: int, max_group_size: int, num_shards: int = 1) -> GroupLayout:
  """The layout of the module docstring: S shards of q groups of G = ceil(m / q), q = ceil(m / bound).

  `num_shards` that does not divide `num_tokens` falls back to 1 (the rows cannot split evenly anyway).
  """
  if num_tokens < 1 or max_group_size < 1 or num_shards < 1:
    raise ValueError(f"plan_groups needs positive sizes, got num_tokens={num_tokens}, "
                     f"max_group_size={max_group_size}, num_shards={num_shards}.")
  if num_tokens % num_shards:
    num_shards = 1
  per_shard = num_tokens // num_shards
  # (A symbolic token count, e.g. a polymorphic export batch, stops here: the comparison is undecidable.)
  groups = 1 if per_shard <= max_group_size else -(-per_shard // max_group_size)  # ceil
  return GroupLayout(num_tokens, num_shards, groups, -(-per_shard // groups))


def token_group_shards(batch_size: int) -> int:
  """Devices that the mesh in context splits the token groups (logical axis ``batch``) over.

  Read at trace time from jax's current mesh (``jax.set_mesh``, which stmoe.partitioning.mesh_context
  sets, and which flax's logical constraints also require) and flax's current logical-axis rules: the
  product of the sizes of the mesh axes ``batch`` maps to. 1 without a mesh or rules, and when
  `batch_size` rows do not split evenly over those devices.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  entry = nn.logical_to_mesh_axes(("batch",))[0]
  axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
  shape = dict(mesh.shape)
  size = math.prod(int(shape[a]) for a in axes if a in shape)
  return size if batch_size % size == 0 else 1


def group_tokens(x: jax.Array, padding_mask: jax.Array | None, max_group_size: int,
                 num_shards: int = 1) -> tuple[jax.Array, jax.Array, GroupLayout]:
  """[batch, length, embed] -> (tokens [groups, G, embed], mask [groups, G] float32 1 = real, layout).

  Each shard's tokens (whole batch rows, since batch % num_shards == 0 whenever num_shards > 1 is kept)
  fill that shard's groups in order; padding only at the end of each shard, masked.
  """
  b, l, d = x.shape
  layout = plan_groups(b * l, max_group_size, num_shards)
  s, m = layout.num_shards, layout.tokens_per_shard
  tokens = x.reshape(s, m, d)  # [shards, tokens per shard, embed]
  mask = jnp.ones((s, m), _F32) if padding_mask is None else padding_mask.reshape(s, m).astype(_F32)
  extra = layout.groups_per_shard * layout.group_size - m
  if extra:
    tokens = jnp.pad(tokens, ((0, 0), (0, extra), (0, 0)))
    mask = jnp.pad(mask, ((0, 0), (0, extra)))
  g, size = layout.num_groups, layout.group_size
  return tokens.reshape(g, size, d), mask.reshape(g, size), layout


def ungroup_tokens(y: jax.Array, layout: GroupLayout, shape: tuple[int, int]) -> jax.Array:
  """[groups, G, embed] -> [batch, length, embed] (`shape` = (batch, length)), dropping the padding."""
  d = y.shape[-1]
  s, m = layout.num_shards, layout.tokens_per_shard
  y = y.reshape(s, layout.groups_per_shard * layout.group_size, d)[:, :m]  # [shards, tokens per shard, embed]
  return y.reshape(*shape, d)
