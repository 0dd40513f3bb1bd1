"""Small shared pieces of the Transformer layers: dtypes, initialisers, dense projections.

The activation table lives in stmoe/layers/activations.py; `activation_fn` is re-exported here.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from stmoe.layers.activations import activation_fn
from stmoe.layers.matmul import linear

Array = jax.Array
Initializer = Callable[..., Array]

__all__ = ["Array", "Initializer", "Projection", "activation_fn", "as_dtype", "default_embed_init",
           "default_kernel_init", "dense"]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(name_or_dtype: Any) -> jnp.dtype:
  """'bfloat16' -> jnp.bfloat16; dtypes pass through."""
  if isinstance(name_or_dtype, str):
    return _DTYPES[name_or_dtype]
  return name_or_dtype


# T5 / flaxformer initialisation: fan-in scaled normals; embeddings N(0, 1).
default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
default_embed_init = nn.initializers.normal(stddev=1.0)


class Projection(nn.Module):
  """A bias-free linear map contracting the last `len(in_axes)` input dims into `features`.

  The kernel [*contracted dims, *features] is created at its full rank with its logical axis names, so
  sharding constraints apply to the real parameter shape (flax's DenseGeneral initialises a flattened 2-D
  kernel first, which breaks rank checks under a mesh). The initialiser's fan-in is the product of the
  contracted dims, as for a 2-D dense layer.
  """

  features: tuple[int, ...]
  axes: tuple[str, ...]  # logical names of [*contracted dims, *features]
  num_contracted: int = 1
  dtype: Any = jnp.float32
  kernel_init: Initializer = default_kernel_init

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n_in, n_out = self.num_contracted, len(self.features)
    shape = tuple(x.shape[-n_in:]) + tuple(self.features)
    init = self.kernel_init
    if init is default_kernel_init:
      init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=tuple(range(n_in)),
                                              out_axis=tuple(range(n_in, n_in + n_out)))
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes), shape, jnp.float32)
    return linear(x.astype(self.dtype), kernel.astype(self.dtype), n_in)


def dense(features: int | Sequence[int], axes: tuple[str, ...], *, axis: int | Sequence[int] = -1,
          dtype: Any, name: str, kernel_init: Initializer = default_kernel_init) -> Projection:
  """A bias-free projection whose kernel carries logical axis names `axes`.

  `axis` names the contracted input dims; they must be the trailing ones (-1, or (-2, -1)).
  """
  axis = (axis,) if isinstance(axis, int) else tuple(axis)
  if sorted(axis) != list(range(-len(axis), 0)):
    raise ValueError(f"dense() contracts trailing input dims only, got axis={axis}.")
  features = (features,) if isinstance(features, int) else tuple(features)
  return Projection(features, tuple(axes), len(axis), dtype, kernel_init, name=name)
