"""`stmoe infer`: decode predictions for a task split or for a JSONL/TSV file of inputs, written as JSONL.

    # a task split (also prints and writes the task's metrics: OUTPUT.metrics.json)
    stmoe infer --checkpoint /tmp/qs/export --task shakespeare_genre --split validation --output preds.jsonl
    # your own inputs: JSONL with an "inputs" (or "input"/"text") field and optional "targets", or TSV
    # (input TAB optional target); the text is used as is (add the task's prefix, e.g. --prefix 'genre passage: ')
    stmoe infer --checkpoint /tmp/qs/export --input_file my.jsonl --output preds.jsonl --prefix 'genre passage: '

--checkpoint takes an export directory (`stmoe export`) or a training checkpoint (MODEL_DIR, a step dir,
MODEL_DIR/best). Each output line is {"input", "prediction"[, "target"]}. Decoding: --method greedy (default),
sample (--temperature, --top_k, --seed) or beam (--beam_size, --length_penalty); MoE layers run with the
eval capacity factor.
"""

from __future__ import annotations

import argparse
import os

from stmoe import gin_utils
from stmoe.cli.common import add_decode_flags, decode_config_from_args
from stmoe.errors import UserError, run_command

__all__ = ["add_decode_flags", "decode_config_from_args", "main"]


def main(argv: list[str] | None = None) -> int:
  """`stmoe infer`: decode predictions for a task split or a JSONL/TSV file; write JSONL."""
  return run_command("stmoe infer", _main, list(argv or []))


def _check_output(output: str, input_file: str | None) -> None:
  """The predictions file must not be the input file, nor an existing directory."""
  if os.path.isdir(output):
    raise UserError(f"--output {output!r} is a directory; pass a file path such as preds.jsonl.")
  if input_file and os.path.exists(output) and os.path.samefile(output, input_file):
    raise UserError(f"--output {output!r} is the --input_file: writing would destroy the inputs. Pass another "
                    "--output path.")


def _main(argv: list[str]) -> int:
  from stmoe.checkpoints import export as export_lib
  from stmoe.evaluation import predictions, task_metrics

  parser = argparse.ArgumentParser(prog="stmoe infer", description=main.__doc__)
  parser.add_argument("--checkpoint", required=True, help="export directory or training checkpoint/MODEL_DIR")
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument("--task", help="a registered seqio task to decode (metrics are computed too)")
  src.add_argument("--input_file", help="JSONL ({'inputs': ..., 'targets'?: ...}) or TSV (input<TAB>target?)")
  parser.add_argument("--split", default="validation")
  parser.add_argument("--input_key", default=None)
  parser.add_argument("--target_key", default=None)
  parser.add_argument("--prefix", default="", help="text prepended to every file input (the task's prefix)")
  parser.add_argument("--output", required=True, help="predictions JSONL to write")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--inputs_length", type=int, default=512)
  parser.add_argument("--targets_length", type=int, default=64, help="maximum decode length")
  parser.add_argument("--max_examples", type=int, default=None)
  parser.add_argument("--no_progress", action="store_true")
  add_decode_flags(parser)
  gin_utils.add_gin_flags(parser)
  args, bindings = gin_utils.parse_known_gin_args(parser, argv)
  _check_output(args.output, args.input_file)
  rows = None
  if args.input_file:  # read the inputs before the (slow) model load: a bad file fails at once
    rows = predictions.read_inputs(args.input_file, args.input_key, args.target_key)
  loaded = export_lib.load(args.checkpoint, args.gin_file, bindings)
  cfg = decode_config_from_args(args, args.targets_length)
  if args.task:
    if loaded.vocab_path:
      from stmoe.data import vocab

      vocab.set_vocabulary_path(loaded.vocab_path)
    result = task_metrics.run_task_eval(loaded.model, loaded.params, args.task, args.split,
                                        {"inputs": args.inputs_length, "targets": args.targets_length},
                                        batch_size=args.batch_size, max_examples=args.max_examples,
                                        decode_config=cfg, seed=args.seed, progress=not args.no_progress)
    task_metrics.write_predictions(args.output, result.records())
    metrics_path = os.path.splitext(args.output)[0] + ".metrics.json"
    task_metrics.write_results(metrics_path, {"task": args.task, "split": args.split, "metrics": result.metrics,
                                              "num_examples": result.num_examples, "checkpoint": loaded.source,
                                              "step": loaded.step})
    for k, v in sorted(result.metrics.items()):
      print(f"{args.task}/{args.split} {k} = {v:.6g}")
    print(f"stmoe infer: wrote {result.num_examples} predictions to {args.output} and metrics to {metrics_path}")
    return 0
  if args.max_examples is not None:
    rows = rows[: args.max_examples]
  records = predictions.predict_file(loaded, rows, batch_size=args.batch_size, inputs_length=args.inputs_length,
                                     targets_length=args.targets_length, decode_config=cfg, prefix=args.prefix,
                                     seed=args.seed, progress=not args.no_progress)
  task_metrics.write_predictions(args.output, records)
  print(f"stmoe infer: wrote {len(records)} predictions to {args.output}")
  return 0
