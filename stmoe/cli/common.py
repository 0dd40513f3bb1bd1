"""Flags shared by the commands: gin + multi-process run flags, decoding flags, and the run start-up.

Everything here is command-line plumbing: it parses arguments and gin, sets up logging and the
multi-process runtime, and turns flags into plain values for the library.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Callable, Sequence, TypeVar

from stmoe import gin_utils
from stmoe.errors import UserError
from stmoe.training import distributed

T = TypeVar("T")


def run_parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
  """The flags of `stmoe train` / `stmoe eval`: gin files and bindings, MODEL_DIR, multi-process."""
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


def start_run(prog: str, description: str, argv: Sequence[str], epilog: str | None = None) -> argparse.Namespace:
  """Parses flags, sets up logging and the multi-process runtime, then parses gin (MODEL_DIR bound)."""
  parser = run_parser(prog, description, epilog)
  args, bindings = gin_utils.parse_known_gin_args(parser, argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "orbax", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  distributed.initialize(distributed.DistributedArgs(args.coordinator_address, args.num_processes,
                                                     args.process_id, args.heartbeat_timeout_s))
  if args.model_dir:
    bindings.append(f"MODEL_DIR = {os.path.abspath(os.path.expanduser(args.model_dir))!r}")
  # Register every configurable a run file may bind before parsing.
  import stmoe.evaluation.loss  # noqa: F401
  import stmoe.training.finetune  # noqa: F401  (finetune_optimizer, train_callbacks, TaskEvalCallback)
  import stmoe.training.trainer  # noqa: F401

  gin_utils.parse_gin(args.gin_file, bindings, args.gin_search_paths)
  return args


def call_configured(fn: Callable[..., T], **kwargs) -> T:
  """Calls a gin-configurable entry point; gin's "missing required argument" errors (TypeError / ValueError
  naming gin or REQUIRED) become a user error that says which binding to add."""
  try:
    return fn(**kwargs)
  except (TypeError, ValueError) as e:
    text = str(e)
    if isinstance(e, UserError) or not ("gin" in text.lower() or "required" in text.lower()):
      raise
    raise gin_utils.GinConfigError(f"{text}. Bind the missing value with --gin.NAME=VALUE.") from e


def query_macro(macro: str, default=None):
  """A gin macro's value (e.g. MIXTURE_OR_TASK_NAME), or `default` if it is not bound."""
  import gin

  try:
    return gin.query_parameter(f"%{macro}")
  except ValueError:
    return default


def add_decode_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--method", default="greedy", choices=["greedy", "sample", "beam"])
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--top_k", type=int, default=0)
  parser.add_argument("--beam_size", type=int, default=4)
  parser.add_argument("--length_penalty", type=float, default=0.6)
  parser.add_argument("--seed", type=int, default=0)


def decode_config_from_args(args: argparse.Namespace, targets_length: int):
  from stmoe.decoding import DecodeConfig

  return DecodeConfig(method=args.method, max_decode_length=targets_length, temperature=args.temperature,
                      top_k=args.top_k, beam_size=args.beam_size, length_penalty=args.length_penalty)
