"""Multi-head dot-product attention (T5: no 1/sqrt(d) scaling, folded into init) with a KV cache."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from stmoe.layers.common import dense
from stmoe.layers.matmul import matmul

Array = jax.Array


def combine_masks(*masks: Array | None) -> Array | None:
  """Logical AND of the masks that are not None (broadcast); None if all are None."""
  out = None
  for m in masks:
    if m is None:
      continue
    out = m if out is None else jnp.logical_and(out, m)
  return out


def attention_mask(query_valid: Array, key_valid: Array) -> Array:
  """[batch, q] x [batch, k] -> [batch, 1, q, k] mask of pairs that may attend."""
  return jnp.logical_and(query_valid[:, None, :, None], key_valid[:, None, None, :])


def causal_mask(query_positions: Array, key_positions: Array) -> Array:
  """[q] x [k] absolute positions -> [1, 1, q, k] mask, True where key <= query."""
  return (key_positions[None, :] <= query_positions[:, None])[None, None]


def segment_mask(query_segments: Array, key_segments: Array) -> Array:
  """[batch, q] x [batch, k] -> [batch, 1, q, k], True within the same packed segment."""
  return (query_segments[:, None, :, None] == key_segments[:, None, None, :])


@jax.custom_vjp
def add_shared_bias(logits: Array, bias: Array) -> Array:
  """logits [batch, heads, q, k] + bias [1, heads, q, k] (same dtype), the bias broadcast over the batch.

  Same values as `logits + bias`; the custom gradient sums the bias cotangent over the batch with a
  matrix-vector product, because XLA:CPU's reduction over a major dim of a 4-D array runs ~50x slower
  than memory bandwidth allows (the shared relative-position bias gradient dominated the step).
  """
  return logits + bias


def _add_shared_bias_fwd(logits, bias):
  return logits + bias, None


def _add_shared_bias_bwd(_, g):
  batch = g.shape[0]
  flat = g.reshape(batch, -1)  # [batch, heads * q * k]
  ones = jnp.ones((1, batch), flat.dtype)
  dbias = jax.lax.dot_general(ones, flat, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return g, dbias.reshape((1,) + g.shape[1:]).astype(g.dtype)


add_shared_bias.defvjp(_add_shared_bias_fwd, _add_shared_bias_bwd)


def dot_product_attention(query: Array, key: Array, value: Array, bias: Array | None, mask: Array | None,
                          dropout: nn.Module | None = None, *, deterministic: bool = True) -> Array:
  """Softmax attention in heads-major layout, products in the inputs' dtype with float32 accumulation.

  query [batch, heads, q, kv], key/value [batch, heads, k, kv], bias [1|batch, heads, q, k] (added in
  float32), mask [batch|1, 1, q, k] (True = may attend) -> [batch, heads, q, kv]. The heads-major layout
  makes (batch, heads) leading batch dims of both products, the layout XLA's CPU matmul kernels take
  without copies; the softmax runs in float32.
  """
  logits = matmul(query, key, transpose_b=True, out_dtype=jnp.float32)  # [batch, heads, q, k]
  if bias is not None:
    bias = bias.astype(jnp.float32)
    logits = add_shared_bias(logits, bias) if bias.shape[0] == 1 and logits.shape[0] > 1 else logits + bias
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)  # [batch, heads, q, k]
  if dropout is not None:
    weights = dropout(weights, deterministic=deterministic)
  return matmul(weights, value)  # [batch, heads, q, kv]


class MultiHeadAttention(nn.Module):
  """Attention with d_kv independent of d_model.

  In decode mode (self-attention only) keys and values of the new query tokens are written into a cache of
  `max_length` slots at `cache_index`, and the queries attend over the whole cache; the caller's mask
  ([batch, 1, q, max_length]) says which cache slots are visible. The first decode call (cache not yet
  created) only allocates the cache, sized by the input length.
  """

  num_heads: int
  d_kv: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array, mask: Array | None, bias: Array | None, *,
               deterministic: bool, decode: bool = False, cache_index: Array | None = None) -> Array:
    # inputs_q [batch, q, embed]; inputs_kv [batch, k, embed]; mask [batch|1, 1, q, k]; bias [1, heads, q, k]
    d_model = inputs_q.shape[-1]
    proj = lambda name: dense((self.num_heads, self.d_kv), ("embed", "heads", "kv"), dtype=self.dtype, name=name)
    query = proj("query")(inputs_q)  # [batch, q, heads, kv]
    key = proj("key")(inputs_kv)  # [batch, k, heads, kv]
    value = proj("value")(inputs_kv)  # [batch, k, heads, kv]
    query = nn.with_logical_constraint(query, ("batch", "length", "heads", "kv"))
    key = nn.with_logical_constraint(key, ("batch", "length", "heads", "kv"))
    value = nn.with_logical_constraint(value, ("batch", "length", "heads", "kv"))

    if decode:
      initialized = self.has_variable("cache", "cached_key")
      cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
      cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
      if not initialized:
        # Allocation pass: the input length is the cache length; attend normally, nothing is stored.
        pass
      else:
        start = (0, cache_index, 0, 0)
        cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key.astype(cached_key.value.dtype), start)
        cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value.astype(cached_value.value.dtype),
                                                          start)
        key, value = cached_key.value, cached_value.value  # [batch, max_length, heads, kv]

    heads_major = lambda x: jnp.transpose(x.astype(self.dtype), (0, 2, 1, 3))  # [batch, heads, length, kv]
    out = dot_product_attention(heads_major(query), heads_major(key), heads_major(value), bias, mask,
                                nn.Dropout(self.dropout_rate), deterministic=deterministic)
    out = jnp.transpose(out, (0, 2, 1, 3))  # [batch, q, heads, kv]
    return dense(d_model, ("heads", "kv", "embed"), axis=(-2, -1), dtype=self.dtype, name="out")(out)
