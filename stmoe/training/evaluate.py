"""`evaluate(...)`: the loss metrics of a checkpoint on a split (teacher-forced, deterministic).

Restores only the parameters (resharded onto the current mesh), runs the jitted eval step over
`eval_steps` batches (or the whole split) and writes `eval/<metric>` to TensorBoard, MODEL_DIR/metrics.jsonl
(process 0) and returns them. Decoding metrics (seqio postprocessors / metric fns) belong to `stmoe infer`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

import gin
import jax
import numpy as np
from jax.sharding import Mesh

from stmoe import checkpoints as ckpt_lib
from stmoe import partitioning
from stmoe.training import inputs as inputs_lib
from stmoe.training import layout
from stmoe.training import metrics as metrics_lib
from stmoe.training import step as step_lib
from stmoe.training import trainer as trainer_lib

log = logging.getLogger(__name__)


@gin.configurable(denylist=["mesh"])
def evaluate(model: Any = None,
             *,
             model_dir: str = gin.REQUIRED,
             batch_size: int = gin.REQUIRED,
             task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
             mixture_or_task_name: str | None = None,
             checkpoint_path: str | None = None,
             split: str = "validation",
             model_type: str | None = None,
             input_fn: Callable[..., Any] = inputs_lib.seqio_input,
             eval_steps: int | None = None,
             mesh: Mesh | None = None,
             random_seed: int = 0) -> dict[str, float]:
  """Evaluate the checkpoint at `checkpoint_path` (default: the latest in `model_dir`)."""
  model = trainer_lib.default_model() if model is None else model
  mesh = partitioning.make_mesh() if mesh is None else mesh
  partitioning.validate_mesh(mesh, getattr(model, "config", None), batch_size)
  model_type = layout.resolve_model_type(model, model_type)
  layout.check_feature_lengths(model_type, task_feature_lengths)
  input_shapes = layout.input_shapes_for(model_type, batch_size, task_feature_lengths)
  abstract_params = jax.eval_shape(
      lambda: model.get_initial_variables(jax.random.PRNGKey(0), input_shapes, None)["params"])
  logical = model.params_logical_axes(input_shapes)
  shardings = partitioning.logical_to_sharding(logical, mesh, abstract_params)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params, shardings)
  path = checkpoint_path or model_dir
  params = ckpt_lib.restore_params(path, target)
  step_dir = ckpt_lib.latest_step_dir(path)
  step = int(step_dir.rstrip("/").split("/")[-1]) if step_dir.rstrip("/").split("/")[-1].isdigit() else 0
  log.info("Evaluating %s on %s/%s.", step_dir, mixture_or_task_name, split)

  shard_id, num_shards = partitioning.process_batch_slice(batch_size)
  it = input_fn(mixture_or_task_name, task_feature_lengths, batch_size, split=split, model_type=model_type,
                shuffle=False, seed=random_seed, shard_id=shard_id, num_shards=num_shards, repeat=False)
  eval_fn = step_lib.make_eval_step(model.loss_fn)
  jitted = None
  totals: list[dict[str, float]] = []
  with partitioning.mesh_context(mesh):
    for i, local in enumerate(it):
      if eval_steps is not None and i >= eval_steps:
        break
      batch = partitioning.make_global_batch(local, mesh)
      if jitted is None:
        jitted = step_lib.jit_eval_step(eval_fn, shardings, step_lib.batch_shardings(mesh, batch), mesh)
      totals.append(metrics_lib.to_python(jax.device_get(jitted(params, batch))))
  if not totals:
    raise ValueError(f"split {split!r} of {mixture_or_task_name!r} produced no batches.")
  scalars = {f"eval/{k}": float(np.mean([t[k] for t in totals])) for k in totals[0]}
  scalars["eval/num_batches"] = float(len(totals))
  writer = metrics_lib.MetricsWriter(model_dir, enabled=jax.process_index() == 0)
  writer.write(step, scalars)
  writer.close()
  return scalars
