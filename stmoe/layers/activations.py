"""The activation functions of the dense MLPs and the experts, by the names configs use.

This module is the one place the names are declared: ``stmoe.config`` validates
``ModelConfig.activations`` / ``MoeConfig.activations`` against :data:`ACTIVATION_NAMES`, and the MLP
and expert layers look the functions up in :data:`ACTIVATIONS`. It imports no JAX at module level, so
that importing ``stmoe.config`` (gin parsing, the CLI's argument checks) stays cheap; each function
imports ``jax.nn`` when first traced, which costs nothing under ``jit``.

T5 naming: "gelu" is the tanh approximation (HF's "gelu_new"), "gelu_exact" the erf form; "swish" is
another name for "silu"; "linear" is the identity (the ungated half of GEGLU).
"""

from __future__ import annotations

from typing import Any, Callable

Array = Any  # jax.Array; not imported here (see the module docstring)


def _jax_nn():
  """jax.nn, imported on first use."""
  import jax.nn

  return jax.nn


def relu(x: Array) -> Array:
  """max(x, 0)."""
  return _jax_nn().relu(x)


def gelu(x: Array) -> Array:
  """GELU, tanh approximation (T5's gelu, HF's gelu_new)."""
  return _jax_nn().gelu(x, approximate=True)


def gelu_exact(x: Array) -> Array:
  """GELU, exact erf form (HF's gelu)."""
  return _jax_nn().gelu(x, approximate=False)


def silu(x: Array) -> Array:
  """x * sigmoid(x) (also called swish)."""
  return _jax_nn().silu(x)


def linear(x: Array) -> Array:
  """The identity: the linear branch of a gated MLP."""
  return x


# name -> function; the only table of activations in stmoe.
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": relu,
    "gelu": gelu,
    "gelu_exact": gelu_exact,
    "silu": silu,
    "swish": silu,
    "linear": linear,
}
ACTIVATION_NAMES: tuple[str, ...] = tuple(ACTIVATIONS)


def activation_fn(name: str) -> Callable[[Array], Array]:
  """The activation called `name`; a ValueError listing the valid names otherwise."""
  if name not in ACTIVATIONS:
    raise ValueError(f"Unknown activation {name!r}; use one of {ACTIVATION_NAMES}.")
  return ACTIVATIONS[name]
