"""`stmoe quickstart [--output_dir DIR] [--fast] [--gin.NAME=VALUE ...]`: the whole workflow on bundled data.

vocab -> pretrain -> fine-tune -> evaluate -> export, driven by gin/runs/quickstart.gin (or
runs/quickstart_fast.gin with --fast); the workflow itself is stmoe.quickstart.run_quickstart.
"""

from __future__ import annotations

import argparse
import logging

from stmoe import gin_utils
from stmoe.errors import run_command


def main(argv: list[str] | None = None) -> int:
  """`stmoe quickstart`: vocab -> pretrain -> fine-tune -> evaluate -> export, on bundled real data."""
  return run_command("stmoe quickstart", _main, list(argv or []))


def _main(argv: list[str]) -> int:
  from stmoe.quickstart import run_quickstart

  parser = argparse.ArgumentParser(prog="stmoe quickstart", description=main.__doc__)
  parser.add_argument("--output_dir", default="stmoe_quickstart", help="where everything is written")
  parser.add_argument("--fast", action="store_true", help="a few steps only (smoke test / CI)")
  parser.add_argument("--no_progress", action="store_true")
  gin_utils.add_gin_flags(parser)
  args, bindings = gin_utils.parse_known_gin_args(parser, argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "orbax", "jax._src", "stmoe.partitioning"):
    logging.getLogger(noisy).setLevel(logging.ERROR)
  files = ["runs/quickstart_fast.gin" if args.fast else "runs/quickstart.gin"] + list(args.gin_file)
  gin_utils.parse_gin(files, bindings, args.gin_search_paths)
  summary = run_quickstart(output_dir=args.output_dir, progress=not args.no_progress)
  ok = summary["finetune_accuracy"] > summary["majority_baseline_accuracy"]
  print(f"stmoe quickstart: done in {summary['seconds']:.0f}s; accuracy {summary['finetune_accuracy']:.3f} vs "
        f"majority {summary['majority_baseline_accuracy']:.3f} ({'beats' if ok else 'does NOT beat'} the baseline)")
  return 0
