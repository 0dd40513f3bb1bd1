"""Token embedding shared by encoder, decoder and (when tied) the output logits."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from stmoe.layers.common import default_embed_init
from stmoe.layers.matmul import matmul


class Embed(nn.Module):
  num_embeddings: int
  features: int
  dtype: Any = jnp.float32

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(default_embed_init, ("vocab", "embed")),
        (self.num_embeddings, self.features), jnp.float32)

  def __call__(self, ids):  # ids [batch, length] -> [batch, length, embed]
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, x):  # x [batch, length, embed] -> logits [batch, length, vocab]
    lead, embed = x.shape[:-1], x.shape[-1]
    table = self.embedding.astype(self.dtype)  # [vocab, embed]
    logits = matmul(x.astype(self.dtype).reshape(-1, embed), table, transpose_b=True)  # [tokens, vocab]
    return logits.reshape(*lead, table.shape[0])
