"""`stmoe export`: write an inference checkpoint (parameters only, optionally bfloat16) with its config and vocab,
and optionally serving programs beside it.

    stmoe export --checkpoint /tmp/run [--output /tmp/run_export] [--bfloat16]
    stmoe export --checkpoint /tmp/run --format stablehlo --batch_size 8 --inputs_length 512 --targets_length 114
    stmoe export --checkpoint /tmp/run --format saved_model ...   # TensorFlow SavedModel through jax2tf

`--format params` (the default) writes the params-only export (stmoe.checkpoints.export). `stablehlo` also
writes OUTPUT/serving/: jax.export programs for scoring and greedy decoding at fixed shapes, run with only
jax + numpy by stmoe.serving. `saved_model` also writes OUTPUT/saved_model/. See docs/interop.md.
"""

from __future__ import annotations

import argparse
import json
import os

from stmoe import gin_utils
from stmoe.checkpoints import export as export_lib
from stmoe.errors import run_command


def main(argv: list[str] | None = None) -> int:
  """`stmoe export`: write an inference checkpoint (parameters only, optionally bfloat16) and serving programs."""
  return run_command("stmoe export", _main, list(argv or []))


def _dir_size(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def _main(argv: list[str]) -> int:
  from stmoe.checkpoints import serving_export

  parser = argparse.ArgumentParser(prog="stmoe export", description=main.__doc__)
  parser.add_argument("--checkpoint", required=True,
                      help="MODEL_DIR, its checkpoints/ folder, a step directory or MODEL_DIR/best")
  parser.add_argument("--output", default=None, help="export directory to write (default: CHECKPOINT_export)")
  parser.add_argument("--bfloat16", action="store_true", help="store the parameters as bfloat16 (half the size)")
  parser.add_argument("--format", choices=serving_export.FORMATS, default="params",
                      help="params: parameters only; stablehlo: also OUTPUT/serving/ (jax.export programs for "
                           "score + greedy, run with jax only); saved_model: also OUTPUT/saved_model/ (jax2tf)")
  parser.add_argument("--batch_size", default="8",
                      help="rows per call of the serving programs, or 'poly' for a symbolic batch (dense models)")
  parser.add_argument("--inputs_length", type=int, default=512,
                      help="encoder input tokens (decoder-only: prompt tokens) of the serving programs")
  parser.add_argument("--targets_length", type=int, default=114, help="target tokens of a scored batch")
  parser.add_argument("--max_decode_length", type=int, default=None,
                      help="tokens produced by greedy decoding (default: --targets_length)")
  parser.add_argument("--platforms", default=None,
                      help="comma-separated platforms to lower the StableHLO programs for, e.g. cpu,cuda "
                           "(default: this machine's backend)")
  gin_utils.add_gin_flags(parser)
  args, bindings = gin_utils.parse_known_gin_args(parser, argv)
  shapes = None
  if args.format != "params":  # validate the serving flags before the (slower) params export
    shapes = serving_export.ServingShapes(
        batch_size=serving_export.parse_batch_size(args.batch_size), inputs_length=args.inputs_length,
        targets_length=args.targets_length, max_decode_length=args.max_decode_length)
  output = args.output or os.path.abspath(os.path.expanduser(args.checkpoint)).rstrip("/") + "_export"
  out = export_lib.export(args.checkpoint, output, bfloat16=args.bfloat16, gin_files=args.gin_file,
                          bindings=bindings)
  with open(os.path.join(out, export_lib.EXPORT_FILE), encoding="utf-8") as f:
    info = json.load(f)
  print(f"stmoe export: wrote {out} ({info['num_parameters']:,} parameters, {info['dtype']}, "
        f"{info['bytes'] / 2**20:.1f} MiB, step {info['step']})")
  if args.format == "stablehlo":
    platforms = [p for p in (args.platforms or "").split(",") if p] or None
    path = serving_export.write_stablehlo(out, shapes, platforms=platforms)
    print(f"stmoe export: wrote {path} (score + greedy StableHLO, batch {args.batch_size}, inputs "
          f"{shapes.inputs_length}, targets {shapes.targets_length}, decode {shapes.decode_length}; "
          f"{_dir_size(path) / 2**20:.1f} MiB)")
  elif args.format == "saved_model":
    path = serving_export.write_saved_model(out, shapes)
    print(f"stmoe export: wrote {path} (TensorFlow SavedModel; {_dir_size(path) / 2**20:.1f} MiB)")
  return 0
