"""Loss metrics on a split (teacher-forced, deterministic): the one evaluation loop, and `evaluate(...)`.

`eval_loop` runs the jitted eval step over up to `eval_steps` batches of an input iterator and averages the
metrics (`eval/<metric>`); the trainer's periodic evaluation and `evaluate` both call it.
`evaluate` restores only the parameters of a checkpoint (resharded onto the current mesh), runs
`eval_loop` over `eval_steps` batches (or the whole split) and writes `eval/<metric>` to TensorBoard and
MODEL_DIR/metrics.jsonl (process 0). Decoding metrics (seqio postprocessors / metric fns) are
stmoe.evaluation.task_metrics.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Mapping

import gin
import jax
import numpy as np
from jax.sharding import Mesh

from stmoe import checkpoints as ckpt_lib
from stmoe import partitioning
from stmoe.checkpoints import resolve as resolve_lib
from stmoe.errors import UserError
from stmoe.training import inputs as inputs_lib
from stmoe.training import metrics as metrics_lib
from stmoe.training import setup as setup_lib
from stmoe.training import step as step_lib

log = logging.getLogger(__name__)


class EvalLoop:
  """The jitted eval step of a model on a mesh, compiled on first use and reused across calls."""

  def __init__(self, model: Any, mesh: Mesh, param_shardings: Any):
    self.mesh, self.param_shardings = mesh, param_shardings
    self.eval_fn = step_lib.make_eval_step(model.loss_fn)
    self._jitted = None

  def __call__(self, params: Any, batches: Iterable[Mapping[str, np.ndarray]],
               eval_steps: int | None = None) -> dict[str, float]:
    """Mean of each metric over up to `eval_steps` batches (all if None), as `eval/<metric>`; plus
    `eval/num_batches`. Empty if the iterator yields nothing."""
    totals: list[dict[str, float]] = []
    with partitioning.mesh_context(self.mesh):
      for i, local in enumerate(batches):
        if eval_steps is not None and i >= eval_steps:
          break
        batch = partitioning.make_global_batch(local, self.mesh)
        if self._jitted is None:
          self._jitted = step_lib.jit_eval_step(self.eval_fn, self.param_shardings,
                                                step_lib.batch_shardings(self.mesh, batch), self.mesh)
        totals.append(metrics_lib.to_python(jax.device_get(self._jitted(params, batch))))
    if not totals:
      return {}
    scalars = {f"eval/{k}": float(np.mean([t[k] for t in totals])) for k in totals[0]}
    scalars["eval/num_batches"] = float(len(totals))
    return scalars


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
  setup = setup_lib.setup_run(model, mesh, batch_size=batch_size, task_feature_lengths=task_feature_lengths,
                              model_type=model_type)
  path = checkpoint_path or model_dir
  try:
    location = resolve_lib.resolve(path)
  except FileNotFoundError as e:
    raise UserError(str(e)) from None
  params = ckpt_lib.restore_params(location.path, setup.abstract_params)
  log.info("Evaluating %s on %s/%s.", location.path, mixture_or_task_name, split)

  shard_id, num_shards = partitioning.process_batch_slice(batch_size)
  it = input_fn(mixture_or_task_name, task_feature_lengths, batch_size, split=split, model_type=setup.model_type,
                shuffle=False, seed=random_seed, shard_id=shard_id, num_shards=num_shards, repeat=False)
  scalars = EvalLoop(setup.model, setup.mesh, setup.param_shardings)(params, it, eval_steps)
  if not scalars:
    raise UserError(f"split {split!r} of {mixture_or_task_name!r} produced no batches.")
  writer = metrics_lib.MetricsWriter(model_dir, enabled=jax.process_index() == 0)
  writer.write(location.step or 0, scalars)
  writer.close()
  return scalars
