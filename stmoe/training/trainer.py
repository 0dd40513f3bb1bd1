"""The train loop: a plain gin-configurable function, `train(...)`, usable from Python and the CLI.

Order of events (same on one CPU and on a pod):

1. build the mesh (gin: NUM_EXPERT_PARTITIONS / NUM_MODEL_PARTITIONS) and refuse it up front if it does
   not fit the model or the batch;
2. state shapes and shardings from `jax.eval_shape` + the model's logical axes;
3. resume from the newest readable checkpoint in MODEL_DIR (params, optimizer state, step, rng and the
   input position) -- or initialise sharded, optionally loading parameters from `init_checkpoint`;
4. loop: next batch -> global array -> jitted train step (state donated); every LOG_PERIOD steps fetch the
   metrics, raise on a NaN loss naming the step, write TensorBoard + metrics.jsonl (process 0), advance
   the progress bar; every EVAL_PERIOD steps evaluate on the validation split (`eval/` metrics); every
   CHECKPOINT_PERIOD steps and at the end save asynchronously.

Extension is by hooks (`callbacks`), not forks: see :class:`Callback`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

import gin
import jax
import numpy as np
from jax.sharding import Mesh

from stmoe import checkpoints as ckpt_lib
from stmoe import partitioning
from stmoe.training import distributed
from stmoe.training import inputs as inputs_lib
from stmoe.training import metrics as metrics_lib
from stmoe.training import optimizers as opt_lib
from stmoe.training import state as state_lib
from stmoe.training import step as step_lib

log = logging.getLogger(__name__)


class Callback:
  """Hooks into the train loop; override what you need. `ctx` is the live :class:`TrainContext`."""

  def on_train_start(self, ctx: "TrainContext") -> None:
    pass

  def on_step_end(self, ctx: "TrainContext", step: int) -> None:
    pass

  def on_log(self, ctx: "TrainContext", step: int, scalars: dict[str, float]) -> None:
    pass

  def on_eval(self, ctx: "TrainContext", step: int, scalars: dict[str, float]) -> None:
    pass

  def on_checkpoint(self, ctx: "TrainContext", step: int) -> None:
    pass

  def on_train_end(self, ctx: "TrainContext") -> None:
    pass


@dataclasses.dataclass
class TrainContext:
  """What callbacks (and the caller, via TrainResult) can see of a run."""

  model: Any
  mesh: Mesh
  spec: state_lib.StateSpec
  model_dir: str
  state: Any = None
  step: int = 0
  start_step: int = 0
  is_chief: bool = True
  checkpoints: ckpt_lib.CheckpointManager | None = None


@dataclasses.dataclass
class TrainResult:
  state: Any
  step: int
  start_step: int
  losses: dict[int, float]  # loss of every step run in this call, by step number (1-based, after update)
  last_scalars: dict[str, float]
  eval_scalars: dict[str, float]
  model_dir: str


def default_model():
  """The gin-configured model (`make_model.config = @ModelConfig()` etc.)."""
  from stmoe.models.api import make_model  # the model is built only when training starts

  return make_model()


def input_shapes_for(model_type: str, batch_size: int, lengths: Mapping[str, int]) -> dict[str, tuple[int, int]]:
  """Feature shapes of a global batch, from the task feature lengths (used for shapes-only init)."""
  li, lt = int(lengths["inputs"]), int(lengths["targets"])
  if model_type == "decoder_only":
    n = li + lt
    return {"decoder_input_tokens": (batch_size, n), "decoder_target_tokens": (batch_size, n),
            "decoder_loss_weights": (batch_size, n), "decoder_causal_attention": (batch_size, n)}
  return {"encoder_input_tokens": (batch_size, li), "decoder_input_tokens": (batch_size, lt),
          "decoder_target_tokens": (batch_size, lt), "decoder_loss_weights": (batch_size, lt)}


def _batch_tokens(batch: Mapping[str, Any]) -> int:
  n = 0
  for k in ("encoder_input_tokens", "decoder_target_tokens"):
    if k in batch:
      n += int(np.prod(batch[k].shape))
  return n


def _write_operative_config(model_dir: str) -> None:
  with open(os.path.join(model_dir, "config.gin"), "w", encoding="utf-8") as f:
    f.write(gin.operative_config_str())


@gin.configurable(denylist=["mesh", "callbacks"])
def train(model: Any = None,
          *,
          model_dir: str = gin.REQUIRED,
          train_steps: int = gin.REQUIRED,
          batch_size: int = gin.REQUIRED,
          task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
          mixture_or_task_name: str | None = None,
          model_type: str = "encoder_decoder",
          input_fn: Callable[..., Any] = inputs_lib.seqio_input,
          eval_input_fn: Callable[..., Any] | None = None,
          eval_split: str = "validation",
          optimizer: opt_lib.OptimizerDef | None = None,
          mesh: Mesh | None = None,
          random_seed: int = 0,
          num_microbatches: int = 1,
          checkpoint_period: int = 1000,
          keep_checkpoints: int | None = 3,
          async_checkpointing: bool = True,
          log_period: int = 100,
          eval_period: int = 0,
          eval_steps: int = 10,
          init_checkpoint: str | None = None,
          restore_optimizer_state: bool = False,
          callbacks: Sequence[Callback] = (),
          progress: bool = True,
          step_timeout_s: float | None = 900.0) -> TrainResult:
  """Train `model` (default: the gin-configured one) for `train_steps` steps in total, resuming if possible.

  Args:
    model_dir: where checkpoints, metrics.jsonl, TensorBoard events and config.gin go (MODEL_DIR).
    train_steps: total steps, counting steps already in a resumed checkpoint (TRAIN_STEPS).
    batch_size: global batch size over all processes (BATCH_SIZE).
    task_feature_lengths: {"inputs": Li, "targets": Lt} (TASK_FEATURE_LENGTHS).
    input_fn: an input function (see stmoe/training/inputs.py); eval_input_fn defaults to it.
    optimizer: an OptimizerDef (default: T5 Adafactor with rsqrt-with-warmup).
    mesh: default `partitioning.make_mesh()` as configured by gin.
    num_microbatches: gradient accumulation over this many microbatches per step.
    checkpoint_period, keep_checkpoints, log_period, eval_period (0 = never), eval_steps: as named.
    init_checkpoint: if MODEL_DIR has no checkpoint, load parameters from this one (fine-tuning);
      with restore_optimizer_state also its optimizer state, step and rng.
    callbacks: Callback hooks.
    step_timeout_s: multi-process runs exit (status 3) if no step finishes in this many seconds (a dead
      peer must not hang the others); None disables the watchdog.
  """
  model = default_model() if model is None else model
  mesh = partitioning.make_mesh() if mesh is None else mesh
  partitioning.validate_mesh(mesh, getattr(model, "config", None), batch_size)
  if num_microbatches > 1 and (batch_size // (mesh.shape["data"] * mesh.shape["expert"])) % num_microbatches:
    raise ValueError(
        f"num_microbatches={num_microbatches} must divide the per-device batch "
        f"{batch_size // (mesh.shape['data'] * mesh.shape['expert'])} (BATCH_SIZE / (data x expert)).")
  optimizer = optimizer or opt_lib.adafactor()
  is_chief = jax.process_index() == 0
  if is_chief:
    os.makedirs(model_dir, exist_ok=True)

  shard_id, num_shards = partitioning.process_batch_slice(batch_size)
  # The data source first: a missing task fails before anything is compiled.
  train_iter = input_fn(mixture_or_task_name, task_feature_lengths, batch_size, split="train",
                        model_type=model_type, shuffle=True, seed=random_seed, shard_id=shard_id,
                        num_shards=num_shards, repeat=True)
  input_shapes = input_shapes_for(model_type, batch_size, task_feature_lengths)
  logical = model.params_logical_axes(input_shapes)
  abstract_params = jax.eval_shape(
      lambda: model.get_initial_variables(jax.random.PRNGKey(0), input_shapes, None)["params"])
  tx = opt_lib.make_optimizer(optimizer, logical, abstract_params)
  spec = state_lib.state_spec(model, tx, input_shapes, mesh, seed=random_seed)

  in_mesh = lambda: partitioning.mesh_context(mesh)

  manager = ckpt_lib.CheckpointManager(model_dir, keep=keep_checkpoints, async_save=async_checkpointing)
  restored = manager.restore_latest(spec.abstract)
  if restored is not None:
    start_step, state, data_state = restored
    if data_state.get("train") is not None:
      train_iter.set_state(data_state["train"])
    log.info("Resumed from %s at step %d.", manager.directory, start_step)
  else:
    state = state_lib.init_train_state(model, tx, spec, mesh, random_seed, input_shapes)
    if init_checkpoint:
      if restore_optimizer_state and optimizer.frozen_patterns:
        raise ValueError(
            f"restore_optimizer_state=True cannot be combined with frozen parameters "
            f"({optimizer.frozen_patterns}): frozen parameters have no optimizer state, so the pretrained "
            f"state does not fit. Set RESTORE_OPTIMIZER_STATE=False (bind train.restore_optimizer_state) or "
            f"train all parameters (TRAINABLE_PARAMS='all').")
      if restore_optimizer_state:
        state, _ = ckpt_lib.restore_train_state(init_checkpoint, spec.abstract)
      else:
        state["params"] = ckpt_lib.restore_params(init_checkpoint, spec.abstract["params"])
      log.info("Initialised from %s.", init_checkpoint)
    start_step = int(jax.device_get(state["step"]))

  ctx = TrainContext(model=model, mesh=mesh, spec=spec, model_dir=model_dir, state=state, step=start_step,
                     start_step=start_step, is_chief=is_chief, checkpoints=manager)
  writer = metrics_lib.MetricsWriter(model_dir, enabled=is_chief)
  bar = metrics_lib.ProgressBar(train_steps, start_step, enabled=progress and is_chief)
  train_fn = step_lib.make_train_step(model.loss_fn, tx, optimizer.schedule, num_microbatches)
  eval_fn = step_lib.make_eval_step(model.loss_fn)
  jitted_train = jitted_eval = None
  losses: dict[int, float] = {}
  last_scalars: dict[str, float] = {}
  eval_scalars: dict[str, float] = {}
  pending: list[tuple[int, Any]] = []
  period_tokens, period_t0 = 0, time.time()
  config_written = False
  for cb in callbacks:
    cb.on_train_start(ctx)

  def flush_metrics(step: int) -> None:
    nonlocal pending, period_tokens, period_t0, last_scalars
    if not pending:
      return
    fetched = [(s, metrics_lib.to_python(jax.device_get(m))) for s, m in pending]
    for s, m in fetched:
      if not math.isfinite(m.get("loss", 0.0)):
        raise FloatingPointError(
            f"Loss is {m.get('loss')} at step {s}: training diverged. Lower the learning rate, enable "
            "gradient clipping (OptimizerDef.max_grad_norm) or check the data; the last good checkpoint is in "
            f"{manager.directory}.")
      losses[s] = m["loss"]
    elapsed = max(time.time() - period_t0, 1e-9)
    keys = fetched[-1][1].keys()
    scalars = {k: float(np.mean([m[k] for _, m in fetched if k in m])) for k in keys}
    scalars["learning_rate"] = fetched[-1][1].get("learning_rate", float("nan"))
    scalars["tokens_per_second"] = period_tokens / elapsed
    scalars["steps_per_second"] = len(fetched) / elapsed
    writer.write(step, scalars)
    last_scalars = scalars
    for cb in callbacks:
      cb.on_log(ctx, step, scalars)
    pending, period_tokens, period_t0 = [], 0, time.time()

  def run_eval(step: int) -> dict[str, float]:
    nonlocal jitted_eval
    make_eval = eval_input_fn or input_fn
    it = make_eval(mixture_or_task_name, task_feature_lengths, batch_size, split=eval_split,
                   model_type=model_type, shuffle=False, seed=random_seed, shard_id=shard_id,
                   num_shards=num_shards, repeat=False)
    totals: list[dict[str, float]] = []
    with in_mesh():
      for _, local in zip(range(eval_steps), it):
        batch = partitioning.make_global_batch(local, mesh)
        if jitted_eval is None:
          jitted_eval = step_lib.jit_eval_step(eval_fn, spec.param_shardings,
                                               step_lib.batch_shardings(mesh, batch), mesh)
        totals.append(metrics_lib.to_python(jax.device_get(jitted_eval(ctx.state["params"], batch))))
    if not totals:
      return {}
    scalars = {f"eval/{k}": float(np.mean([t[k] for t in totals])) for k in totals[0]}
    writer.write(step, scalars)
    for cb in callbacks:
      cb.on_eval(ctx, step, scalars)
    return scalars

  step = start_step
  watchdog = distributed.StepWatchdog(step_timeout_s if jax.process_count() > 1 else None)
  try:
    with in_mesh():
      while step < train_steps:
        local = next(train_iter)
        batch = partitioning.make_global_batch(local, mesh)
        if jitted_train is None:
          jitted_train = step_lib.jit_train_step(train_fn, spec.shardings, step_lib.batch_shardings(mesh, batch),
                                                 mesh)
        ctx.state, metrics = jitted_train(ctx.state, batch)
        step += 1
        watchdog.pet(step)
        ctx.step = step
        pending.append((step, metrics))
        period_tokens += _batch_tokens(batch)
        if step % log_period == 0 or step == train_steps:
          flush_metrics(step)
          bar.update(step, last_scalars.get("loss"))
          if is_chief and not config_written:
            _write_operative_config(model_dir)
            config_written = True
        if eval_period and step % eval_period == 0:
          eval_scalars = run_eval(step)
        if step % checkpoint_period == 0 or step == train_steps:
          manager.save(step, ctx.state, {"train": train_iter.get_state()})
          for cb in callbacks:
            cb.on_checkpoint(ctx, step)
        for cb in callbacks:
          cb.on_step_end(ctx, step)
      flush_metrics(step)
    if is_chief and not config_written:
      _write_operative_config(model_dir)
  finally:
    watchdog.close()
    manager.close()
    writer.close()
    bar.close()
  for cb in callbacks:
    cb.on_train_end(ctx)
  return TrainResult(state=ctx.state, step=step, start_step=start_step, losses=losses,
                     last_scalars=last_scalars, eval_scalars=eval_scalars, model_dir=model_dir)
