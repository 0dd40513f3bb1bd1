"""Fine-tuning helpers: which parameters train, and a callback that keeps the best checkpoint by a task metric.

ST-MoE (Zoph et al. 2022, section 4) fine-tunes sparse models with a constant learning rate, more dropout
inside the experts than elsewhere, and found that updating only the non-MoE parameters works about as well
as updating all of them (updating only the MoE parameters hurts). `frozen_patterns_for` turns the
TRAINABLE_PARAMS switch ('all' | 'non_moe' | 'moe_only' | 'attention_only') into the regexes the optimizer freezes
(`OptimizerDef.frozen_patterns`: frozen parameters get no update and no optimizer state).

`TaskEvalCallback` decodes a task split with the task's own postprocessor and seqio metric functions
every time the trainer saves a checkpoint, writes `task_eval/<metric>` to metrics.jsonl, and keeps a copy
of the best checkpoint under MODEL_DIR/best/ (with best_metric.json), swapped in atomically.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from typing import Any, Mapping

import gin

from stmoe.checkpoints import resolve as resolve_lib
from stmoe.training import optimizers as opt_lib
from stmoe.training.trainer import Callback, TrainContext

log = logging.getLogger(__name__)

# Parameters of MoE layers: the router and the experts (everything under a `moe` module). The dense MLP
# that ST-MoE adds beside each MoE layer ("extra_mlp") is a dense parameter.
MOE_PARAM_REGEX = r"(^|/)moe/"
# Everything else: a path that does not contain a `moe/` component.
NON_MOE_PARAM_REGEX = r"^(?!(.*/)?moe/)"
# Everything outside the attention blocks (self- and encoder-decoder attention): frozen by 'attention_only'.
NON_ATTENTION_PARAM_REGEX = r"^(?!.*attention/)"
TRAINABLE_CHOICES = ("all", "non_moe", "moe_only", "attention_only")
BEST_SUBDIR = resolve_lib.BEST_SUBDIR  # MODEL_DIR/best: a step dir that stmoe.checkpoints.resolve knows
BEST_METRIC_FILE = resolve_lib.BEST_METRIC_FILE


def frozen_patterns_for(trainable: str) -> tuple[str, ...]:
  """Regexes of the parameters to FREEZE so that only `trainable` ('all'|'non_moe'|'moe_only'|'attention_only')
  train."""
  if trainable == "all":
    return ()
  if trainable == "non_moe":
    return (MOE_PARAM_REGEX,)
  if trainable == "moe_only":
    return (NON_MOE_PARAM_REGEX,)
  if trainable == "attention_only":
    return (NON_ATTENTION_PARAM_REGEX,)
  raise ValueError(f"TRAINABLE_PARAMS={trainable!r}: use one of {TRAINABLE_CHOICES}.")


@gin.configurable
def finetune_optimizer(learning_rate: float = 1e-3, trainable_params: str = "all", kind: str = "adafactor",
                       **kwargs) -> opt_lib.OptimizerDef:
  """The ST-MoE fine-tuning optimizer: constant `learning_rate` (Adafactor by default), with the
  parameters outside `trainable_params` frozen. Extra kwargs go to OptimizerDef (e.g. decay_rate)."""
  return opt_lib.OptimizerDef(kind=kind, learning_rate=float(learning_rate),
                              frozen_patterns=frozen_patterns_for(trainable_params), **kwargs)


def is_better(value: float, best: float | None, mode: str) -> bool:
  if not math.isfinite(value):
    return False
  if best is None:
    return True
  return value > best if mode == "max" else value < best


def read_best(model_dir: str) -> dict[str, Any] | None:
  """The contents of MODEL_DIR/best/best_metric.json, or None if no best checkpoint was kept yet."""
  path = os.path.join(model_dir, BEST_SUBDIR, BEST_METRIC_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def replace_best(model_dir: str, step_dir: str, record: Mapping[str, Any]) -> str:
  """Copies `step_dir` to MODEL_DIR/best/ with `record` as best_metric.json; readers never see half a copy.

  The copy is written to a temporary sibling and renamed into place; the previous best is renamed aside
  first and deleted last, so at every moment MODEL_DIR/best is either the old or the new checkpoint
  (between the two renames it is briefly absent, never partial).
  """
  best = os.path.join(model_dir, BEST_SUBDIR)
  tmp = tempfile.mkdtemp(prefix=".best-tmp-", dir=model_dir)
  staged = os.path.join(tmp, "best")
  shutil.copytree(step_dir, staged)
  with open(os.path.join(staged, BEST_METRIC_FILE), "w", encoding="utf-8") as f:
    json.dump(dict(record), f, indent=2, sort_keys=True)
  old = None
  if os.path.exists(best):
    old = os.path.join(tmp, "old")
    os.replace(best, old)
  os.replace(staged, best)
  shutil.rmtree(tmp, ignore_errors=True)
  return best


@gin.configurable(denylist=["model_dir"])
class TaskEvalCallback(Callback):
  """Runs task-metric evaluation (decoding) at every checkpoint; keeps the best one under MODEL_DIR/best/.

  Args:
    task: the seqio task to decode (its postprocess_fn and metric_fns define the metrics).
    split: the split to evaluate ("validation").
    task_feature_lengths: {"inputs", "targets"} lengths for decoding (targets = max decode length).
    batch_size: decoding batch size.
    metric: the metric that picks the best checkpoint (e.g. "accuracy"); None keeps no best copy.
    mode: "max" or "min" for `metric`.
    max_examples: evaluate only the first N examples of the split (None: all).
    every_n_checkpoints: evaluate at every n-th checkpoint (the last step is always evaluated).
  """

  def __init__(self, task: str = gin.REQUIRED, split: str = "validation",
               task_feature_lengths: Mapping[str, int] = gin.REQUIRED, batch_size: int = 32,
               metric: str | None = "accuracy", mode: str = "max", max_examples: int | None = None,
               every_n_checkpoints: int = 1, model_dir: str | None = None, verbose: bool = True):
    if mode not in ("max", "min"):
      raise ValueError(f"TaskEvalCallback.mode={mode!r}: use 'max' or 'min'.")
    self.task, self.split = task, split
    self.task_feature_lengths = dict(task_feature_lengths)
    self.batch_size, self.metric, self.mode = batch_size, metric, mode
    self.max_examples, self.every = max_examples, max(1, int(every_n_checkpoints))
    self.model_dir = model_dir
    self.verbose = verbose
    self.history: list[tuple[int, dict[str, float]]] = []
    self.best: dict[str, Any] | None = None
    self._eval_data = None
    self._count = 0
    self._train_steps: int | None = None

  def on_train_start(self, ctx: TrainContext) -> None:
    self.best = read_best(ctx.model_dir)

  def _data(self, ctx: TrainContext):
    if self._eval_data is None:
      from stmoe.data.pipeline import get_eval_dataset

      self._eval_data = get_eval_dataset(self.task, self.split, self.task_feature_lengths, self.batch_size,
                                         max_examples=self.max_examples)
    return self._eval_data

  def evaluate(self, ctx: TrainContext, step: int) -> dict[str, float]:
    """Decodes the split with the current parameters and returns the task's metrics."""
    from stmoe.evaluation import task_metrics as task_eval

    result = task_eval.evaluate_task(ctx.model, ctx.state["params"], self._data(ctx),
                                     max_decode_length=self.task_feature_lengths.get("targets"), progress=False)
    metrics = result.metrics
    self.history.append((step, metrics))
    if ctx.is_chief:
      from stmoe.training import metrics as metrics_lib

      writer = metrics_lib.MetricsWriter(ctx.model_dir)
      writer.write(step, {f"task_eval/{k}": float(v) for k, v in metrics.items()})
      writer.close()
    if self.verbose and ctx.is_chief:
      shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
      print(f"[task eval] step {step}: {self.task}/{self.split}: {shown}", flush=True)
    return metrics

  def on_checkpoint(self, ctx: TrainContext, step: int) -> None:
    self._count += 1
    if self._count % self.every:
      return
    metrics = self.evaluate(ctx, step)
    if self.metric is None:
      return
    if self.metric not in metrics:
      raise KeyError(f"TaskEvalCallback.metric={self.metric!r} is not one of the metrics of task "
                     f"{self.task!r}: {sorted(metrics)}.")
    value = float(metrics[self.metric])
    if not is_better(value, None if self.best is None else self.best["value"], self.mode):
      return
    record = {"metric": self.metric, "mode": self.mode, "value": value, "step": int(step),
              "task": self.task, "split": self.split, "metrics": {k: float(v) for k, v in metrics.items()}}
    if ctx.is_chief and ctx.checkpoints is not None:
      ctx.checkpoints.wait()  # the async save of this step must be complete before it is copied
      step_dir = os.path.join(ctx.checkpoints.directory, str(step))
      if not resolve_lib.is_step_dir(step_dir):
        log.warning("Checkpoint for step %d not found at %s; best checkpoint not updated.", step, step_dir)
        return
      replace_best(ctx.model_dir, step_dir, record)
    self.best = record


@gin.configurable
def train_callbacks(callbacks: tuple[Callback, ...] | list[Callback] = ()) -> list[Callback]:
  """The callbacks a gin file asks `stmoe train` to run, e.g. in runs/finetune.gin:

      train_callbacks.callbacks = [@TaskEvalCallback()]

  (`train()` does not take callbacks from gin directly; the command passes `train_callbacks()`.)
  """
  return list(callbacks)
