"""The one run setup shared by train, eval, export and compile: shapes first, then shardings.

`setup_run` builds (never materialises) everything a run needs to know before it touches data or
devices: the model (the gin-configured one by default), the mesh (checked against the devices, the
model and the batch), the feature layout that follows the model, the batch shapes, the abstract
parameters with their logical axes and shardings and, given an optimizer, the optimizer transformation
and the abstract train state with its shardings (`StateSpec`). `stmoe train` then restores or
initialises into `spec`, `stmoe eval` restores parameters into `param_target`, and an ahead-of-time
compile lowers the train step on `spec.abstract` alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
from jax.sharding import Mesh

from stmoe import partitioning
from stmoe.training import layout
from stmoe.training import optimizers as opt_lib
from stmoe.training import state as state_lib


def default_model():
  """The gin-configured model (`make_model.config = @ModelConfig()` etc.)."""
  from stmoe.models.api import make_model  # the model is built only when a run starts

  return make_model()


@dataclasses.dataclass
class RunSetup:
  """What a run knows before it reads data or touches a device (see module docstring)."""

  model: Any
  mesh: Mesh
  model_type: str  # "encoder_decoder" | "decoder_only" | "prefix_lm" (stmoe.training.layout)
  batch_size: int
  task_feature_lengths: dict[str, int]
  input_shapes: dict[str, tuple[int, ...]]  # global batch feature shapes
  params_logical_axes: Any  # pytree of logical PartitionSpecs
  param_shardings: Any  # pytree of NamedSharding
  abstract_params: Any  # pytree of ShapeDtypeStruct with .sharding
  tx: Any = None  # optax GradientTransformation (with an optimizer)
  spec: state_lib.StateSpec | None = None  # abstract train state + shardings (with an optimizer)


def setup_run(model: Any = None, mesh: Mesh | None = None, *, batch_size: int,
              task_feature_lengths: Mapping[str, int], model_type: str | None = None,
              optimizer: opt_lib.OptimizerDef | None = None, seed: int = 0) -> RunSetup:
  """Model, mesh and abstract state of a run (nothing materialised); raises UserErrors up front.

  Args:
    model: a model API object (default: the gin-configured one).
    mesh: default `partitioning.make_mesh()` (gin: NUM_EXPERT_PARTITIONS / NUM_MODEL_PARTITIONS).
    batch_size, task_feature_lengths: the global batch.
    model_type: leave None (it follows the model); "prefix_lm" may be requested for decoder-only models.
    optimizer: with an OptimizerDef, also the optimizer transformation and the abstract train state.
    seed: the train state's seed (its rng leaf).
  """
  model = default_model() if model is None else model
  mesh = partitioning.make_mesh() if mesh is None else mesh
  partitioning.validate_mesh(mesh, getattr(model, "config", None), batch_size)
  model_type = layout.resolve_model_type(model, model_type)
  layout.check_feature_lengths(model_type, task_feature_lengths)
  input_shapes = layout.input_shapes_for(model_type, batch_size, task_feature_lengths)
  logical = model.params_logical_axes(input_shapes)
  shapes = jax.eval_shape(lambda: model.get_initial_variables(jax.random.PRNGKey(0), input_shapes, None)["params"])
  shardings = partitioning.param_shardings(logical, mesh, shapes)  # gin: param_shardings.fsdp
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)
  setup = RunSetup(model=model, mesh=mesh, model_type=model_type, batch_size=batch_size,
                   task_feature_lengths=dict(task_feature_lengths), input_shapes=input_shapes,
                   params_logical_axes=logical, param_shardings=shardings, abstract_params=abstract)
  if optimizer is not None:
    setup.tx = opt_lib.make_optimizer(optimizer, logical, shapes)
    setup.spec = state_lib.state_spec(model, setup.tx, input_shapes, mesh, seed=seed)
  return setup
