"""Checkpoints with orbax: periodic async saves, integrity checksums, keep-N, safe resume, resharding restore.

Layout (one directory per saved step, written by orbax to ``<step>.orbax-checkpoint-tmp*`` and renamed
only once complete, so a crash mid-save never touches an existing checkpoint)::

    MODEL_DIR/config.gin                             operative gin config of the run
    MODEL_DIR/checkpoints/<step>/state/              params, opt_state, step, rng (orbax PyTree, OCDBT)
    MODEL_DIR/checkpoints/<step>/data_state/         input pipeline position (JSON)
    MODEL_DIR/checkpoints/<step>/config.gin          the operative config that produced this step
    MODEL_DIR/checkpoints/<step>/stmoe_integrity.json  size + sha256 of every file of the step
    MODEL_DIR/corrupt_checkpoints/<step>[.N]/        unreadable checkpoints moved aside (never deleted)

Rules (docs/training.md, "What happens when things go wrong"):

* A checkpoint that does not fit the configured model (tree, shapes, dtypes) is never treated as
  corrupt: :class:`~stmoe.errors.CheckpointMismatchError` names the differences and nothing is moved.
* Only unreadable checkpoints (missing or truncated files, a checksum that does not match, a restore that
  fails although the metadata fits) fall back to an older one; they are moved to
  ``corrupt_checkpoints/`` under a name that is never reused.
* A step's checksums are written once its asynchronous save has completed; old steps are removed (keep-N)
  only after every newer kept step has its checksums, so an unverified checkpoint never displaces a
  verified one.

Restores take an *abstract* target (``jax.ShapeDtypeStruct`` with ``.sharding``): orbax reads each shard
straight onto its device, so a checkpoint written on one mesh restores onto any other (resharding).
Public functions for other commands (fine-tuning, export, upcycling): :func:`restore_params`,
:func:`restore_train_state`, :func:`verify_integrity`, :func:`check_fits`; where a checkpoint lives is
decided by :mod:`stmoe.checkpoints.resolve` alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import warnings
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from stmoe.checkpoints import resolve
from stmoe.checkpoints.resolve import CHECKPOINTS_SUBDIR, STATE_ITEM
from stmoe.errors import CheckpointMismatchError, CorruptCheckpointError

DATA_ITEM = "data_state"
QUARANTINE_SUBDIR = "corrupt_checkpoints"
INTEGRITY_FILE = "stmoe_integrity.json"
STEP_CONFIG_FILE = "config.gin"

log = logging.getLogger(__name__)


class CheckpointWarning(UserWarning):
  """A checkpoint could not be used (corrupt or partial) and an older one was used instead."""


_is_step_dir = resolve.is_step_dir
_step_dirs = resolve.step_dirs
latest_step_dir = resolve.latest_step_dir


# ------------------------------------------------------------------------------------------------------
# Integrity: a manifest of every file's size and sha256, written after the save completed.


def _files_of(step_dir: str) -> list[str]:
  out = []
  for root, _, files in os.walk(step_dir):
    for name in files:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if rel != INTEGRITY_FILE and not rel.endswith(".tmp"):
        out.append(rel)
  return sorted(out)


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _write_atomic(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_integrity(step_dir: str) -> dict[str, Any]:
  """Records size + sha256 of every file of `step_dir` in INTEGRITY_FILE (atomically); returns it."""
  files = {rel: {"size": os.path.getsize(os.path.join(step_dir, rel)), "sha256": _sha256(os.path.join(step_dir, rel))}
           for rel in _files_of(step_dir)}
  manifest = {"version": 1, "algorithm": "sha256", "files": files}
  _write_atomic(os.path.join(step_dir, INTEGRITY_FILE), json.dumps(manifest, indent=1, sort_keys=True))
  return manifest


def has_integrity(step_dir: str) -> bool:
  return os.path.exists(os.path.join(step_dir, INTEGRITY_FILE))


def verify_integrity(step_dir: str) -> bool:
  """True if `step_dir` matches its manifest; False if it has none (saved by an older stmoe, or the run
  stopped between the save and the manifest). Raises CorruptCheckpointError naming the first bad file."""
  path = os.path.join(step_dir, INTEGRITY_FILE)
  if not os.path.exists(path):
    return False
  try:
    with open(path, encoding="utf-8") as f:
      files = json.load(f)["files"]
  except (OSError, ValueError, KeyError) as e:
    raise CorruptCheckpointError(f"{path} is unreadable ({e}).") from None
  for rel, want in sorted(files.items()):
    full = os.path.join(step_dir, rel)
    if not os.path.exists(full):
      raise CorruptCheckpointError(f"{full} is missing.")
    size = os.path.getsize(full)
    if size != want["size"]:
      raise CorruptCheckpointError(f"{full} has {size} bytes, {want['size']} were saved.")
    if _sha256(full) != want["sha256"]:
      raise CorruptCheckpointError(f"{full} does not match its sha256 (the bytes changed after the save).")
  return True


# ------------------------------------------------------------------------------------------------------
# Does a checkpoint fit the model? Compared on the saved metadata, before any array is read.


def _signature(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """{path: (shape, dtype)} of a pytree of arrays / ShapeDtypeStructs / orbax ArrayMetadata."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
    shape = getattr(leaf, "shape", None)
    dtype = getattr(leaf, "dtype", None)
    out[name] = (tuple(shape) if shape is not None else None, str(np.dtype(dtype)) if dtype is not None else None)
  return out


def _saved_metadata(step_dir: str) -> Any:
  absl_log = logging.getLogger("absl")
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)  # orbax warns that the item dir has no step-level metadata: expected
  try:
    with ocp.StandardCheckpointer() as ckptr:
      meta = ckptr.metadata(os.path.join(step_dir, STATE_ITEM))
  except Exception as e:  # tensorstore/orbax raise many types for unreadable files
    raise CorruptCheckpointError(f"the metadata of {step_dir} is unreadable ({type(e).__name__}: "
                                 f"{str(e)[:200]}).") from None
  finally:
    absl_log.setLevel(level)
  tree = getattr(getattr(meta, "item_metadata", meta), "tree", None)
  if tree is None:
    raise CorruptCheckpointError(f"the metadata of {step_dir} holds no array tree.")
  return tree


def differences(saved: Any, wanted: Any, limit: int = 4, prefix: str = "") -> list[str]:
  """Human-readable differences between a saved tree and the target tree (empty if they fit)."""
  a = {prefix + k: v for k, v in _signature(saved).items()}
  b = {prefix + k: v for k, v in _signature(wanted).items()}
  diffs = []
  # parameters first: they say what changed in the model; optimizer-state differences follow from them
  for k in sorted(set(a) | set(b), key=lambda k: (not k.startswith("params/"), k)):
    if k not in b:
      diffs.append(f"{k} is in the checkpoint but not in the model")
    elif k not in a:
      diffs.append(f"{k} is in the model but not in the checkpoint")
    elif a[k] != b[k]:
      diffs.append(f"{k}: checkpoint {a[k][0]} {a[k][1]}, model {b[k][0]} {b[k][1]}")
  if len(diffs) > limit:
    diffs = diffs[:limit] + [f"... and {len(diffs) - limit} more differences"]
  return diffs


def check_fits(step_dir: str, abstract: Any, subtree: str | None = None, what: str = "the configured model") -> None:
  """Raises CheckpointMismatchError if the checkpoint at `step_dir` (or its `subtree`) does not fit `abstract`."""
  saved = _saved_metadata(step_dir)
  if subtree is not None:
    if subtree not in saved:
      raise CheckpointMismatchError(f"the checkpoint at {step_dir} has no {subtree!r}.")
    saved = saved[subtree]
  diffs = differences(saved, abstract, prefix=f"{subtree}/" if subtree else "")
  if diffs:
    raise CheckpointMismatchError(
        f"the checkpoint at {step_dir} does not fit {what}: {'; '.join(diffs)}. It was written by a different "
        "model or optimizer configuration: pass the gin files and bindings it was trained with (with none, "
        "the config.gin saved beside it is used). Nothing was changed.")


# ------------------------------------------------------------------------------------------------------
# Reading.


def restore_args(abstract: Any) -> Any:
  """orbax restore args that place each array with its target's sharding, shape and dtype."""
  return jax.tree.map(
      lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype)
      if getattr(a, "sharding", None) is not None else ocp.RestoreArgs(), abstract)


def _verified(step_dir: str) -> None:
  try:
    verify_integrity(step_dir)
  except CorruptCheckpointError as e:
    raise CorruptCheckpointError(f"checkpoint {step_dir} failed its integrity check: {e} Pick another step "
                                 "directory.") from None


def restore_params(path: str, abstract_params: Any) -> Any:
  """Only the parameters of a checkpoint (fine-tuning from a pretrained model), resharded to the target.

  `abstract_params` is a pytree of jax.ShapeDtypeStruct with shardings (e.g. StateSpec.abstract["params"]).
  The optimizer state is not read at all. The checkpoint's checksums are verified and its parameter tree
  compared with the target first (CorruptCheckpointError / CheckpointMismatchError).
  """
  step_dir = latest_step_dir(path)
  _verified(step_dir)
  check_fits(step_dir, abstract_params, subtree="params")
  with ocp.PyTreeCheckpointer() as ckptr:
    restored = ckptr.restore(
        os.path.join(step_dir, STATE_ITEM),
        args=ocp.args.PyTreeRestore(item={"params": abstract_params},
                                    restore_args={"params": restore_args(abstract_params)},
                                    partial_restore=True))
  return restored["params"]


def _read_step(step_dir: str, abstract_state: Any) -> tuple[Any, dict]:
  with ocp.StandardCheckpointer() as ckptr:
    state = ckptr.restore(os.path.join(step_dir, STATE_ITEM), abstract_state)
  data_state: dict = {}
  data_path = os.path.join(step_dir, DATA_ITEM)
  if os.path.exists(data_path):
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
      data_state = dict(ckptr.restore(data_path) or {})
  return state, data_state


def restore_train_state(path: str, abstract_state: Any) -> tuple[Any, dict | None]:
  """The full train state (params, optimizer state, step, rng) and the data position of a checkpoint."""
  step_dir = latest_step_dir(path)
  _verified(step_dir)
  check_fits(step_dir, abstract_state)
  state, data_state = _read_step(step_dir, abstract_state)
  return state, data_state


class CheckpointManager:
  """Periodic asynchronous saves with keep-last-N, and resume from the newest *readable* checkpoint.

  Nothing is written until the first `save` (restoring is read-only, except that unreadable checkpoints
  are moved aside once a readable one was found). `config_text`, if given, returns the operative config
  stored in each step directory.
  """

  def __init__(self, model_dir: str, keep: int | None = 3, async_save: bool = True,
               config_text: Callable[[], str] | None = None):
    self.directory = os.path.join(os.path.abspath(model_dir), CHECKPOINTS_SUBDIR)
    self.model_dir = os.path.abspath(model_dir)
    self.keep = keep
    self.config_text = config_text
    # orbax keeps everything: we remove old steps ourselves, once newer ones are verified.
    self._options = ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=async_save,
                                                 create=True, cleanup_tmp_directories=True)
    self._mgr: ocp.CheckpointManager | None = None
    self._unfinalized: list[int] = []

  @property
  def _writer(self) -> ocp.CheckpointManager:
    if self._mgr is None:
      self._mgr = ocp.CheckpointManager(self.directory, options=self._options,
                                        item_names=(STATE_ITEM, DATA_ITEM))
    return self._mgr

  def all_steps(self) -> list[int]:
    return [s for s, _ in _step_dirs(self.directory)]

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: Any, data_state: dict | None) -> None:
    """Start saving (asynchronously); returns once the arrays are copied off the devices.

    The caller must only pass finite states (the trainer checks before saving).
    """
    if step in self.all_steps():
      return
    self._finalize()
    self._writer.save(int(step), args=ocp.args.Composite(
        **{STATE_ITEM: ocp.args.StandardSave(state), DATA_ITEM: ocp.args.JsonSave(data_state or {})}),
        force=True)
    self._unfinalized.append(int(step))

  def _finalize(self) -> None:
    """Waits for the pending save, then writes config + checksums of finished steps and removes old ones."""
    if self._mgr is None:
      return
    self._mgr.wait_until_finished()
    if not self._unfinalized:
      return
    done, self._unfinalized = self._unfinalized, []
    if jax.process_index() == 0:
      for step in done:
        step_dir = self.step_dir(step)
        if not _is_step_dir(step_dir):
          continue
        if self.config_text is not None:
          _write_atomic(os.path.join(step_dir, STEP_CONFIG_FILE), self.config_text())
        write_integrity(step_dir)
      self._remove_old()
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"stmoe_finalize_{done[-1]}")

  def _remove_old(self) -> None:
    """Deletes steps older than the `keep` newest, but only while every newer kept step is verified."""
    if self.keep is None:
      return
    steps = self.all_steps()
    newer = steps[-self.keep:]
    if any(not has_integrity(self.step_dir(s)) for s in newer):
      return
    removed = False
    for s in steps[:-self.keep]:
      shutil.rmtree(self.step_dir(s))
      removed = True
    if removed and self._mgr is not None:
      self._mgr.reload()

  def newest_verified_step(self) -> int | None:
    for step in reversed(self.all_steps()):
      if has_integrity(self.step_dir(step)):
        return step
    return None

  def wait(self) -> None:
    self._finalize()

  def close(self) -> None:
    self._finalize()
    if self._mgr is not None:
      self._mgr.close()
      self._mgr = None

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """(step, state, data_state) from the newest readable checkpoint, or None if there is none.

    Raises CheckpointMismatchError (and moves nothing) if a readable checkpoint does not fit
    `abstract_state`. Unreadable checkpoints newer than the restored one are reported with a
    CheckpointWarning and moved to MODEL_DIR/corrupt_checkpoints/ (by process 0); if every checkpoint is
    unreadable, CorruptCheckpointError is raised and nothing is moved.
    """
    steps = self.all_steps()
    corrupt: list[tuple[int, str]] = []
    for step in reversed(steps):
      step_dir = self.step_dir(step)
      try:
        verified = verify_integrity(step_dir)
        saved = _saved_metadata(step_dir)
      except CorruptCheckpointError as e:
        corrupt.append((step, str(e)))
        continue
      diffs = differences(saved, abstract_state)
      if diffs:
        raise CheckpointMismatchError(
            f"cannot resume from {step_dir}: it does not fit the configured model: {'; '.join(diffs)}. "
            f"Nothing was changed. Either point --model_dir at a new directory to start a new run, or "
            f"resume with the gin files and bindings of this run (its {STEP_CONFIG_FILE} is in "
            f"{step_dir if os.path.exists(os.path.join(step_dir, STEP_CONFIG_FILE)) else self.model_dir}).")
      try:
        state, data_state = _read_step(step_dir, abstract_state)
        if int(jax.device_get(state["step"])) != step:
          raise ValueError(f"checkpoint directory {step} holds step {int(jax.device_get(state['step']))}")
      except Exception as e:  # orbax/tensorstore raise many types for damaged files
        corrupt.append((step, f"{type(e).__name__}: {str(e)[:300]}"))
        continue
      if not verified:
        log.warning("Checkpoint %s has no checksums (saved by an older stmoe, or the run stopped right after "
                    "saving it): restored without verification.", step_dir)
      for bad, why in corrupt:
        msg = (f"Checkpoint at step {bad} in {self.directory} is corrupt or incomplete ({why}); it was moved "
               f"to {self._quarantine(bad)} and step {step} is used instead.")
        log.warning(msg)
        warnings.warn(msg, CheckpointWarning, stacklevel=2)
      return step, state, data_state
    if corrupt:
      detail = "; ".join(f"step {s}: {why}" for s, why in corrupt)
      raise CorruptCheckpointError(
          f"every checkpoint in {self.directory} is unreadable ({detail}). Nothing was changed: move the "
          "checkpoints directory aside to start again from scratch, or point --model_dir at a new directory.")
    return None

  def _quarantine(self, step: int) -> str:
    """Moves a step dir to MODEL_DIR/corrupt_checkpoints/<step>[.N] (a fresh name: never overwrites)."""
    dst_dir = os.path.join(self.model_dir, QUARANTINE_SUBDIR)
    dst = os.path.join(dst_dir, str(step))
    n = 0
    while os.path.exists(dst):
      n += 1
      dst = os.path.join(dst_dir, f"{step}.{n}")
    if jax.process_index() == 0:
      os.makedirs(dst_dir, exist_ok=True)
      src = self.step_dir(step)
      if os.path.exists(src):
        shutil.move(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"stmoe_quarantine_{step}")
    if self._mgr is not None:
      self._mgr.reload()
    return dst
