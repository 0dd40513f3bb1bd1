"""`stmoe eval`: loss metrics (and task metrics) of a checkpoint from gin, or task metrics of any checkpoint.

Two modes:

    # loss metrics of the newest checkpoint of a run on a task split (runs/eval.gin), then task metrics
    # (decode + the task's seqio metric fns) for tasks that define any -> MODEL_DIR/eval_results.json
    stmoe eval --gin_file models/st_moe_tiny.gin --gin_file runs/eval.gin \
        --gin.MIXTURE_OR_TASK_NAME="'shakespeare_span_corruption'" --model_dir /tmp/st_moe_tiny
    # task metrics of an export directory or a checkpoint; the model comes from its config.gin
    stmoe eval --checkpoint /tmp/qs/export --task shakespeare_genre [--split validation] [--max_examples N]
    # zero/few-shot priming accuracy (stmoe.evaluation.priming) -> CHECKPOINT/priming_results.json
    stmoe eval --checkpoint /tmp/lm --task shakespeare_cloze --num_shots 0,1,4 [--max_examples N]
"""

from __future__ import annotations

import argparse
import os
from typing import Sequence

from stmoe import gin_utils
from stmoe.cli import common
from stmoe.errors import UserError, run_command

EPILOG = """two modes:
  # loss metrics (and task metrics, for tasks that define them) of the newest checkpoint of a run, from gin
  stmoe eval --gin_file models/st_moe_tiny.gin --gin_file runs/eval.gin \\
      --gin.MIXTURE_OR_TASK_NAME="'shakespeare_span_corruption'" --model_dir /tmp/st_moe_tiny
  # task metrics of an export directory or a checkpoint, no gin files needed (its config.gin is used)
  stmoe eval --checkpoint /tmp/qs/export --task shakespeare_genre [--split validation] [--max_examples N]
      (stmoe eval --checkpoint X --help lists this mode's flags: decoding, lengths, --output, --predictions)
  # zero/few-shot priming: each candidate answer scored after k demonstrations (docs/priming.md); any
  # decoder-only or encoder-decoder checkpoint; tasks: shakespeare_cloze, shakespeare_genre,
  # rotten_tomatoes_polarity, super_glue_{copa,boolq,cb,rte} (with SUPERGLUE_DIR)
  stmoe eval --checkpoint /tmp/lm --task shakespeare_cloze --num_shots 0,1,4 [--max_examples N] [--seed S]
      [--max_length 512] [--output F (default CHECKPOINT/priming_results.json)] [--predictions F.jsonl]"""


def main(argv: Sequence[str] | None = None) -> int:
  """`stmoe eval`: loss metrics of a checkpoint on a task split (runs/eval.gin), or with --checkpoint the
  task metrics of an export directory / checkpoint."""
  return run_command("stmoe eval", _main, list(argv or []))


def _main(argv: list[str]) -> int:
  if any(a == "--checkpoint" or a.startswith("--checkpoint=") for a in argv):
    return _checkpoint_mode(argv)
  return _gin_mode(argv)


def _gin_mode(argv: list[str]) -> int:
  prog = "stmoe eval"
  args = common.start_run(prog, "Evaluate a checkpoint on a seqio task or mixture split.", argv, EPILOG)
  import jax

  from stmoe.checkpoints import export as export_lib
  from stmoe.evaluation import task_metrics
  from stmoe.evaluation.loss import evaluate
  from stmoe.training import setup as setup_lib

  scalars = common.call_configured(evaluate)
  if jax.process_index() == 0:
    for k in sorted(scalars):
      if "/layer_" not in k:
        print(f"{k} = {scalars[k]:.6g}")
  name = common.query_macro("MIXTURE_OR_TASK_NAME")
  if not (name and jax.process_count() == 1 and task_metrics.tasks_with_metrics(name)):
    return 0
  # Task metrics (decode + the task's seqio metric fns) for tasks that define any; MODEL_DIR/eval_results.json.
  model_dir = common.query_macro("MODEL_DIR")
  path = common.query_macro("CHECKPOINT_PATH") or model_dir
  split = common.query_macro("EVAL_SPLIT") or "validation"
  model = setup_lib.default_model()
  params, step = export_lib.restore_for_model(model, path)
  results = task_metrics.score_tasks(model, params, name, split, dict(common.query_macro("TASK_FEATURE_LENGTHS")),
                                     batch_size=int(common.query_macro("BATCH_SIZE") or 32),
                                     progress=not args.no_progress)
  out = os.path.join(model_dir or path, "eval_results.json")
  task_metrics.write_results(out, {"checkpoint": os.path.abspath(path), "step": step, "split": split,
                                   "loss_metrics": dict(scalars),
                                   "task_metrics": {t: r.metrics for t, r in results.items()}})
  for task, r in results.items():
    for k, v in sorted(r.metrics.items()):
      print(f"{task}/{k} = {v:.6g}")
  print(f"{prog}: wrote {out}")
  return 0


def _checkpoint_mode(argv: list[str]) -> int:
  """`stmoe eval --checkpoint DIR --task NAME`: task metrics of an export dir or a checkpoint, as JSON.

  The model comes from the directory's config.gin (export dirs and MODEL_DIRs have one) or from --gin_file.
  """
  from stmoe.checkpoints import export as export_lib
  from stmoe.evaluation import task_metrics

  parser = argparse.ArgumentParser(prog="stmoe eval", description=_checkpoint_mode.__doc__, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True, help="export directory or training checkpoint/MODEL_DIR")
  parser.add_argument("--task", required=True, help="a seqio task or mixture (its tasks with metrics are scored)")
  parser.add_argument("--split", default="validation")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--inputs_length", type=int, default=512)
  parser.add_argument("--targets_length", type=int, default=64)
  parser.add_argument("--max_examples", type=int, default=None)
  parser.add_argument("--output", default=None, help="results JSON (default: CHECKPOINT/eval_results.json)")
  parser.add_argument("--predictions", default=None, help="also write the predictions of each task as JSONL here")
  parser.add_argument("--no_progress", action="store_true")
  parser.add_argument("--num_shots", default=None,
                      help="zero/few-shot priming instead of decoding: comma-separated numbers of demonstrations, "
                           "e.g. 0,1,4 (docs/priming.md); --seed picks the demonstrations")
  parser.add_argument("--max_length", type=int, default=512,
                      help="priming: tokens per scored sequence (decoder-only) or encoder input (encoder-decoder); "
                           "longer prompts lose tokens on the left")
  common.add_decode_flags(parser)
  gin_utils.add_gin_flags(parser)
  args, bindings = gin_utils.parse_known_gin_args(parser, list(argv))
  shots = _parse_shots(args.num_shots) if args.num_shots is not None else None
  if shots is not None:
    from stmoe.evaluation import priming

    priming.priming_task(args.task)  # an unknown task fails before the checkpoint is read
  loaded = export_lib.load(args.checkpoint, args.gin_file, bindings)
  if loaded.vocab_path:
    from stmoe.data import vocab

    vocab.set_vocabulary_path(loaded.vocab_path)
  if shots is not None:
    return _priming_mode(args, loaded, shots)
  cfg = common.decode_config_from_args(args, args.targets_length)
  lengths = {"inputs": args.inputs_length, "targets": args.targets_length}
  results = task_metrics.score_tasks(loaded.model, loaded.params, args.task, args.split, lengths,
                                     batch_size=args.batch_size, max_examples=args.max_examples,
                                     decode_config=cfg, seed=args.seed, progress=not args.no_progress)
  if not results:
    from stmoe.evaluation import priming

    hint = (" It is a priming task: add --num_shots 0 (or 0,1,4) to score its candidate answers."
            if args.task in priming.priming_task_names() else "")
    raise UserError(f"{args.task!r} has no task with metric functions: stmoe eval --checkpoint scores tasks "
                    f"by their seqio metrics (use the gin mode for loss metrics).{hint}")
  records = []
  for task, r in results.items():
    records += [{"task": task, **rec} for rec in r.records()]
    for k, v in sorted(r.metrics.items()):
      print(f"{task}/{args.split} {k} = {v:.6g}")
  from stmoe.checkpoints import resolve as resolve_lib

  out = args.output or os.path.join(resolve_lib.resolve(loaded.source).base_dir, "eval_results.json")
  task_metrics.write_results(out, {"checkpoint": loaded.source, "step": loaded.step, "split": args.split,
                                   "task_metrics": {t: r.metrics for t, r in results.items()}})
  if args.predictions:
    task_metrics.write_predictions(args.predictions, records)
  print(f"stmoe eval: wrote {out}")
  return 0


def _parse_shots(text: str) -> list[int]:
  """'0,1,4' -> [0, 1, 4]; anything else is a UserError naming the flag."""
  try:
    shots = [int(part) for part in text.split(",") if part.strip()]
  except ValueError:
    shots = []
  if not shots or any(k < 0 for k in shots):
    raise UserError(f"--num_shots {text!r}: give comma-separated non-negative integers, e.g. --num_shots 0,1,4.")
  return shots


def _priming_mode(args: argparse.Namespace, loaded, shots: list[int]) -> int:
  """`--num_shots`: priming accuracy per k (stmoe.evaluation.priming), printed, as JSON and optional JSONL."""
  from stmoe.checkpoints import resolve as resolve_lib
  from stmoe.evaluation import priming, task_metrics

  result = priming.evaluate_priming(loaded.model, loaded.params, args.task, split=args.split, shots=shots,
                                    seed=args.seed, max_examples=args.max_examples, batch_size=args.batch_size,
                                    max_length=args.max_length, vocabulary=loaded.vocab_path,
                                    progress=not args.no_progress)
  for k, stats in result["shots"].items():
    print(f"{args.task}/{args.split} k={k} accuracy = {stats['accuracy']:.4f} (length-normalised "
          f"{stats['accuracy_length_normalized']:.4f}, calibrated {stats['accuracy_calibrated']:.4f}, chance "
          f"{stats['chance']:.4f}, {stats['num_examples']} examples, {stats['num_truncated']} truncated)")
  out = args.output or os.path.join(resolve_lib.resolve(loaded.source).base_dir, "priming_results.json")
  summary = {key: value for key, value in result.items() if key != "records"}
  task_metrics.write_results(out, {"checkpoint": loaded.source, "step": loaded.step, **summary})
  if args.predictions:
    task_metrics.write_predictions(args.predictions, result["records"])
  print(f"stmoe eval: wrote {out}")
  return 0
