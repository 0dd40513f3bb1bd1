"""Where a checkpoint lives: the one resolver every command uses.

A user may point a command at any of these, and they all resolve the same way:

    MODEL_DIR                       -> its newest step (or `which="best"` / a step number)
    MODEL_DIR/checkpoints           -> its newest step
    MODEL_DIR/checkpoints/<step>    -> that step
    MODEL_DIR/best                  -> the best step kept by fine-tuning (its step from best_metric.json)
    an export directory             -> the export (export.json)

and the model comes from the nearest `config.gin`: the step directory's own copy (the config that
produced that step) first, then the checkpoints folder, then MODEL_DIR.
"""

from __future__ import annotations

import dataclasses
import json
import os

STATE_ITEM = "state"
CHECKPOINTS_SUBDIR = "checkpoints"
BEST_SUBDIR = "best"
BEST_METRIC_FILE = "best_metric.json"
CONFIG_FILE = "config.gin"
EXPORT_FILE = "export.json"


@dataclasses.dataclass(frozen=True)
class CheckpointLocation:
  """A resolved checkpoint: what to read and what describes it."""

  path: str  # the step directory or the export directory to read
  kind: str  # "step" | "export"
  step: int | None  # the training step it holds (None if unknown)
  config_path: str | None  # the nearest config.gin (None if there is none)

  @property
  def is_export(self) -> bool:
    return self.kind == "export"

  @property
  def base_dir(self) -> str:
    """Where results about this checkpoint go by default (never inside a step directory, whose files are
    checksummed): the export dir, or the run's MODEL_DIR."""
    if self.is_export:
      return self.path
    parent = os.path.dirname(self.path.rstrip("/"))
    return os.path.dirname(parent) if os.path.basename(parent) == CHECKPOINTS_SUBDIR else parent


def is_step_dir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, STATE_ITEM))


def is_export_dir(path: str) -> bool:
  return os.path.exists(os.path.join(path, EXPORT_FILE))


def step_dirs(directory: str) -> list[tuple[int, str]]:
  """(step, path) of finalised step directories, oldest first (orbax tmp dirs have non-integer names)."""
  if not os.path.isdir(directory):
    return []
  out = []
  for name in os.listdir(directory):
    if name.isdigit() and is_step_dir(os.path.join(directory, name)):
      out.append((int(name), os.path.join(directory, name)))
  return sorted(out)


def latest_step_dir(path: str) -> str:
  """Resolve a MODEL_DIR, a checkpoints dir or a step dir to the step dir to read."""
  path = os.path.abspath(os.path.expanduser(path))
  if is_step_dir(path):
    return path
  for directory in (os.path.join(path, CHECKPOINTS_SUBDIR), path):
    steps = step_dirs(directory)
    if steps:
      return steps[-1][1]
  raise FileNotFoundError(
      f"No checkpoint found at {path!r}: expected a MODEL_DIR with checkpoints/<step>/state, a checkpoints "
      "directory or a step directory.")


def step_of(step_dir: str) -> int | None:
  """The training step of a step directory (MODEL_DIR/best records it in best_metric.json)."""
  name = os.path.basename(step_dir.rstrip("/"))
  if name.isdigit():
    return int(name)
  best = os.path.join(step_dir, BEST_METRIC_FILE)
  if os.path.exists(best):
    with open(best, encoding="utf-8") as f:
      return json.load(f).get("step")
  return None


def nearest_config(path: str) -> str | None:
  """The config.gin of `path` or of the nearest folder above it (at most 3 levels: step -> run)."""
  path = os.path.abspath(os.path.expanduser(path))
  for _ in range(4):
    candidate = os.path.join(path, CONFIG_FILE)
    if os.path.exists(candidate):
      return candidate
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return None


def resolve(path: str, which: str | int = "latest") -> CheckpointLocation:
  """Resolves `path` (see the module docstring) to a CheckpointLocation.

  `which` picks the step of a MODEL_DIR: "latest" (default), "best" (MODEL_DIR/best) or a step number.
  Raises FileNotFoundError with what was expected when there is nothing to read.
  """
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path!r} does not exist: pass an export directory (stmoe export), a MODEL_DIR "
                            "or a step directory.")
  if is_export_dir(path):
    with open(os.path.join(path, EXPORT_FILE), encoding="utf-8") as f:
      step = json.load(f).get("step")
    config = os.path.join(path, CONFIG_FILE)
    return CheckpointLocation(path, "export", step, config if os.path.exists(config) else None)
  if which == "best" and not is_step_dir(path):
    step_dir = os.path.join(path, BEST_SUBDIR)
    if not is_step_dir(step_dir):
      raise FileNotFoundError(f"{path!r} has no best checkpoint ({BEST_SUBDIR}/): it is kept by fine-tuning "
                              "runs with a TaskEvalCallback metric.")
  elif isinstance(which, int) and not is_step_dir(path):
    step_dir = os.path.join(path, CHECKPOINTS_SUBDIR, str(which))
    if not is_step_dir(step_dir):
      kept = [s for s, _ in step_dirs(os.path.join(path, CHECKPOINTS_SUBDIR))]
      raise FileNotFoundError(f"{path!r} has no checkpoint of step {which} (kept steps: {kept}).")
  else:
    step_dir = latest_step_dir(path)
  return CheckpointLocation(step_dir, "step", step_of(step_dir), nearest_config(step_dir))
