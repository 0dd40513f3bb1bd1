"""`stmoe train` and `stmoe eval`: flags -> gin -> `train()` / `evaluate()`.

    stmoe train --gin_file models/st_moe_tiny.gin --gin_file runs/pretrain.gin \
        --gin.MIXTURE_OR_TASK_NAME="'shakespeare_span_corruption'" --gin.TRAIN_STEPS=1000 --model_dir /tmp/run
    stmoe eval --gin_file models/st_moe_tiny.gin --gin_file runs/eval.gin --model_dir /tmp/run ...

Flags: --gin_file (repeatable), --gin.NAME=VALUE and --gin_bindings 'NAME=VALUE' (repeatable),
--gin_search_paths (the shipped gin/ folder is always searched), --model_dir (binds MODEL_DIR),
--coordinator_address/--num_processes/--process_id (multi-process), --no_progress.
Errors a user can fix (stmoe.errors.UserError: unknown gin names, impossible meshes, missing tasks, a
checkpoint that does not fit the model, ...) print one line and exit with status 2 instead of a traceback
(--debug shows it); a diverged run exits 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from stmoe import gin_utils
from stmoe.errors import UserError, run_command
from stmoe.training import distributed


TRAIN_EXAMPLES = """examples:
  # pretrain a tiny ST-MoE with span corruption on the bundled Shakespeare text
  stmoe train --gin_file models/st_moe_tiny.gin --gin_file runs/pretrain.gin \\
      --gin.MIXTURE_OR_TASK_NAME="'shakespeare_span_corruption'" --gin.TRAIN_STEPS=200 \\
      --gin.BATCH_SIZE=16 "--gin.TASK_FEATURE_LENGTHS={'inputs': 128, 'targets': 32}" --model_dir /tmp/st_moe_tiny
  # a decoder-only top-2 MoE language model (the feature layout follows the model)
  stmoe train --gin_file models/moe_lm_tiny.gin --gin_file runs/pretrain.gin \\
      --gin.MIXTURE_OR_TASK_NAME="'shakespeare_lm'" "--gin.TASK_FEATURE_LENGTHS={'targets': 64}" --model_dir /tmp/lm
  # rerunning the same command resumes from the newest checkpoint in --model_dir

errors you can fix print one line and exit 2 (a diverged run: 1); --debug shows the traceback.
See docs/training.md ("What happens when things go wrong")."""

EVAL_EXAMPLES = """two modes:
  # loss metrics (and task metrics, for tasks that define them) of the newest checkpoint of a run, from gin
  stmoe eval --gin_file models/st_moe_tiny.gin --gin_file runs/eval.gin \\
      --gin.MIXTURE_OR_TASK_NAME="'shakespeare_span_corruption'" --model_dir /tmp/st_moe_tiny
  # task metrics of an export directory or a checkpoint, no gin files needed (its config.gin is used)
  stmoe eval --checkpoint /tmp/qs/export --task shakespeare_genre [--split validation] [--max_examples N]
      (stmoe eval --checkpoint X --help lists this mode's flags: decoding, lengths, --output, --predictions)"""


def _parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  gin_utils.add_gin_flags(parser)
  parser.add_argument("--model_dir", default=None, help="output directory (binds the MODEL_DIR macro)")
  parser.add_argument("--coordinator_address", default=None, help="HOST:PORT of process 0 (multi-process)")
  parser.add_argument("--num_processes", type=int, default=None, help="number of processes (multi-process)")
  parser.add_argument("--process_id", type=int, default=None, help="this process's index (multi-process)")
  parser.add_argument("--heartbeat_timeout_s", type=int, default=distributed.DEFAULT_HEARTBEAT_TIMEOUT_S,
                      help="seconds without a heartbeat before a peer counts as dead (multi-process)")
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")
  parser.add_argument("--debug", action="store_true", help="show tracebacks of configuration errors")
  return parser


def _setup(prog: str, description: str, argv: Sequence[str], epilog: str | None = None):
  parser = _parser(prog, description, epilog)
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


def _missing_binding(error: Exception) -> gin_utils.GinConfigError | None:
  """gin's "missing required argument" TypeErrors as a user error naming the binding to add."""
  text = str(error)
  if "gin" in text.lower() or "required" in text.lower():
    return gin_utils.GinConfigError(f"{text}. Bind the missing value with --gin.NAME=VALUE.")
  return None


def train_main(argv: Sequence[str]) -> int:
  """`stmoe train`: parse flags and gin, print the config, run train() (which writes MODEL_DIR/config.gin
  only once everything validated)."""
  return run_command("stmoe train", _train, list(argv))


def _train(argv: list[str]) -> int:
  prog = "stmoe train"
  args = _setup(prog, "Train (pretrain or fine-tune) a model from gin files.", argv, TRAIN_EXAMPLES)
  import gin
  import jax

  from stmoe.training import finetune, trainer

  if jax.process_index() == 0:
    print("# gin config (the operative config is written to MODEL_DIR/config.gin once the run validated)")
    print(gin.config_str())
  try:
    # Hooks from gin (e.g. runs/finetune.gin: train_callbacks.callbacks = [@TaskEvalCallback()]).
    result = trainer.train(progress=not args.no_progress, callbacks=finetune.train_callbacks())
  except (TypeError, ValueError) as e:
    if isinstance(e, UserError) or _missing_binding(e) is None:
      raise
    raise _missing_binding(e) from e
  if jax.process_index() == 0:
    final = {k: v for k, v in result.last_scalars.items() if k in ("loss", "accuracy", "tokens_per_second")}
    print(f"{prog}: finished at step {result.step}: {final}")
  return 0


def eval_main(argv: Sequence[str]) -> int:
  """`stmoe eval`: loss metrics of a checkpoint on a task split (runs/eval.gin), or with --checkpoint the
  task metrics of an export directory / checkpoint."""
  return run_command("stmoe eval", _eval, list(argv))


def _eval(argv: list[str]) -> int:
  prog = "stmoe eval"
  if any(a == "--checkpoint" or a.startswith("--checkpoint=") for a in argv):
    # `stmoe eval --checkpoint DIR --task NAME`: task metrics of an export dir or checkpoint (no gin files).
    from stmoe.training import task_eval

    return task_eval.eval_main(argv)
  args = _setup(prog, "Evaluate a checkpoint on a seqio task or mixture split.", argv, EVAL_EXAMPLES)
  import jax

  from stmoe.training.evaluate import evaluate

  try:
    scalars = evaluate()
  except FileNotFoundError as e:
    raise UserError(str(e)) from e
  except (TypeError, ValueError) as e:
    if isinstance(e, UserError) or _missing_binding(e) is None:
      raise
    raise _missing_binding(e) from e
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
