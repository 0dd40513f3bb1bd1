"""Training and evaluating the runs of an experiment: one model variant ("arm") x one seed per run.

An arm is a list of gin files and bindings (`['models/moe_lm_tiny.gin', 'NUM_EXPERTS = 16']`): entries that
end in ".gin" are files, the others bindings. `train_run` parses them in an isolated gin scope (the
experiment's own configuration is untouched), builds the model and calls the same `stmoe.training.trainer`
as `stmoe train`, so every run has a MODEL_DIR with checkpoints, metrics.jsonl and config.gin, and an
interrupted experiment resumes from the newest checkpoint of each run. `evaluate_checkpoints` then scores
every kept checkpoint of a run on fixed held-out batches of any number of tasks (the curves of a plot).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from stmoe.errors import UserError

RUN_RESULT_FILE = "run_result.json"  # written last in a run's MODEL_DIR: the run (and its evaluation) finished


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """What every run of an experiment shares (the arm decides the model)."""
  task: str
  feature_lengths: Mapping[str, int]
  train_steps: int
  batch_size: int
  learning_rate: float = 0.01  # Adafactor with this constant rate (T5's rsqrt schedule is flat for 10k steps)
  checkpoint_period: int = 100  # also the spacing of the evaluated points of the curves
  log_period: int = 10
  optimizer: str = "adafactor"  # "adafactor" | "adamw"
  warmup_steps: int = 0
  optimizer_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # more OptimizerDef fields

  def to_json(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "feature_lengths": dict(self.feature_lengths),
            "optimizer_options": dict(self.optimizer_options)}


def split_arm(spec: Sequence[str]) -> tuple[list[str], list[str]]:
  """(gin files, bindings) of an arm specification."""
  if isinstance(spec, str):
    raise UserError(f"an arm is a list of gin files and bindings, got the string {spec!r}: write [{spec!r}].")
  files = [s for s in spec if s.strip().endswith(".gin")]
  bindings = [s for s in spec if not s.strip().endswith(".gin")]
  if not files:
    raise UserError(f"the arm {list(spec)} names no model gin file (e.g. 'models/moe_lm_tiny.gin').")
  return files, bindings


def arm_model(spec: Sequence[str]) -> tuple[Any, str]:
  """(model, operative gin text) of an arm; call inside `gin_utils.isolated()`."""
  import gin

  from stmoe import gin_utils

  files, bindings = split_arm(spec)
  gin_utils.parse_gin(files, bindings, check_macros=False)
  model = gin_utils.configured_model()
  return model, gin.config_str()


def model_flops(spec: Sequence[str], feature_lengths: Mapping[str, int]) -> dict[str, float]:
  """`stmoe info`'s parameter counts and training FLOPs per token of an arm at the experiment's lengths."""
  from stmoe import gin_utils
  from stmoe.models.info import model_facts

  with gin_utils.isolated():
    model, _ = arm_model(spec)
    facts = model_facts(model, int(feature_lengths.get("inputs", 0)), int(feature_lengths["targets"]))
  return {"total_params": facts.total_params, "active_params_per_token": facts.active_params_per_token,
          "flops_per_token": facts.flops_per_token}


def make_optimizer(settings: TrainSettings):
  """The OptimizerDef of a run: `settings.optimizer` with a constant rate (after an optional linear warm-up)
  and `settings.optimizer_options` (any OptimizerDef field: clipping_threshold, frozen_patterns, ...)."""
  from stmoe.training import optimizers, schedules

  lr = schedules.constant(settings.learning_rate)
  if settings.warmup_steps:
    lr = schedules.linear(settings.learning_rate, decay_steps=1, end_learning_rate=settings.learning_rate,
                          warmup_steps=settings.warmup_steps)
  try:
    return optimizers.OptimizerDef(kind=settings.optimizer, learning_rate=lr, **dict(settings.optimizer_options))
  except (TypeError, ValueError) as e:
    raise UserError(f"the experiment's optimizer settings are invalid: {e}") from None


def run_dir(output_dir: str, arm: str, seed: int) -> str:
  return os.path.join(output_dir, "runs", arm, f"seed_{seed}")


def read_run_result(model_dir: str) -> dict[str, Any] | None:
  path = os.path.join(model_dir, RUN_RESULT_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_json_atomic(path: str, obj: Any) -> None:
  """JSON written to a temporary file, then renamed: a reader never sees half a file."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True, default=_json_default)
    f.write("\n")
  os.replace(tmp, path)


def _json_default(x: Any) -> Any:
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def train_run(spec: Sequence[str], settings: TrainSettings, model_dir: str, seed: int, *, progress: bool = True,
              model_overrides: Callable[[Any], Any] | None = None, keep_checkpoints: int | None = None,
              init_checkpoint: str | None = None, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
  """Trains (or resumes, or finds finished) one run; returns {"diverged", "message", "step", "seconds"}.

  A run that diverges (NaN/Inf loss or parameters: `TrainingDivergedError`) is a result of the experiment,
  not an error: it is reported with the step it diverged at. `keep_checkpoints=None` keeps every
  checkpoint (the curves evaluate each of them).
  """
  import time

  from stmoe import gin_utils
  from stmoe.errors import TrainingDivergedError
  from stmoe.training import trainer

  t0 = time.time()
  with gin_utils.isolated():
    model, _ = arm_model(spec)
    if model_overrides is not None:
      model = model_overrides(model)
    try:
      result = trainer.train(model, model_dir=model_dir, train_steps=settings.train_steps,
                             batch_size=settings.batch_size, task_feature_lengths=dict(settings.feature_lengths),
                             mixture_or_task_name=settings.task, optimizer=make_optimizer(settings), random_seed=seed,
                             checkpoint_period=settings.checkpoint_period, keep_checkpoints=keep_checkpoints,
                             log_period=settings.log_period, progress=progress, init_checkpoint=init_checkpoint,
                             callbacks=callbacks)
    except TrainingDivergedError as e:
      found = re.search(r"diverged at step (\d+)", str(e))
      return {"diverged": True, "message": str(e), "step": int(found.group(1)) if found else None,
              "seconds": time.time() - t0}
  return {"diverged": False, "message": "", "step": result.step, "seconds": time.time() - t0}


def train_all(ctx: Any, arms: Mapping[str, Sequence[str]], settings: Callable[[str], TrainSettings], *,
              after: Callable[[str, int, str, dict[str, Any]], dict[str, Any]] | None = None,
              done: Callable[[dict[str, Any]], bool] = lambda record: True,
              train_kwargs: Callable[[str, int], dict[str, Any]] = lambda arm, seed: {}) -> list[dict[str, Any]]:
  """Every (seed, arm) run of an experiment, seed-major: trained, resumed, or read back when finished.

  `settings(arm)` gives each arm's TrainSettings; `after(arm, seed, model_dir, trained)` adds the run's
  evaluation to its record, which is written last as MODEL_DIR/run_result.json, so an interrupted
  experiment redoes only unfinished runs. A record that `done` rejects (e.g. trained but not evaluated) is
  redone (training then resumes from its checkpoint, i.e. does nothing).
  """
  records = []
  jobs = [(seed, arm) for seed in ctx.seeds for arm in arms]
  for i, (seed, arm) in enumerate(jobs):
    model_dir = run_dir(ctx.output_dir, arm, seed)
    record = read_run_result(model_dir)
    if record is not None and done(record):
      records.append(record)
      continue
    s = settings(arm)
    ctx.stage(i, len(jobs), f"{arm} seed {seed}: train {s.train_steps} steps (resumes if interrupted)")
    trained = train_run(arms[arm], s, model_dir, seed, progress=ctx.progress, **train_kwargs(arm, seed))
    record = {"arm": arm, "seed": seed, "model_dir": model_dir, "train": trained, "settings": s.to_json()}
    if after is not None:
      record.update(after(arm, seed, model_dir, trained))
    write_json_atomic(os.path.join(model_dir, RUN_RESULT_FILE), record)
    records.append(record)
  return records


def metric_series(model_dir: str, key: str) -> dict[str, list[float]]:
  """{"step": [...], key: [...]} of one logged training metric (e.g. experts/router_max_abs_logit)."""
  rows = [r for r in read_metrics(model_dir) if isinstance(r.get(key), (int, float))]
  return {"step": [int(r["step"]) for r in rows], key: [float(r[key]) for r in rows]}


def checkpoint_steps(model_dir: str) -> list[int]:
  from stmoe.checkpoints import resolve

  return [s for s, _ in resolve.step_dirs(os.path.join(model_dir, "checkpoints"))]


@dataclasses.dataclass
class HeldOut:
  """Fixed, materialised evaluation batches of one task split (the same for every run and checkpoint)."""
  name: str
  task: str
  split: str
  batches: list[dict[str, np.ndarray]]

  @property
  def num_tokens(self) -> int:
    return int(sum(np.sum(b["decoder_loss_weights"] > 0) for b in self.batches))


def held_out_batches(name: str, task: str, split: str, feature_lengths: Mapping[str, int], batch_size: int,
                     num_batches: int, model_type: str) -> HeldOut:
  """The first `num_batches` batches of a split, unshuffled (an error if the split has none)."""
  from stmoe.training import inputs as inputs_lib

  it = inputs_lib.seqio_input(task, dict(feature_lengths), batch_size, split=split, model_type=model_type,
                              shuffle=False, seed=0, repeat=False)
  batches = []
  for batch in it:
    batches.append({k: np.asarray(v) for k, v in batch.items()})
    if len(batches) >= num_batches:
      break
  if not batches:
    raise UserError(f"the held-out set {name!r} ({task}/{split}) produced no batches.")
  return HeldOut(name, task, split, batches)


def evaluate_checkpoints(spec: Sequence[str], model_dir: str, held_out: Sequence[HeldOut], batch_size: int,
                         feature_lengths: Mapping[str, int], steps: Sequence[int] | None = None,
                         metrics: Sequence[str] = ("cross_entropy",)) -> dict[str, dict[str, list[float]]]:
  """{held-out name: {"step": [...], metric: [...]}} for every (or the given) checkpoint of a run.

  The model is rebuilt from the arm, the parameters of each checkpoint restored and run through the one
  eval loop (`stmoe.evaluation.loss.EvalLoop`, deterministic, eval capacity factor). A checkpoint whose
  parameters are not finite scores NaN.
  """
  from stmoe import checkpoints as ckpt_lib
  from stmoe import gin_utils
  from stmoe.evaluation.loss import EvalLoop
  from stmoe.training import setup as setup_lib

  steps = list(steps) if steps is not None else checkpoint_steps(model_dir)
  out: dict[str, dict[str, list[float]]] = {h.name: {"step": [], **{m: [] for m in metrics}} for h in held_out}
  with gin_utils.isolated():
    model, _ = arm_model(spec)
    setup = setup_lib.setup_run(model, None, batch_size=batch_size, task_feature_lengths=dict(feature_lengths))
    loop = EvalLoop(setup.model, setup.mesh, setup.param_shardings)
    for step in steps:
      path = os.path.join(model_dir, "checkpoints", str(step))
      params = ckpt_lib.restore_params(path, setup.abstract_params)
      for h in held_out:
        scalars = loop(params, h.batches)
        out[h.name]["step"].append(int(step))
        for m in metrics:
          out[h.name][m].append(float(scalars.get(f"eval/{m}", math.nan)))
  return out


def restore_arm(spec: Sequence[str], checkpoint: str, batch_size: int,
                feature_lengths: Mapping[str, int]) -> tuple[Any, Any]:
  """(model, parameters) of an arm from one of its checkpoints (one device; evaluation and priming)."""
  from stmoe import checkpoints as ckpt_lib
  from stmoe import gin_utils
  from stmoe.training import setup as setup_lib

  with gin_utils.isolated():
    model, _ = arm_model(spec)
    setup = setup_lib.setup_run(model, None, batch_size=batch_size, task_feature_lengths=dict(feature_lengths))
    params = ckpt_lib.restore_params(checkpoint, setup.abstract_params)
  return setup.model, params


def read_metrics(model_dir: str) -> list[dict[str, Any]]:
  """The rows of a run's metrics.jsonl (training and eval scalars by step)."""
  path = os.path.join(model_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        rows.append(json.loads(line))
  return rows
