"""The experts of an MoE layer: E independent (optionally gated) MLPs with stacked parameters.

Parameters (names are part of the checkpoint / HF-conversion contract):
  ``wi [expert, embed, mlp]`` (one activation, e.g. relu) or ``wi_0``, ``wi_1`` (gated: act(x wi_0) * (x wi_1),
  e.g. ("gelu", "linear") = GEGLU), and ``wo [expert, mlp, embed]``; T5-style truncated-normal fan-in init.

How tokens reach the experts is not this module's business: the caller passes a ``matmul(x, w)``
that multiplies its token layout by the stacked weights (a batched einsum over capacity buffers, or
a grouped matmul over expert-sorted rows), see stmoe/moe/dispatch.py. The hidden layer itself is the
dense MLP's (:func:`stmoe.layers.mlp.gated_hidden`) with a leading expert dim on the weights.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from stmoe.layers.activations import ACTIVATIONS  # re-exported: the one activation table
from stmoe.layers.mlp import gated_hidden

__all__ = ["ACTIVATIONS", "Experts", "MatMul"]

MatMul = Callable[[jax.Array, jax.Array], jax.Array]


def _kernel_init(in_axis: int, out_axis: int):
  """T5 init: truncated normal with variance 1 / fan_in, fan_in per expert (expert axis is a batch axis)."""
  return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axis,
                                          out_axis=out_axis, batch_axis=(0,))


class Experts(nn.Module):
  """Stacked expert MLPs applied through a caller-supplied matmul (see module docstring)."""

  num_experts: int
  d_ff: int
  activations: tuple[str, ...] = ("relu",)
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, matmul: MatMul, *, deterministic: bool) -> jax.Array:
    """x: tokens in the caller's layout with a trailing embed axis; returns the same layout."""
    embed = x.shape[-1]
    e, f = self.num_experts, self.d_ff
    x = x.astype(self.dtype)
    wi_axes, wo_axes = ("expert", "embed", "mlp"), ("expert", "mlp", "embed")

    def project(name: str) -> jax.Array:
      w = self.param(name, nn.with_logical_partitioning(_kernel_init(-2, -1), wi_axes), (e, embed, f), jnp.float32)
      return matmul(x, w.astype(self.dtype))  # [..., mlp]

    hidden = gated_hidden(self.activations, project)  # [..., mlp]
    if self.dropout_rate > 0:
      hidden = nn.Dropout(rate=self.dropout_rate)(hidden, deterministic=deterministic)
    wo = self.param("wo", nn.with_logical_partitioning(_kernel_init(-2, -1), wo_axes), (e, f, embed), jnp.float32)
    return matmul(hidden.astype(self.dtype), wo.astype(self.dtype))  # [..., embed]
