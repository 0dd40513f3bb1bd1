"""Small shared pieces of the Transformer layers: dtypes, activations, initialisers, dense projections."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Initializer = Callable[..., Array]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(name_or_dtype: Any) -> jnp.dtype:
  """'bfloat16' -> jnp.bfloat16; dtypes pass through."""
  if isinstance(name_or_dtype, str):
    return _DTYPES[name_or_dtype]
  return name_or_dtype


def activation_fn(name: str) -> Callable[[Array], Array]:
  """T5 names: 'gelu' is the tanh approximation (HF 'gelu_new'), 'gelu_exact' the erf form."""
  return {
      "relu": jax.nn.relu,
      "gelu": lambda x: jax.nn.gelu(x, approximate=True),
      "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
      "silu": jax.nn.silu,
      "swish": jax.nn.silu,
      "linear": lambda x: x,
  }[name]


# T5 / flaxformer initialisation: fan-in scaled normals; embeddings N(0, 1).
default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
default_embed_init = nn.initializers.normal(stddev=1.0)


def dense(features: int | Sequence[int], axes: tuple[str, ...], *, axis: int | Sequence[int] = -1,
          dtype: Any, name: str, kernel_init: Initializer = default_kernel_init) -> nn.DenseGeneral:
  """A bias-free projection whose kernel carries logical axis names `axes`."""
  return nn.DenseGeneral(
      features=features, axis=axis, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
      kernel_init=nn.with_logical_partitioning(kernel_init, axes), name=name)
