"""One Transformer stack for all three roles: encoder, decoder (with cross-attention) and decoder-only.

The role only changes masks (bidirectional vs causal / prefix-LM), whether cross-attention exists, and which
layers are sparse; everything else is shared, so the encoder and decoder cannot drift apart.
"""

from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from stmoe.config import ModelConfig
from stmoe.layers.attention import (MultiHeadAttention, attention_mask, causal_mask, combine_masks,
                                    segment_mask)
from stmoe.layers.common import as_dtype
from stmoe.layers.embedding import Embed
from stmoe.layers.mlp import MlpBlock
from stmoe.layers.norm import RMSNorm
from stmoe.layers.position import RelativePositionBias

Array = jax.Array
Role = Literal["encoder", "decoder", "decoder_only"]


class TransformerLayer(nn.Module):
  """Pre-norm residual block: self-attention, [cross-attention], MLP or MoE [+ extra dense MLP]."""

  config: ModelConfig
  role: Role
  sparse: bool = False
  deterministic: bool = True  # module fields, not call arguments, so that nn.remat sees them as static
  decode: bool = False

  @nn.compact
  def __call__(self, x: Array, self_mask: Array | None, self_bias: Array | None, token_mask: Array | None,
               encoded: Array | None = None, cross_mask: Array | None = None, cache_index: Array | None = None):
    cfg = self.config
    deterministic, decode = self.deterministic, self.decode
    dtype = as_dtype(cfg.dtype)
    norm = lambda name: RMSNorm(cfg.layer_norm_epsilon, dtype, name=name)
    drop = lambda y: nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(y, deterministic=deterministic)
    attn = lambda name: MultiHeadAttention(cfg.num_heads, cfg.d_kv, cfg.dropout_rate, dtype, name=name)

    # x [batch, length, embed]
    y = norm("pre_self_attention_norm")(x)
    y = attn("self_attention")(y, y, self_mask, self_bias, deterministic=deterministic, decode=decode,
                               cache_index=cache_index)
    x = x + drop(y)
    if self.role == "decoder":
      y = norm("pre_cross_attention_norm")(x)
      y = attn("encoder_decoder_attention")(y, encoded, cross_mask, None, deterministic=deterministic)
      x = x + drop(y)

    aux = None
    y = norm("pre_mlp_norm")(x)
    if self.sparse:
      from stmoe.moe import MoeLayer  # the sparse layer package; imported here to keep dense models light
      y, aux = MoeLayer(config=cfg.moe, dtype=dtype, causal=self.role != "encoder", name="moe")(
          y, token_mask, deterministic=deterministic)
    else:
      y = MlpBlock(cfg.d_ff, cfg.activations, cfg.dropout_rate, dtype, name="mlp")(y, deterministic=deterministic)
    x = x + drop(y)
    if self.sparse and cfg.moe.extra_dense_mlp:
      y = norm("pre_extra_mlp_norm")(x)
      y = MlpBlock(cfg.d_ff, cfg.activations, cfg.dropout_rate, dtype, name="extra_mlp")(
          y, deterministic=deterministic)
      x = x + drop(y)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x, aux


def sparse_layers(config: ModelConfig, role: Role) -> tuple[int, ...]:
  """0-based indices of the sparse layers of the stack playing `role`."""
  if role == "encoder":
    return config.encoder_sparse.sparse_indices(config.num_encoder_layers)
  return config.decoder_sparse.sparse_indices(config.num_decoder_layers)


def num_layers(config: ModelConfig, role: Role) -> int:
  return config.num_encoder_layers if role == "encoder" else config.num_decoder_layers


class TransformerStack(nn.Module):
  """Embeds tokens, runs the layers with one shared relative position bias, applies the final norm.

  Returns (hidden [batch, length, embed], {"layer_i": MoeAux} for the sparse layers).
  """

  config: ModelConfig
  role: Role
  embedder: Embed

  @nn.compact
  def __call__(self, tokens: Array, *, valid: Array, segment_ids: Array | None = None,
               prefix: Array | None = None, encoded: Array | None = None, encoded_valid: Array | None = None,
               encoded_segment_ids: Array | None = None, deterministic: bool, decode: bool = False):
    """tokens/valid/segment_ids/prefix [batch, length]; encoded [batch, enc_length, embed].

    valid: which positions are real tokens (padding is masked out as a key and is not routed).
    prefix: decoder-only prefix-LM, True on the inputs part that attends bidirectionally.
    decode: incremental decoding with a KV cache (causal roles only); the stack keeps the write position
      and which cache slots hold real tokens.
    """
    cfg = self.config
    dtype = as_dtype(cfg.dtype)
    batch, length = tokens.shape
    causal = self.role != "encoder"
    relpos = RelativePositionBias(cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance,
                                  cfg.num_heads, bidirectional=not causal, dtype=dtype, name="relpos_bias")

    cache_index = None
    key_valid, key_prefix = valid, prefix
    if decode:
      if not causal:
        raise ValueError("Only decoder stacks decode incrementally; the encoder runs once over its input.")
      initialized = self.has_variable("cache", "index")
      index_var = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
      valid_var = self.variable("cache", "key_valid", jnp.zeros, (batch, length), jnp.bool_)
      prefix_var = self.variable("cache", "key_prefix", jnp.zeros, (batch, length), jnp.bool_)
      if initialized:
        cache_index = index_var.value
        valid_var.value = jax.lax.dynamic_update_slice(valid_var.value, valid.astype(jnp.bool_), (0, cache_index))
        pre = jnp.zeros_like(valid, jnp.bool_) if prefix is None else prefix.astype(jnp.bool_)
        prefix_var.value = jax.lax.dynamic_update_slice(prefix_var.value, pre, (0, cache_index))
        key_valid, key_prefix = valid_var.value, prefix_var.value
        index_var.value = cache_index + length
      query_positions = (0 if cache_index is None else cache_index) + jnp.arange(length)
      key_positions = jnp.arange(key_valid.shape[1])
    else:
      query_positions = key_positions = jnp.arange(length)

    self_mask = attention_mask(valid, key_valid)  # [batch, 1, q, k]
    if causal:
      visible = causal_mask(query_positions, key_positions)  # [1, 1, q, k]
      if prefix is not None:
        both_prefix = jnp.logical_and(prefix[:, None, :, None], key_prefix[:, None, None, :])
        visible = jnp.logical_or(visible, both_prefix)
      self_mask = combine_masks(self_mask, visible)
    if segment_ids is not None and not decode:
      self_mask = combine_masks(self_mask, segment_mask(segment_ids, segment_ids))
    bias = relpos(query_positions, key_positions)  # [1, heads, q, k]

    cross_mask = None
    if self.role == "decoder":
      cross_mask = attention_mask(valid, encoded_valid)
      if segment_ids is not None and encoded_segment_ids is not None:
        cross_mask = combine_masks(cross_mask, segment_mask(segment_ids, encoded_segment_ids))

    x = self.embedder(tokens)  # [batch, length, embed]
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    args = (self_mask, bias, valid, encoded, cross_mask, cache_index)
    if cfg.scan_layers:
      x, auxes = self._scanned_layers(x, args, deterministic, decode)
    else:
      sparse = set(sparse_layers(cfg, self.role))
      layer_cls = nn.remat(TransformerLayer) if cfg.remat else TransformerLayer
      auxes = {}
      for i in range(num_layers(cfg, self.role)):
        layer = layer_cls(cfg, self.role, i in sparse, deterministic, decode, name=f"layer_{i}")
        x, aux = layer(x, *args)
        if aux is not None:
          auxes[f"layer_{i}"] = aux
    x = RMSNorm(cfg.layer_norm_epsilon, dtype, name="final_norm")(x)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    return x, auxes

  def _scanned_layers(self, x: Array, args: tuple, deterministic: bool, decode: bool):
    """jax.lax.scan over groups of layers that repeat the sparse pattern (one compile of one group).

    Parameters get a leading axis named "layers" ([groups, ...], under `layers/layer_j`); the per-layer
    MoeAux are unstacked back to absolute layer names so metrics look the same as without scan.
    """
    cfg = self.config
    period = scan_period(cfg, self.role)
    sparse = set(sparse_layers(cfg, self.role))
    pattern = tuple(j in sparse for j in range(period))
    group_cls = nn.remat(LayerGroup, prevent_cse=False) if cfg.remat else LayerGroup
    scanned = nn.scan(group_cls, variable_axes={"params": 0, "cache": 0},
                      split_rngs={"params": True, "dropout": True}, in_axes=(nn.broadcast,) * len(args),
                      length=num_layers(cfg, self.role) // period, metadata_params={nn.PARTITION_NAME: "layers"})
    x, stacked = scanned(cfg, self.role, pattern, deterministic, decode, name="layers")(x, *args)
    auxes = {}
    for g in range(num_layers(cfg, self.role) // period):
      for j in range(period):
        if f"layer_{j}" in stacked:
          auxes[f"layer_{g * period + j}"] = jax.tree_util.tree_map(lambda a: a[g], stacked[f"layer_{j}"])
    return x, auxes


class LayerGroup(nn.Module):
  """`len(pattern)` consecutive layers (True = sparse): the unit that scan_layers repeats."""

  config: ModelConfig
  role: Role
  pattern: tuple[bool, ...]
  deterministic: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, x: Array, *args):
    auxes = {}
    for j, sparse in enumerate(self.pattern):
      x, aux = TransformerLayer(self.config, self.role, sparse, self.deterministic, self.decode,
                                name=f"layer_{j}")(x, *args)
      if aux is not None:
        auxes[f"layer_{j}"] = aux
    return x, auxes


def scan_period(config: ModelConfig, role: Role) -> int:
  """Smallest p dividing the layer count such that layer i is sparse iff layer i % p is."""
  n = num_layers(config, role)
  sparse = set(sparse_layers(config, role))
  for p in range(1, n + 1):
    if n % p == 0 and all((i in sparse) == (i % p in sparse) for i in range(n)):
      return p
  return n
