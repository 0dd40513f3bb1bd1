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
from stmoe.checkpoints import resolve as resolve_lib
from stmoe import partitioning
from stmoe.errors import CheckpointMismatchError, TrainingDivergedError, UserError
from stmoe.training import distributed
from stmoe.evaluation.loss import EvalLoop
from stmoe.training import layout
from stmoe.training import setup as setup_lib
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


default_model = setup_lib.default_model  # kept here for existing callers
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
                     random_seed: int, init_checkpoint: str | None, restore_optimizer_state: bool,
                     upcycle_from: str | None = None):
  """(state, start_step, resumed): the newest readable checkpoint of MODEL_DIR, else a fresh (or
  INIT_CHECKPOINT-initialised, or upcycled) state. Raises CheckpointMismatchError before anything is written."""
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
  if upcycle_from:  # sparse upcycling: the dense checkpoint becomes step 0 of this sparse run
    if init_checkpoint:
      raise UserError("Set either INIT_CHECKPOINT (train.init_checkpoint) or train.upcycle_from, not both.")
    from stmoe.checkpoints import upcycle as upcycle_lib

    mode = "carry" if restore_optimizer_state else "reset"
    state = upcycle_lib.upcycled_train_state(upcycle_from, model, optimizer, spec, optimizer_state=mode,
                                             seed=random_seed)
    if jax.process_index() == 0:
      print(f"[train] Upcycled {upcycle_from} into the sparse model (optimizer state: {mode}).", flush=True)
    return state, 0, False
  state = state_lib.init_train_state(model, tx, spec, mesh, random_seed, input_shapes)
  if init_checkpoint:
    try:
      location = resolve_lib.resolve(init_checkpoint)
    except FileNotFoundError as e:
      raise UserError(f"INIT_CHECKPOINT: {e}") from None
    if location.is_export:
      raise UserError(f"INIT_CHECKPOINT {init_checkpoint!r} is an export directory; start from the training "
                      "checkpoint it was exported from (its MODEL_DIR or a step directory).")
    source = location.path
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


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """Where batches come from: a task (or mixture) through an input function, at fixed lengths and batch."""

  mixture_or_task_name: str | None
  task_feature_lengths: Mapping[str, int]
  batch_size: int  # global, over all processes
  input_fn: Callable[..., Any] = inputs_lib.seqio_input
  eval_input_fn: Callable[..., Any] | None = None  # default: input_fn
  eval_split: str = "validation"
  seed: int = 0

  def open(self, model_type: str, *, train: bool) -> Any:
    """This process's iterator over the train split (shuffled, repeating) or the eval split (one pass)."""
    shard_id, num_shards = partitioning.process_batch_slice(self.batch_size)
    fn = self.input_fn if train else (self.eval_input_fn or self.input_fn)
    return fn(self.mixture_or_task_name, self.task_feature_lengths, self.batch_size,
              split="train" if train else self.eval_split, model_type=model_type, shuffle=train, seed=self.seed,
              shard_id=shard_id, num_shards=num_shards, repeat=train)


@dataclasses.dataclass(frozen=True)
class LoopSpec:
  """How long to train and how often to log, evaluate and checkpoint."""

  train_steps: int  # total, counting the steps of a resumed checkpoint
  log_period: int = 100
  eval_period: int = 0  # 0: never
  eval_steps: int = 10
  checkpoint_period: int = 1000
  keep_checkpoints: int | None = 3
  async_checkpointing: bool = True
  num_microbatches: int = 1
  progress: bool = True
  step_timeout_s: float | None = 900.0


@dataclasses.dataclass(frozen=True)
class InitSpec:
  """What a run with no checkpoint of its own starts from (fine-tuning: a pretrained checkpoint)."""

  checkpoint: str | None = None
  restore_optimizer_state: bool = False
  upcycle_from: str | None = None  # a dense checkpoint to upcycle (stmoe.checkpoints.upcycle)


@gin.configurable(denylist=["mesh", "callbacks", "compile_only"])
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
          upcycle_from: str | None = None,
          callbacks: Sequence[Callback] = (),
          progress: bool = True,
          step_timeout_s: float | None = 900.0,
          compile_only: bool = False) -> TrainResult:
  """Train `model` (default: the gin-configured one) for `train_steps` steps in total, resuming if possible.

  The gin-facing entry point (t5x's macros bind these arguments); it groups them into a DataSpec, a
  LoopSpec and an InitSpec and calls `run_training`. Nothing is written to MODEL_DIR until the whole
  configuration validated, the data source opened, the vocabulary fits the model and an existing
  checkpoint restored (or none exists); see docs/training.md, "What happens when things go wrong".

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
    upcycle_from: if MODEL_DIR has no checkpoint, start the (sparse) model from this dense checkpoint (an
      stmoe checkpoint or a HF T5 directory) by sparse upcycling (stmoe.checkpoints.upcycle): experts copy
      the dense MLPs, routers start fresh, step 0; restore_optimizer_state=True carries the dense optimizer
      state (expert slots repeated), False resets it. Exclusive with init_checkpoint.
    callbacks: Callback hooks.
    step_timeout_s: multi-process runs exit (status 3) if no step finishes in this many seconds (a dead
      peer must not hang the others); None disables the watchdog.
    compile_only: instead of training, compile the train step ahead of time on `mesh` (which may be a TPU
      topology described on a CPU host) and return the stmoe.training.aot.CompiledStep (`stmoe compile`).
      Nothing is read or written.
  """
  if compile_only:
    from stmoe.training import aot

    return aot.compile_train_step(model if model is not None else setup_lib.default_model(),
                                  mesh if mesh is not None else partitioning.make_mesh(), batch_size=batch_size,
                                  task_feature_lengths=task_feature_lengths,
                                  optimizer=optimizer or opt_lib.adafactor(), num_microbatches=num_microbatches,
                                  model_type=model_type, seed=random_seed)
  data = DataSpec(mixture_or_task_name, task_feature_lengths, batch_size, input_fn, eval_input_fn, eval_split,
                  random_seed)
  loop = LoopSpec(train_steps, log_period, eval_period, eval_steps, checkpoint_period, keep_checkpoints,
                  async_checkpointing, num_microbatches, progress, step_timeout_s)
  return run_training(model, model_dir=model_dir, data=data, loop=loop, optimizer=optimizer, mesh=mesh,
                      model_type=model_type, init=InitSpec(init_checkpoint, restore_optimizer_state, upcycle_from),
                      callbacks=callbacks)


def run_training(model: Any, *, model_dir: str, data: DataSpec, loop: LoopSpec,
                 optimizer: opt_lib.OptimizerDef | None = None, mesh: Mesh | None = None,
                 model_type: str | None = None, init: InitSpec = InitSpec(),
                 callbacks: Sequence[Callback] = ()) -> TrainResult:
  """Validate, set up, restore or initialise, then run the loop (see the module docstring for the order)."""
  model = setup_lib.default_model() if model is None else model
  mesh = partitioning.make_mesh() if mesh is None else mesh
  model_dir = os.path.abspath(os.path.expanduser(model_dir)) if model_dir else model_dir
  _check_run_args(model_dir, loop.train_steps, data.batch_size, loop.num_microbatches, mesh,
                  loop.checkpoint_period, loop.log_period)
  optimizer = optimizer or opt_lib.adafactor()
  setup = setup_lib.setup_run(model, mesh, batch_size=data.batch_size,
                              task_feature_lengths=data.task_feature_lengths, model_type=model_type,
                              optimizer=optimizer, seed=data.seed)
  # The data source first: a missing task or a task that does not fit the model fails before compiling.
  train_iter = data.open(setup.model_type, train=True)
  check_vocabulary(model, train_iter)
  manager = ckpt_lib.CheckpointManager(model_dir, keep=loop.keep_checkpoints, async_save=loop.async_checkpointing,
                                       config_text=_operative_config)
  state, start_step, resumed = _restore_or_init(model, setup.tx, setup.spec, mesh, manager, train_iter, optimizer,
                                                setup.input_shapes, data.seed, init.checkpoint,
                                                init.restore_optimizer_state, init.upcycle_from)
  # Everything validated: from here on MODEL_DIR is written.
  is_chief = jax.process_index() == 0
  if is_chief:
    os.makedirs(model_dir, exist_ok=True)
    write_run_config(model_dir, _operative_config(), keep_previous=True)
  ctx = TrainContext(model=model, mesh=mesh, spec=setup.spec, model_dir=model_dir, state=state, step=start_step,
                     start_step=start_step, is_chief=is_chief, checkpoints=manager)
  return _TrainLoop(ctx, setup, data, loop, optimizer, train_iter, resumed, callbacks).run()


class _TrainLoop:
  """The loop of one run: steps, metric flushes, the NaN guard, periodic evaluation and checkpoints."""

  def __init__(self, ctx: TrainContext, setup: setup_lib.RunSetup, data: DataSpec, loop: LoopSpec,
               optimizer: opt_lib.OptimizerDef, train_iter: Any, resumed: bool, callbacks: Sequence[Callback]):
    self.ctx, self.setup, self.data, self.loop = ctx, setup, data, loop
    self.train_iter, self.callbacks = train_iter, list(callbacks)
    self.manager = ctx.checkpoints
    self.writer = metrics_lib.MetricsWriter(ctx.model_dir, enabled=ctx.is_chief,
                                            resume_step=ctx.start_step if resumed else None)
    self.bar = metrics_lib.ProgressBar(loop.train_steps, ctx.start_step, enabled=loop.progress and ctx.is_chief)
    self.train_fn = step_lib.make_train_step(ctx.model.loss_fn, setup.tx, optimizer.schedule, loop.num_microbatches)
    self.jitted_train = None
    self.eval_loop = EvalLoop(ctx.model, ctx.mesh, setup.param_shardings)
    self.finite_fn = jax.jit(_all_finite)
    self.pending = _PendingMetrics()
    self.losses: dict[int, float] = {}
    self.last_scalars: dict[str, float] = {}
    self.eval_scalars: dict[str, float] = {}
    self.period_tokens, self.period_t0 = 0, time.time()
    self.config_rewritten = False

  def newest_good(self) -> str:
    self.manager.wait()
    kept = self.manager.all_steps()
    if not kept:
      return "no checkpoint had been saved yet, so a rerun starts from the beginning."
    return (f"the newest finite checkpoint is step {kept[-1]} in {self.manager.directory} (kept steps: "
            f"{', '.join(map(str, kept))}); a rerun resumes from it.")

  def flush_metrics(self, step: int) -> None:
    if not self.pending.fetch():
      return
    self.pending.check_finite(self.newest_good)
    fetched = self.pending.items
    for s, m in fetched:
      self.losses[s] = m["loss"]
    elapsed = max(time.time() - self.period_t0, 1e-9)
    keys = fetched[-1][1].keys()
    scalars = {k: float(np.mean([m[k] for _, m in fetched if k in m])) for k in keys}
    scalars["learning_rate"] = fetched[-1][1].get("learning_rate", float("nan"))
    scalars["tokens_per_second"] = self.period_tokens / elapsed
    scalars["steps_per_second"] = len(fetched) / elapsed
    self.writer.write(step, scalars)
    self.last_scalars = scalars
    for cb in self.callbacks:
      cb.on_log(self.ctx, step, scalars)
    self.pending.clear()
    self.period_tokens, self.period_t0 = 0, time.time()

  def check_before_save(self, step: int) -> None:
    """The state about to be saved must be finite: this step's loss / grad norm and every parameter."""
    self.pending.check_finite(self.newest_good)
    if not bool(jax.device_get(self.finite_fn(self.ctx.state))):
      raise TrainingDivergedError(
          f"training diverged at step {step}: the parameters or optimizer state after step {step} are not "
          f"finite (NaN/inf). Nothing from step {step} on was saved; {self.newest_good()} Lower the learning "
          "rate, enable gradient clipping (OptimizerDef.max_grad_norm) or check the data, then resume.")

  def evaluate(self, step: int) -> dict[str, float]:
    it = self.data.open(self.setup.model_type, train=False)
    scalars = self.eval_loop(self.ctx.state["params"], it, self.loop.eval_steps)
    scalars.pop("eval/num_batches", None)
    if scalars:
      self.writer.write(step, scalars)
      for cb in self.callbacks:
        cb.on_eval(self.ctx, step, scalars)
    return scalars

  def train_step(self) -> None:
    ctx, mesh = self.ctx, self.ctx.mesh
    batch = partitioning.make_global_batch(next(self.train_iter), mesh)
    if self.jitted_train is None:
      self.jitted_train = step_lib.jit_train_step(self.train_fn, self.setup.spec.shardings,
                                                  step_lib.batch_shardings(mesh, batch), mesh)
    ctx.state, metrics = self.jitted_train(ctx.state, batch)
    ctx.step += 1
    self.pending.add(ctx.step, metrics)
    self.period_tokens += _batch_tokens(batch)

  def after_step(self, step: int) -> None:
    loop, ctx = self.loop, self.ctx
    if step % loop.log_period == 0 or step == loop.train_steps:
      self.flush_metrics(step)
      self.bar.update(step, self.last_scalars.get("loss"))
      if ctx.is_chief and not self.config_rewritten:  # now every configurable of the step has been called
        write_run_config(ctx.model_dir, _operative_config(), keep_previous=False)
        self.config_rewritten = True
    if loop.eval_period and step % loop.eval_period == 0:
      self.eval_scalars = self.evaluate(step)
    if step % loop.checkpoint_period == 0 or step == loop.train_steps:
      self.check_before_save(step)
      self.manager.save(step, ctx.state, {"train": self.train_iter.get_state()})
      for cb in self.callbacks:
        cb.on_checkpoint(ctx, step)
    for cb in self.callbacks:
      cb.on_step_end(ctx, step)

  def run(self) -> TrainResult:
    ctx = self.ctx
    for cb in self.callbacks:
      cb.on_train_start(ctx)
    watchdog = distributed.StepWatchdog(self.loop.step_timeout_s if jax.process_count() > 1 else None)
    try:
      with partitioning.mesh_context(ctx.mesh):
        while ctx.step < self.loop.train_steps:
          self.train_step()
          watchdog.pet(ctx.step)
          self.after_step(ctx.step)
        self.flush_metrics(ctx.step)
    finally:
      watchdog.close()
      self.manager.close()
      self.writer.close()
      self.bar.close()
    for cb in self.callbacks:
      cb.on_train_end(ctx)
    return TrainResult(state=ctx.state, step=ctx.step, start_step=ctx.start_step, losses=self.losses,
                       last_scalars=self.last_scalars, eval_scalars=self.eval_scalars, model_dir=ctx.model_dir)
