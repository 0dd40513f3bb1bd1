"""Multi-head dot-product attention (T5: no 1/sqrt(d) scaling, folded into init) with a KV cache."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from stmoe.layers.common import dense
from stmoe.layers.matmul import product, product_contract_rows

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


def _sum_over_batch(x: Array) -> Array:
  """[batch, ...] -> [1, ...] summed in float32 as a matrix-vector product.

  XLA:CPU's reduction over the major dim of a 4-D array runs ~50x below memory bandwidth; the shared
  relative-position bias gradient (a [batch, heads, q, k] sum per layer) dominated the step that way.
  """
  flat = x.reshape(x.shape[0], -1)  # [batch, rest]
  ones = jnp.ones((1, x.shape[0]), flat.dtype)
  out = jax.lax.dot_general(ones, flat, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return out.reshape((1,) + x.shape[1:])


def _reduce_to(x: Array, shape: tuple[int, ...]) -> Array:
  """Sum x over the dims that `shape` broadcasts (size 1), e.g. a bias cotangent back to the bias shape."""
  if x.shape[0] > 1 and shape[0] == 1:
    x = _sum_over_batch(x)
  dims = tuple(i for i in range(1, x.ndim) if shape[i] == 1 and x.shape[i] > 1)
  return jnp.sum(x, axis=dims, keepdims=True, dtype=jnp.float32) if dims else x.astype(jnp.float32)


def _probabilities(query, key, bias, mask):
  """softmax(q k^T + bias, masked) in float32, returned in the value dtype. [batch, heads, q, k]"""
  logits = product(query, key, transpose_b=True, out_dtype=jnp.float32)  # [batch, heads, q, k]
  if bias is not None:
    logits = logits + bias
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  logits = logits - jnp.max(logits, axis=-1, keepdims=True)
  e = jnp.exp(logits)
  return e / jnp.sum(e, axis=-1, keepdims=True)


@jax.custom_vjp
def _attention(query, key, value, bias, mask, keep):
  return _attention_fwd(query, key, value, bias, mask, keep)[0]


def _attention_fwd(query, key, value, bias, mask, keep):
  p = _probabilities(query, key, bias, mask).astype(value.dtype)  # [batch, heads, q, k]
  out = product(p if keep is None else p * keep, value)  # [batch, heads, q, kv]
  return out, (query, key, value, bias, mask, keep, p)


def _attention_bwd(res, d_out):
  query, key, value, bias, mask, keep, p = res
  dtype = value.dtype
  d_out = d_out.astype(dtype)  # [batch, heads, q, kv]
  pk = p if keep is None else p * keep
  d_value = product_contract_rows(pk, d_out, dtype)  # (p keep)^T d_out: [batch, heads, k, kv]
  dp = product(d_out, value, transpose_b=True, out_dtype=jnp.float32)  # [batch, heads, q, k]
  if keep is not None:
    dp = dp * keep
  pf = p.astype(jnp.float32)
  ds = pf * (dp - jnp.sum(dp * pf, axis=-1, keepdims=True))  # softmax backward, float32
  ds_c = ds.astype(dtype)
  d_query = product(ds_c, key)  # [batch, heads, q, kv]
  d_key = product_contract_rows(ds_c, query, dtype)  # ds^T q: [batch, heads, k, kv]
  d_bias = None if bias is None else _reduce_to(ds_c, bias.shape).astype(bias.dtype)
  return d_query, d_key, d_value, d_bias, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def dot_product_attention(query: Array, key: Array, value: Array, bias: Array | None, mask: Array | None,
                          dropout: nn.Module | None = None, *, deterministic: bool = True) -> Array:
  """Softmax attention in heads-major layout, products in the inputs' dtype with float32 accumulation.

  query [batch, heads, q, kv], key/value [batch, heads, k, kv], bias [1|batch, heads, q, k] (added in
  float32), mask [batch|1, 1, q, k] (True = may attend) -> [batch, heads, q, kv]. The heads-major layout
  makes (batch, heads) leading batch dims of both products. The softmax runs in float32; the custom VJP
  keeps only the probabilities in the activation dtype for the backward pass (not float32 logits and
  probabilities, as autodiff would), which matters because every pass over [batch, heads, q, k] is
  memory-bound on CPU.
  """
  keep = None
  if dropout is not None and dropout.rate > 0 and not deterministic:
    # The dropout multiplier (0 or 1/(1-rate)) applied to the probabilities, drawn by the flax module.
    keep = dropout(jnp.ones(query.shape[:3] + key.shape[2:3], value.dtype), deterministic=False)
  if bias is not None:
    bias = bias.astype(jnp.float32)
  return _attention(query, key, value, bias, mask, keep)


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
