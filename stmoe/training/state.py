"""The train state and its sharded initialisation: shapes first, then shardings, then sharded arrays.

The train state is a plain dict pytree ``{"step", "params", "opt_state", "rng"}`` (a dict, so orbax
saves and restores it without custom node handlers). :func:`abstract_train_state` computes its shapes
with ``jax.eval_shape`` and its shardings from the model's logical axes -- nothing is materialised -- and
:func:`init_train_state` then runs the initialisation *jitted with those output shardings*, so each
device only ever creates its own shard (no full copy of the model on one device).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from stmoe import partitioning

TrainState = dict  # {"step": int32[], "params": pytree, "opt_state": pytree, "rng": uint32[2]}


def input_shapes_from_batch(batch: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  """The `input_shapes` the model API wants, from a (global) batch of arrays."""
  return {k: tuple(np.shape(v)) for k, v in batch.items()}


def input_types_from_batch(batch: Mapping[str, Any]) -> dict[str, Any]:
  return {k: np.asarray(v).dtype if not hasattr(v, "dtype") else v.dtype for k, v in batch.items()}


@dataclasses.dataclass
class StateSpec:
  """Everything about the train state that is known without materialising it."""

  abstract: Any  # TrainState of jax.ShapeDtypeStruct (with .sharding set)
  shardings: Any  # TrainState of NamedSharding
  params_logical_axes: Any  # pytree of logical PartitionSpecs

  @property
  def param_shardings(self) -> Any:
    return self.shardings["params"]


def _init_fn(model, tx: optax.GradientTransformation, input_shapes, input_types, seed: int):
  def init() -> TrainState:
    rng = jax.random.PRNGKey(seed)
    params_rng, train_rng = jax.random.split(rng)
    params = model.get_initial_variables(params_rng, input_shapes, input_types)["params"]
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            "rng": train_rng}

  return init


def state_spec(model, tx: optax.GradientTransformation, input_shapes: Mapping[str, tuple[int, ...]],
               mesh: Mesh, seed: int = 0, input_types: Mapping[str, Any] | None = None) -> StateSpec:
  """Shapes and shardings of the train state (jax.eval_shape: nothing is materialised)."""
  input_types = input_types or {k: jnp.int32 for k in input_shapes}
  # Initialisation runs outside the logical-rules context: parameters get their shardings from
  # out_shardings; activation constraints are irrelevant for init.
  abstract = jax.eval_shape(_init_fn(model, tx, input_shapes, input_types, seed))
  logical = model.params_logical_axes(dict(input_shapes))
  param_sh = partitioning.param_shardings(logical, mesh, abstract["params"])  # gin: param_shardings.fsdp
  rep = partitioning.replicated(mesh)
  shardings = {
      "step": rep,
      "params": param_sh,
      "opt_state": partitioning.derived_shardings(abstract["opt_state"], abstract["params"], param_sh, mesh),
      "rng": rep,
  }
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return StateSpec(abstract=abstract, shardings=shardings, params_logical_axes=logical)


def init_train_state(model, tx: optax.GradientTransformation, spec: StateSpec, mesh: Mesh, seed: int = 0,
                     input_shapes: Mapping[str, tuple[int, ...]] | None = None,
                     input_types: Mapping[str, Any] | None = None) -> TrainState:
  """Initialise the train state directly into its shardings (jitted with out_shardings)."""
  if input_shapes is None:
    raise ValueError("init_train_state needs input_shapes (use input_shapes_from_batch on a global batch).")
  input_types = input_types or {k: jnp.int32 for k in input_shapes}
  return jax.jit(_init_fn(model, tx, input_shapes, input_types, seed), out_shardings=spec.shardings)()
