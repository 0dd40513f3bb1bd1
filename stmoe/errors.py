"""The error types a user can act on, shared by the library and the `stmoe` command line.

Library code raises these with a message that names the problem and the fix; the command line
(`stmoe.cli.main`) prints that message on one line and exits with status 2 (`TrainingDivergedError`: 1),
without a traceback unless `--debug` is given. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import re
import sys
from typing import Callable


class UserError(ValueError):
  """Bad input the user can fix (a flag, a gin binding, a file, a directory); the message says how."""

  exit_code = 2


class CheckpointMismatchError(UserError):
  """A checkpoint does not fit the configured model (tree, shapes, dtypes) or its input stream."""


class CorruptCheckpointError(UserError):
  """A checkpoint's files are missing, truncated or fail their integrity check."""


class TaskModelMismatchError(UserError):
  """A task's features do not fit the model's feature layout (e.g. an LM task on an encoder-decoder)."""


class TrainingDivergedError(UserError, FloatingPointError):
  """A loss, gradient norm or parameter became NaN/inf; nothing from that step on was saved."""

  exit_code = 1


_debug = False  # set by the outermost run_command when --debug was given


def one_line(error: BaseException) -> str:
  """An error message on one line (the CLI prints user errors this way)."""
  text = re.sub(r"\s*In call to configurable '[^']*' \(<[^>]*>\)", "", str(error))  # gin's suffix
  return " ".join(text.split())


def run_command(prog: str, func: Callable[[list[str]], int | None], argv: list[str]) -> int:
  """Runs a command `func(argv)`. A UserError ends in `prog: error: MESSAGE` on stderr (one line) and the
  error's exit code (2; 1 for a diverged run) instead of a traceback, unless `--debug` is among the
  arguments (it is removed before `func` sees them)."""
  global _debug
  outer = not _debug
  if "--debug" in argv:
    _debug = True
    argv = [a for a in argv if a != "--debug"]
  try:
    return int(func(list(argv)) or 0)
  except UserError as e:
    if _debug:
      raise
    print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
    return e.exit_code
  finally:
    if outer:
      _debug = False
