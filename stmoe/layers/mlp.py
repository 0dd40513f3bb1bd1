"""Dense T5 feed-forward block: wi (or gated wi_0 * wi_1) -> activation -> dropout -> wo."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from stmoe.layers.common import activation_fn, dense


class MlpBlock(nn.Module):
  d_ff: int
  activations: tuple[str, ...] = ("gelu", "linear")
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, deterministic: bool):  # x [batch, length, embed]
    d_model = x.shape[-1]
    if len(self.activations) == 1:
      h = activation_fn(self.activations[0])(dense(self.d_ff, ("embed", "mlp"), dtype=self.dtype, name="wi")(x))
    else:  # gated: product of one projection per activation (GEGLU for ("gelu", "linear"))
      h = None
      for i, act in enumerate(self.activations):
        hi = activation_fn(act)(dense(self.d_ff, ("embed", "mlp"), dtype=self.dtype, name=f"wi_{i}")(x))
        h = hi if h is None else h * hi
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))  # [batch, length, mlp]
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    return dense(d_model, ("mlp", "embed"), dtype=self.dtype, name="wo")(h)  # [batch, length, embed]
