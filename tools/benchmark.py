"""Benchmarks: `python tools/benchmark.py SUBCOMMAND [flags]`.

A thin dispatcher: each subcommand is a module in tools/ with `main(argv: list[str]) -> int`.
Adding one is one line in SUBCOMMANDS.
"""

from __future__ import annotations

import importlib
import os
import sys

# Make the sibling tool modules importable however this file is run.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SUBCOMMANDS: dict[str, str] = {
    "moe_layer": "bench_moe_layer",  # MoeLayer fwd+bwd per dispatch vs a FLOP-matched dense MLP
    "train_step": "bench_train_step",  # full training step (tools/bench_train_step.py)
    "accelerator": "bench_accelerator",  # one-shot GPU run: bf16 matmul peak, MoE layer, st_moe_base step
}


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
    print(f"usage: benchmark.py {{{','.join(SUBCOMMANDS)}}} [flags]  (SUBCOMMAND --help for its flags)")
    return 0 if argv and argv[0] in ("-h", "--help") else 2
  module = importlib.import_module(SUBCOMMANDS[argv[0]])
  return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
  sys.exit(main())
