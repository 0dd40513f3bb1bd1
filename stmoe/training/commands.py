"""`stmoe train` and `stmoe eval`: flags -> gin -> `train()` / `evaluate()`.

    stmoe train --gin_file models/st_moe_tiny.gin --gin_file runs/pretrain.gin \
        --gin.MIXTURE_OR_TASK_NAME="'shakespeare_span_corruption'" --gin.TRAIN_STEPS=1000 --model_dir /tmp/run
    stmoe eval --gin_file models/st_moe_tiny.gin --gin_file runs/eval.gin --model_dir /tmp/run ...

Flags: --gin_file (repeatable), --gin.NAME=VALUE and --gin_bindings 'NAME=VALUE' (repeatable),
--gin_search_paths (the shipped gin/ folder is always searched), --model_dir (binds MODEL_DIR),
--coordinator_address/--num_processes/--process_id (multi-process), --no_progress.
Errors a user can fix (unknown gin names, impossible meshes, missing tasks) print one clear message and
exit with status 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from stmoe import gin_utils
from stmoe.training import distributed


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog=prog, description=description)
  gin_utils.add_gin_flags(parser)
  parser.add_argument("--model_dir", default=None, help="output directory (binds the MODEL_DIR macro)")
  parser.add_argument("--coordinator_address", default=None, help="HOST:PORT of process 0 (multi-process)")
  parser.add_argument("--num_processes", type=int, default=None, help="number of processes (multi-process)")
  parser.add_argument("--process_id", type=int, default=None, help="this process's index (multi-process)")
  parser.add_argument("--heartbeat_timeout_s", type=int, default=distributed.DEFAULT_HEARTBEAT_TIMEOUT_S,
                      help="seconds without a heartbeat before a peer counts as dead (multi-process)")
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")
  return parser


def _setup(prog: str, description: str, argv: Sequence[str]):
  parser = _parser(prog, description)
  args, bindings = gin_utils.parse_known_gin_args(parser, argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "orbax", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  distributed.initialize(distributed.DistributedArgs(args.coordinator_address, args.num_processes,
                                                     args.process_id, args.heartbeat_timeout_s))
  if args.model_dir:
    bindings.append(f"MODEL_DIR = {os.path.abspath(os.path.expanduser(args.model_dir))!r}")
  # Register every configurable a run file may bind before parsing.
  import stmoe.training.evaluate  # noqa: F401
  import stmoe.training.finetune  # noqa: F401  (finetune_optimizer, train_callbacks, TaskEvalCallback)
  import stmoe.training.trainer  # noqa: F401

  gin_utils.parse_gin(args.gin_file, bindings, args.gin_search_paths)
  return args


def _user_errors():
  from stmoe.partitioning import MeshConfigError
  from stmoe.training.inputs import MissingTaskError

  return (gin_utils.GinConfigError, MeshConfigError, MissingTaskError)


def _fail(prog: str, error: Exception) -> int:
  print(f"{prog}: error: {error}", file=sys.stderr)
  return 2


def _save_config(model_dir: str | None, text: str) -> None:
  import jax

  if model_dir and jax.process_index() == 0:
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, "config.gin"), "w", encoding="utf-8") as f:
      f.write(text)


def _model_dir() -> str | None:
  import gin

  try:
    return gin.query_parameter("%MODEL_DIR")
  except ValueError:
    return None


def train_main(argv: Sequence[str]) -> int:
  """`stmoe train`: parse flags and gin, print + save the config, run train()."""
  prog = "stmoe train"
  try:
    args = _setup(prog, "Train (pretrain or fine-tune) a model from gin files.", argv)
  except gin_utils.GinConfigError as e:
    return _fail(prog, e)
  import gin
  import jax

  from stmoe.training import finetune, trainer

  if jax.process_index() == 0:
    print("# gin config (operative config is written to MODEL_DIR/config.gin after the first step)")
    print(gin.config_str())
  _save_config(_model_dir(), gin.config_str())
  try:
    # Hooks from gin (e.g. runs/finetune.gin: train_callbacks.callbacks = [@TaskEvalCallback()]).
    result = trainer.train(progress=not args.no_progress, callbacks=finetune.train_callbacks())
  except _user_errors() as e:
    return _fail(prog, e)
  except (TypeError, ValueError) as e:
    if "gin" in str(e).lower() or "required" in str(e).lower():
      return _fail(prog, gin_utils.GinConfigError(f"{e}. Bind the missing value with --gin.NAME=VALUE."))
    raise
  if jax.process_index() == 0:
    final = {k: v for k, v in result.last_scalars.items() if k in ("loss", "accuracy", "tokens_per_second")}
    print(f"{prog}: finished at step {result.step}: {final}")
  return 0


def eval_main(argv: Sequence[str]) -> int:
  """`stmoe eval`: loss metrics of a checkpoint on a task split (runs/eval.gin)."""
  prog = "stmoe eval"
  if any(a == "--checkpoint" or a.startswith("--checkpoint=") for a in argv):
    # `stmoe eval --checkpoint DIR --task NAME`: task metrics of an export dir or checkpoint (no gin files).
    from stmoe.training import task_eval

    return task_eval.eval_main(argv)
  try:
    args = _setup(prog, "Evaluate a checkpoint on a seqio task or mixture split.", argv)
  except gin_utils.GinConfigError as e:
    return _fail(prog, e)
  import jax

  from stmoe.training.evaluate import evaluate

  try:
    scalars = evaluate()
  except _user_errors() as e:
    return _fail(prog, e)
  except FileNotFoundError as e:
    return _fail(prog, e)
  if jax.process_index() == 0:
    for k in sorted(scalars):
      if "/layer_" not in k:
        print(f"{k} = {scalars[k]:.6g}")
  # Task metrics (decode + the task's seqio metric fns) for tasks that define any; MODEL_DIR/eval_results.json.
  from stmoe.training import task_eval

  name = task_eval.query_macro("MIXTURE_OR_TASK_NAME")
  if name and jax.process_count() == 1 and task_eval.tasks_with_metrics(name):
    payload = task_eval.task_metrics_from_gin(scalars, progress=not args.no_progress)
    for task, metrics in payload["task_metrics"].items():
      for k, v in sorted(metrics.items()):
        print(f"{task}/{k} = {v:.6g}")
    print(f"{prog}: wrote {payload['output']}")
  return 0
