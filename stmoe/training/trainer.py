"""The train loop: a plain gin-configurable function, `train(...)`, usable from Python and the CLI.

Order of events (same on one CPU and on a pod):

1. build the mesh (gin: NUM_EXPERT_PARTITIONS / NUM_MODEL_PARTITIONS) and refuse it up front if it does
   not fit the model or the batch;
2. state shapes and shardings from `jax.eval_shape` + the model's logical axes;
3. open the data source, check the task against the model and the vocabulary against VOCAB_SIZE;
   resume from the newest readable checkpoint in MODEL_DIR (params, optimizer state, step, rng and the
   input position) -- or initialise sharded, optionally loading parameters from `init_checkpoint`;
4. only now write MODEL_DIR (config.gin; a different earlier one is kept in config_history/);
5. loop: next batch -> global array -> jitted train step (state donated); every LOG_PERIOD steps fetch the
   metrics, raise on a NaN/inf loss or gradient norm naming the step, write TensorBoard + metrics.jsonl
   (process 0), advance the progress bar; every EVAL_PERIOD steps evaluate on the validation split
   (`eval/` metrics); every CHECKPOINT_PERIOD steps and at the end check that the step's loss, gradient
   norm, parameters and optimizer state are finite (one fused reduction), then save asynchronously.

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
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from stmoe import checkpoints as ckpt_lib
from stmoe import partitioning
from stmoe.errors import CheckpointMismatchError, TrainingDivergedError, UserError
from stmoe.training import distributed
from stmoe.training import layout
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


input_shapes_for = layout.input_shapes_for  # kept here for existing callers


def _batch_tokens(batch: Mapping[str, Any]) -> int:
  n = 0
  for k in ("encoder_input_tokens", "decoder_target_tokens"):
    if k in batch:
      n += int(np.prod(batch[k].shape))
  return n


CONFIG_FILE = "config.gin"
CONFIG_HISTORY_SUBDIR = "config_history"


def _operative_config() -> str:
  return gin.operative_config_str()


def write_run_config(model_dir: str, text: str, *, keep_previous: bool) -> None:
  """Writes MODEL_DIR/config.gin atomically. With keep_previous, a different config.gin left by an earlier
  run is first moved to MODEL_DIR/config_history/config-<UTC time>.gin (a config is never lost)."""
  path = os.path.join(model_dir, CONFIG_FILE)
  if keep_previous and os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      previous = f.read()
    if previous != text:
      history = os.path.join(model_dir, CONFIG_HISTORY_SUBDIR)
      os.makedirs(history, exist_ok=True)
      stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
      dst, n = os.path.join(history, f"config-{stamp}.gin"), 0
      while os.path.exists(dst):
        n += 1
        dst = os.path.join(history, f"config-{stamp}.{n}.gin")
      os.replace(path, dst)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def _check_run_args(model_dir: str, train_steps: int, batch_size: int, num_microbatches: int, mesh: Mesh,
                    checkpoint_period: int, log_period: int) -> None:
  """Plain argument checks, before anything is opened or written."""
  if not model_dir:
    raise UserError("MODEL_DIR is not set: pass --model_dir DIR.")
  if os.path.exists(model_dir) and not os.path.isdir(model_dir):
    raise UserError(f"--model_dir {model_dir!r} is a file, not a directory: pass a directory path.")
  for name, value, low in (("BATCH_SIZE", batch_size, 1), ("TRAIN_STEPS", train_steps, 0),
                           ("CHECKPOINT_PERIOD", checkpoint_period, 1), ("LOG_PERIOD", log_period, 1),
                           ("NUM_MICROBATCHES", num_microbatches, 1)):
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
      raise UserError(f"{name}={value!r} must be an integer >= {low}.")
  per_device = batch_size // (mesh.shape["data"] * mesh.shape["expert"])
  if num_microbatches > 1 and per_device % num_microbatches:
    raise UserError(
        f"num_microbatches={num_microbatches} must divide the per-device batch "
        f"{per_device} (BATCH_SIZE / (data x expert)).")


def check_vocabulary(model: Any, train_iter: Any) -> None:
  """The model's embedding must cover the data's vocabulary (checked before anything is compiled)."""
  vocab = getattr(train_iter, "vocabulary", None)
  size = getattr(vocab, "vocab_size", None) if vocab is not None else getattr(train_iter, "vocab_size", None)
  model_size = getattr(getattr(model, "config", None), "vocab_size", None)
  if size is None or model_size is None:
    return
  from stmoe.data import vocab as vocab_lib  # no TensorFlow: sentencepiece only

  vocab_lib.check_vocab_matches_model(int(size), int(model_size))


class _PendingMetrics:
  """Metrics of the steps since the last log flush; fetched once each, checked for non-finite values."""

  def __init__(self):
    self.items: list[tuple[int, dict[str, float]]] = []  # fetched, in step order
    self._on_device: list[tuple[int, Any]] = []

  def add(self, step: int, metrics: Any) -> None:
    self._on_device.append((step, metrics))

  def fetch(self) -> list[tuple[int, dict[str, float]]]:
    """Device -> host for every pending step not fetched yet; returns all pending, in step order."""
    if self._on_device:
      fetched = jax.device_get([m for _, m in self._on_device])
      self.items += [(s, metrics_lib.to_python(m)) for (s, _), m in zip(self._on_device, fetched)]
      self._on_device = []
    return self.items

  def check_finite(self, newest_good: Callable[[], str]) -> None:
    for s, m in self.fetch():
      for key in ("loss", "grad_norm"):
        if key in m and not math.isfinite(m[key]):
          raise TrainingDivergedError(
              f"training diverged at step {s}: {key} is {m[key]}. Nothing from step {s} on was saved; "
              f"{newest_good()} Lower the learning rate, enable gradient clipping "
              "(OptimizerDef.max_grad_norm) or check the data, then resume.")

  def clear(self) -> None:
    self.items, self._on_device = [], []


def _all_finite(state: Any) -> jax.Array:
  """One fused scalar: are all floating-point leaves of the params and optimizer state finite?"""
  leaves = [x for x in jax.tree.leaves((state["params"], state["opt_state"]))
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.asarray(True)


def _restore_or_init(model: Any, tx: Any, spec: state_lib.StateSpec, mesh: Mesh, manager: ckpt_lib.CheckpointManager,
                     train_iter: Any, optimizer: opt_lib.OptimizerDef, input_shapes: Mapping[str, Any],
                     random_seed: int, init_checkpoint: str | None, restore_optimizer_state: bool):
  """(state, start_step, resumed): the newest readable checkpoint of MODEL_DIR, else a fresh (or
  INIT_CHECKPOINT-initialised) state. Raises CheckpointMismatchError before anything is written."""
  restored = manager.restore_latest(spec.abstract)
  if restored is not None:
    start_step, state, data_state = restored
    if data_state.get("train") is not None and hasattr(train_iter, "set_state"):
      try:
        train_iter.set_state(data_state["train"])
      except ValueError as e:
        raise CheckpointMismatchError(
            f"cannot resume {manager.directory} at step {start_step}: {e} Nothing was changed; point "
            "--model_dir at a new directory to train on other data.") from None
    log.info("Resumed from %s at step %d.", manager.step_dir(start_step), start_step)
    return state, start_step, True
  if init_checkpoint and restore_optimizer_state and optimizer.frozen_patterns:
    raise UserError(
        f"restore_optimizer_state=True cannot be combined with frozen parameters "
        f"({optimizer.frozen_patterns}): frozen parameters have no optimizer state, so the pretrained "
        f"state does not fit. Set RESTORE_OPTIMIZER_STATE=False (bind train.restore_optimizer_state) or "
        f"train all parameters (TRAINABLE_PARAMS='all').")
  state = state_lib.init_train_state(model, tx, spec, mesh, random_seed, input_shapes)
  if init_checkpoint:
    source = ckpt_lib.latest_step_dir(init_checkpoint)
    if restore_optimizer_state:
      state, _ = ckpt_lib.restore_train_state(source, spec.abstract)
      what = "parameters, optimizer state and step"
    else:
      state["params"] = ckpt_lib.restore_params(source, spec.abstract["params"])
      what = "parameters"
    msg = f"Loaded the {what} of INIT_CHECKPOINT {source}."
    log.info(msg)
    if jax.process_index() == 0:
      print(f"[train] {msg}", flush=True)
  return state, int(jax.device_get(state["step"])), False


@gin.configurable(denylist=["mesh", "callbacks"])
def train(model: Any = None,
          *,
          model_dir: str = gin.REQUIRED,
          train_steps: int = gin.REQUIRED,
          batch_size: int = gin.REQUIRED,
          task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
          mixture_or_task_name: str | None = None,
          model_type: str | None = None,
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

  Nothing is written to MODEL_DIR until the whole configuration validated, the data source opened, the
  vocabulary fits the model and an existing checkpoint restored (or none exists); see docs/training.md,
  "What happens when things go wrong".

  Args:
    model_dir: where checkpoints, metrics.jsonl, TensorBoard events and config.gin go (MODEL_DIR).
    train_steps: total steps, counting steps already in a resumed checkpoint (TRAIN_STEPS).
    batch_size: global batch size over all processes (BATCH_SIZE).
    task_feature_lengths: {"inputs": Li, "targets": Lt} (TASK_FEATURE_LENGTHS; {"targets": L} for a causal LM).
    model_type: leave None: the feature layout follows the model (stmoe.training.layout); "prefix_lm" may
      be requested for a decoder-only model.
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
  model_dir = os.path.abspath(os.path.expanduser(model_dir)) if model_dir else model_dir
  _check_run_args(model_dir, train_steps, batch_size, num_microbatches, mesh, checkpoint_period, log_period)
  partitioning.validate_mesh(mesh, getattr(model, "config", None), batch_size)
  model_type = layout.resolve_model_type(model, model_type)
  layout.check_feature_lengths(model_type, task_feature_lengths)
  optimizer = optimizer or opt_lib.adafactor()
  is_chief = jax.process_index() == 0

  shard_id, num_shards = partitioning.process_batch_slice(batch_size)
  # The data source first: a missing task or a task that does not fit the model fails before compiling.
  train_iter = input_fn(mixture_or_task_name, task_feature_lengths, batch_size, split="train",
                        model_type=model_type, shuffle=True, seed=random_seed, shard_id=shard_id,
                        num_shards=num_shards, repeat=True)
  check_vocabulary(model, train_iter)
  input_shapes = layout.input_shapes_for(model_type, batch_size, task_feature_lengths)
  logical = model.params_logical_axes(input_shapes)
  abstract_params = jax.eval_shape(
      lambda: model.get_initial_variables(jax.random.PRNGKey(0), input_shapes, None)["params"])
  tx = opt_lib.make_optimizer(optimizer, logical, abstract_params)
  spec = state_lib.state_spec(model, tx, input_shapes, mesh, seed=random_seed)

  in_mesh = lambda: partitioning.mesh_context(mesh)
  manager = ckpt_lib.CheckpointManager(model_dir, keep=keep_checkpoints, async_save=async_checkpointing,
                                       config_text=_operative_config)
  state, start_step, resumed = _restore_or_init(model, tx, spec, mesh, manager, train_iter, optimizer,
                                                input_shapes, random_seed, init_checkpoint,
                                                restore_optimizer_state)
  # Everything validated: from here on MODEL_DIR is written.
  if is_chief:
    os.makedirs(model_dir, exist_ok=True)
    write_run_config(model_dir, _operative_config(), keep_previous=True)

  ctx = TrainContext(model=model, mesh=mesh, spec=spec, model_dir=model_dir, state=state, step=start_step,
                     start_step=start_step, is_chief=is_chief, checkpoints=manager)
  writer = metrics_lib.MetricsWriter(model_dir, enabled=is_chief, resume_step=start_step if resumed else None)
  bar = metrics_lib.ProgressBar(train_steps, start_step, enabled=progress and is_chief)
  train_fn = step_lib.make_train_step(model.loss_fn, tx, optimizer.schedule, num_microbatches)
  eval_fn = step_lib.make_eval_step(model.loss_fn)
  finite_fn = jax.jit(_all_finite)
  jitted_train = jitted_eval = None
  losses: dict[int, float] = {}
  last_scalars: dict[str, float] = {}
  eval_scalars: dict[str, float] = {}
  pending = _PendingMetrics()
  period_tokens, period_t0 = 0, time.time()
  config_rewritten = False
  for cb in callbacks:
    cb.on_train_start(ctx)

  def newest_good() -> str:
    manager.wait()
    kept = manager.all_steps()
    if not kept:
      return "no checkpoint had been saved yet, so a rerun starts from the beginning."
    return (f"the newest finite checkpoint is step {kept[-1]} in {manager.directory} (kept steps: "
            f"{', '.join(map(str, kept))}); a rerun resumes from it.")

  def flush_metrics(step: int) -> None:
    nonlocal period_tokens, period_t0, last_scalars
    if not pending.fetch():
      return
    pending.check_finite(newest_good)
    fetched = pending.items
    for s, m in fetched:
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
    pending.clear()
    period_tokens, period_t0 = 0, time.time()

  def check_before_save(step: int) -> None:
    """The state about to be saved must be finite: this step's loss / grad norm and every parameter."""
    pending.check_finite(newest_good)
    if not bool(jax.device_get(finite_fn(ctx.state))):
      raise TrainingDivergedError(
          f"training diverged at step {step}: the parameters or optimizer state after step {step} are not "
          f"finite (NaN/inf). Nothing from step {step} on was saved; {newest_good()} Lower the learning "
          "rate, enable gradient clipping (OptimizerDef.max_grad_norm) or check the data, then resume.")

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
        pending.add(step, metrics)
        period_tokens += _batch_tokens(batch)
        if step % log_period == 0 or step == train_steps:
          flush_metrics(step)
          bar.update(step, last_scalars.get("loss"))
          if is_chief and not config_rewritten:  # now every configurable of the step has been called
            write_run_config(model_dir, _operative_config(), keep_previous=False)
            config_rewritten = True
        if eval_period and step % eval_period == 0:
          eval_scalars = run_eval(step)
        if step % checkpoint_period == 0 or step == train_steps:
          check_before_save(step)
          manager.save(step, ctx.state, {"train": train_iter.get_state()})
          for cb in callbacks:
            cb.on_checkpoint(ctx, step)
        for cb in callbacks:
          cb.on_step_end(ctx, step)
      flush_metrics(step)
  finally:
    watchdog.close()
    manager.close()
    writer.close()
    bar.close()
  for cb in callbacks:
    cb.on_train_end(ctx)
  return TrainResult(state=ctx.state, step=step, start_step=start_step, losses=losses,
                     last_scalars=last_scalars, eval_scalars=eval_scalars, model_dir=model_dir)
