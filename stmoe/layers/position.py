"""T5 relative position bias: log-spaced buckets of key-minus-query distance, one bias table per stack."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Array = Any


def relative_position_bucket(relative_position: Array, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Array:
  """Maps (key position - query position) to a bucket id in [0, num_buckets).

  Distances below num_buckets/2 (per direction when bidirectional) get their own bucket; larger ones share
  logarithmically wider buckets up to `max_distance`, beyond which everything falls in the last bucket.
  Causal (bidirectional=False) stacks only distinguish keys at or before the query. Computed in float32 like
  the reference implementations so that bucket boundaries agree bit for bit.
  """
  rel = jnp.asarray(relative_position, jnp.int32)
  buckets = jnp.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    buckets = buckets + (rel > 0).astype(jnp.int32) * num_buckets  # keys after the query: upper half
    distance = jnp.abs(rel)
  else:
    distance = jnp.maximum(-rel, 0)  # only keys before the query are distinguished
  max_exact = num_buckets // 2
  is_small = distance < max_exact
  log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact) / math.log(max_distance / max_exact)
  large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
  """Per-head additive attention bias from relative position buckets (shared by all layers of a stack)."""

  num_buckets: int
  max_distance: int
  num_heads: int
  bidirectional: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, query_positions: Array, key_positions: Array) -> Array:
    """query_positions [q], key_positions [k] (absolute) -> bias [1, heads, q, k]."""
    table = self.param(
        "rel_embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("relpos_buckets", "heads")),
        (self.num_buckets, self.num_heads), jnp.float32)
    rel = key_positions[None, :] - query_positions[:, None]  # [q, k]
    bucket = relative_position_bucket(rel, bidirectional=self.bidirectional, num_buckets=self.num_buckets,
                                      max_distance=self.max_distance)  # [q, k]
    bias = jnp.take(table, bucket, axis=0)  # [q, k, heads]
    return jnp.transpose(bias, (2, 0, 1))[None].astype(self.dtype)  # [1, heads, q, k]
