"""T5 feed-forward blocks: the (gated) hidden-layer core shared with the MoE experts, and the dense block.

Dense block: wi (or gated wi_0, wi_1, ...) -> activation(s) -> dropout -> wo. The experts of an MoE
layer (stmoe/moe/experts.py) compute the same hidden layer with a leading expert dim through
:func:`gated_hidden`, so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from stmoe.layers.activations import ACTIVATIONS
from stmoe.layers.common import dense


def input_projection_names(num_activations: int) -> tuple[str, ...]:
  """Parameter names of the input projections: ("wi",) for one activation, ("wi_0", "wi_1", ...) if gated.

  The names are part of the checkpoint and Hugging Face conversion contract.
  """
  if num_activations == 1:
    return ("wi",)
  return tuple(f"wi_{i}" for i in range(num_activations))


def gated_hidden(activations: Sequence[str], project: Callable[[str], jax.Array]) -> jax.Array:
  """The hidden layer act_0(x W_0) * act_1(x W_1) * ... of a T5 MLP (one factor if not gated).

  ("gelu", "linear") is GEGLU, ("relu",) T5.0's plain MLP. `project(name)` creates the input projection
  `name` (see :func:`input_projection_names`) and returns x W with a trailing mlp axis; the dense block
  and the stacked experts differ only in that callable (and in where the parameters live). Projections
  are created in order, and multiplied left to right, so parameter order and numerics are fixed here.
  """
  hidden = None
  for name, act in zip(input_projection_names(len(activations)), activations):
    h = ACTIVATIONS[act](project(name))  # [..., mlp]
    hidden = h if hidden is None else hidden * h
  return hidden  # [..., mlp]


class MlpBlock(nn.Module):
  """Dense T5 feed-forward block on [batch, length, embed] activations."""

  d_ff: int
  activations: tuple[str, ...] = ("gelu", "linear")
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:  # x [batch, length, embed]
    d_model = x.shape[-1]

    def project(name: str) -> jax.Array:
      return dense(self.d_ff, ("embed", "mlp"), dtype=self.dtype, name=name)(x)  # [batch, length, mlp]

    h = gated_hidden(self.activations, project)  # [batch, length, mlp]
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))  # [batch, length, mlp]
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    return dense(d_model, ("mlp", "embed"), dtype=self.dtype, name="wo")(h)  # [batch, length, embed]
