"""Checkpoints with orbax: periodic async saves, keep-N, atomic, resume with fallback, resharding restore.

Layout (one directory per saved step, written by orbax to ``<step>.orbax-checkpoint-tmp*`` and renamed
only once complete, so a crash mid-save never touches an existing checkpoint)::

    MODEL_DIR/config.gin                     operative gin config of the run
    MODEL_DIR/checkpoints/<step>/state/      params, opt_state, step, rng (orbax PyTree, OCDBT)
    MODEL_DIR/checkpoints/<step>/data_state/ input pipeline position (JSON)
    MODEL_DIR/corrupt_checkpoints/<step>/    unreadable checkpoints moved aside on resume (with a warning)

Restores take an *abstract* target (``jax.ShapeDtypeStruct`` with ``.sharding``): orbax reads each shard
straight onto its device, so a checkpoint written on one mesh restores onto any other (resharding).
Public functions for other commands (fine-tuning, export, upcycling): :func:`restore_params`,
:func:`restore_train_state`, :func:`latest_step_dir`.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp

STATE_ITEM = "state"
DATA_ITEM = "data_state"
CHECKPOINTS_SUBDIR = "checkpoints"

log = logging.getLogger(__name__)


class CheckpointWarning(UserWarning):
  """A checkpoint could not be used (corrupt or partial) and an older one was used instead."""


def _is_step_dir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, STATE_ITEM))


def _step_dirs(directory: str) -> list[tuple[int, str]]:
  """(step, path) of finalised step directories, oldest first (orbax tmp dirs have non-integer names)."""
  if not os.path.isdir(directory):
    return []
  out = []
  for name in os.listdir(directory):
    if name.isdigit() and _is_step_dir(os.path.join(directory, name)):
      out.append((int(name), os.path.join(directory, name)))
  return sorted(out)


def latest_step_dir(path: str) -> str:
  """Resolve a MODEL_DIR, a checkpoints dir or a step dir to the step dir to read."""
  path = os.path.abspath(os.path.expanduser(path))
  if _is_step_dir(path):
    return path
  for directory in (os.path.join(path, CHECKPOINTS_SUBDIR), path):
    steps = _step_dirs(directory)
    if steps:
      return steps[-1][1]
  raise FileNotFoundError(
      f"No checkpoint found at {path!r}: expected a MODEL_DIR with checkpoints/<step>/state, a checkpoints "
      "directory or a step directory.")


def _restore_args(abstract: Any) -> Any:
  return jax.tree.map(
      lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype)
      if getattr(a, "sharding", None) is not None else ocp.RestoreArgs(), abstract)


def restore_params(path: str, abstract_params: Any) -> Any:
  """Only the parameters of a checkpoint (fine-tuning from a pretrained model), resharded to the target.

  `abstract_params` is a pytree of jax.ShapeDtypeStruct with shardings (e.g. StateSpec.abstract["params"]).
  The optimizer state is not read at all.
  """
  step_dir = latest_step_dir(path)
  with ocp.PyTreeCheckpointer() as ckptr:
    restored = ckptr.restore(
        os.path.join(step_dir, STATE_ITEM),
        args=ocp.args.PyTreeRestore(item={"params": abstract_params},
                                    restore_args={"params": _restore_args(abstract_params)},
                                    partial_restore=True))
  return restored["params"]


def restore_train_state(path: str, abstract_state: Any) -> tuple[Any, dict | None]:
  """The full train state (params, optimizer state, step, rng) and the data position of a checkpoint."""
  step_dir = latest_step_dir(path)
  with ocp.StandardCheckpointer() as ckptr:
    state = ckptr.restore(os.path.join(step_dir, STATE_ITEM), abstract_state)
  data_state = None
  data_path = os.path.join(step_dir, DATA_ITEM)
  if os.path.exists(data_path):
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
      data_state = ckptr.restore(data_path)
  return state, data_state


class CheckpointManager:
  """Periodic asynchronous saves with keep-last-N, and resume from the newest *readable* checkpoint."""

  def __init__(self, model_dir: str, keep: int | None = 3, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(model_dir), CHECKPOINTS_SUBDIR)
    self.model_dir = os.path.abspath(model_dir)
    self._options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 create=True, cleanup_tmp_directories=True)
    self._mgr = self._open()

  def _open(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(self.directory, options=self._options, item_names=(STATE_ITEM, DATA_ITEM))

  def all_steps(self) -> list[int]:
    return sorted(self._mgr.all_steps())

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def save(self, step: int, state: Any, data_state: dict | None) -> None:
    """Start saving (asynchronously); returns once the arrays are copied off the devices."""
    if step in self._mgr.all_steps():
      return
    self._mgr.save(int(step), args=ocp.args.Composite(
        **{STATE_ITEM: ocp.args.StandardSave(state), DATA_ITEM: ocp.args.JsonSave(data_state or {})}),
        force=True)

  def wait(self) -> None:
    self._mgr.wait_until_finished()

  def close(self) -> None:
    self._mgr.wait_until_finished()
    self._mgr.close()

  def _restore_step(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    restored = self._mgr.restore(step, args=ocp.args.Composite(
        **{STATE_ITEM: ocp.args.StandardRestore(abstract_state), DATA_ITEM: ocp.args.JsonRestore()}))
    state = restored[STATE_ITEM]
    if int(jax.device_get(state["step"])) != step:
      raise ValueError(f"checkpoint directory {step} holds step {int(state['step'])}")
    return state, dict(restored[DATA_ITEM] or {})

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """(step, state, data_state) from the newest readable checkpoint, or None if there is none.

    A checkpoint that fails to restore (corrupt or partial files) is reported with a CheckpointWarning,
    moved to MODEL_DIR/corrupt_checkpoints/ (by process 0) and the previous one is tried.
    """
    for step in sorted(self._mgr.all_steps(), reverse=True):
      try:
        state, data_state = self._restore_step(step, abstract_state)
      except Exception as e:  # orbax/tensorstore raise many types for damaged files
        msg = (f"Checkpoint at step {step} in {self.directory} is corrupt or incomplete "
               f"({type(e).__name__}: {str(e)[:300]}); falling back to the previous checkpoint.")
        log.warning(msg)
        warnings.warn(msg, CheckpointWarning, stacklevel=2)
        self._quarantine(step)
        continue
      return step, state, data_state
    return None

  def _quarantine(self, step: int) -> None:
    if jax.process_index() == 0:
      src = os.path.join(self.directory, str(step))
      dst_dir = os.path.join(self.model_dir, "corrupt_checkpoints")
      os.makedirs(dst_dir, exist_ok=True)
      dst = os.path.join(dst_dir, str(step))
      if os.path.exists(dst):
        shutil.rmtree(dst)
      if os.path.exists(src):
        shutil.move(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"stmoe_quarantine_{step}")
    self._mgr.close()
    self._mgr = self._open()
