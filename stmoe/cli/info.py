"""`stmoe info`: parameters, active parameters per token and FLOPs of a configured model (nothing materialised).

    stmoe info --gin_file models/st_moe_32b.gin            # a table
    stmoe info --gin_file models/switch_base.gin --json    # total_params, active_params_per_token, flops_per_token
"""

from __future__ import annotations

import argparse
import json

from stmoe import gin_utils
from stmoe.errors import run_command


def main(argv: list[str] | None = None) -> int:
  """`stmoe info`: parameter counts and FLOPs of a configured model."""
  return run_command("stmoe info", _main, list(argv or []))


def _main(argv: list[str]) -> int:
  from stmoe.models.info import format_table, model_facts

  parser = argparse.ArgumentParser(prog="stmoe info", description=main.__doc__)
  gin_utils.add_gin_flags(parser)
  parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
  parser.add_argument("--inputs_length", type=int, default=512)
  parser.add_argument("--targets_length", type=int, default=114)
  args, gin_bindings = gin_utils.parse_known_gin_args(parser, argv)
  gin_utils.parse_gin(args.gin_file, gin_bindings, args.gin_search_paths)
  model = gin_utils.configured_model()
  facts = model_facts(model, args.inputs_length, args.targets_length)
  if args.json:
    print(json.dumps(facts.to_json(), indent=1))
  else:
    print(format_table(model, facts))
  return 0
