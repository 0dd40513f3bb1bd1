"""T5's layer norm: RMS normalisation with a learned scale, no mean subtraction and no bias."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class RMSNorm(nn.Module):
  epsilon: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):  # [..., embed]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)  # [..., 1]
    y = x32 * jnp.reciprocal(jnp.sqrt(var + self.epsilon))
    return (y * scale).astype(self.dtype)
