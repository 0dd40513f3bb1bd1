"""`stmoe reproduce`: run a reproduction of a paper's finding at toy scale (docs/results.md).

    stmoe reproduce --list
    stmoe reproduce NAME --output_dir DIR [--fast] [--seeds N] [--gin_file F] [--gin.NAME=VALUE ...]

The experiment's budget is gin/experiments/NAME.gin (--fast: gin/experiments/fast/NAME.gin); rerunning the
same command resumes an interrupted experiment; DIR gets results.json, results.md and PNG plots.
"""

from __future__ import annotations

import argparse
import logging

from stmoe import gin_utils
from stmoe.errors import UserError, run_command

EPILOG = """examples:
  stmoe reproduce --list
  stmoe reproduce moe_vs_dense_lm --output_dir /tmp/moe_vs_dense          # default budget, 2 seeds
  stmoe reproduce moe_vs_dense_lm --fast --output_dir /tmp/smoke          # the same code in ~1-2 minutes
  stmoe reproduce moe_vs_dense_lm --seeds 3 --gin.LmExperiment.train_steps=5000 --output_dir /tmp/longer

Rerun the same command to resume (finished runs are read back, others resume from their checkpoints);
a directory that holds another experiment or configuration is refused."""


def main(argv: list[str] | None = None) -> int:
  """`stmoe reproduce`: run one of the paper-reproduction experiments and write its results."""
  return run_command("stmoe reproduce", _main, list(argv or []))


def _main(argv: list[str]) -> int:
  from stmoe.reproduce import harness

  parser = argparse.ArgumentParser(prog="stmoe reproduce", description=main.__doc__, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("name", nargs="?", help="the experiment (stmoe reproduce --list)")
  parser.add_argument("--list", action="store_true", help="name the experiments, one line each")
  parser.add_argument("--output_dir", default=None, help="where runs, results.json, results.md and plots go")
  parser.add_argument("--fast", action="store_true", help="a tiny budget (CI: the output contract, not the science)")
  parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 2; 1 with --fast)")
  parser.add_argument("--no_progress", action="store_true")
  parser.add_argument("--debug", action="store_true", help="show tracebacks of configuration errors")
  gin_utils.add_gin_flags(parser)
  args, bindings = gin_utils.parse_known_gin_args(parser, argv)
  if args.list:
    print(harness.describe_experiments())
    return 0
  if not args.name:
    raise UserError("name an experiment (stmoe reproduce --list shows them), e.g. "
                    "stmoe reproduce moe_vs_dense_lm --output_dir /tmp/moe_vs_dense")
  if not args.output_dir:
    raise UserError(f"--output_dir is required: e.g. stmoe reproduce {args.name} --output_dir /tmp/{args.name}")
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "orbax", "jax._src", "stmoe.partitioning"):
    logging.getLogger(noisy).setLevel(logging.ERROR)
  results = harness.run_experiment(args.name, args.output_dir, fast=args.fast, num_seeds=args.seeds,
                                   gin_files=args.gin_file, bindings=bindings, search_paths=args.gin_search_paths,
                                   progress=not args.no_progress)
  print()
  for f in results["findings"]:
    print(f"- {f['claim']}: {f['verdict']} (ours: {f['ours']}; paper: {f['paper']})")
  print(f"stmoe reproduce: {args.name} done in {results['wall_time_s']:.0f}s ({results['total_wall_time_s']:.0f}s over "
        f"all invocations); wrote "
        f"{args.output_dir}/results.json, results.md and {len(results['plots'])} plot(s)")
  return 0
