"""The inference export format (`stmoe export`) and loading a model + parameters from any checkpoint.

Layout of an export directory (everything a user needs to decode, nothing from training)::

    DIR/params/        the parameter pytree (orbax PyTree), float32 or bfloat16
    DIR/config.gin     the operative gin config of the run the checkpoint came from
    DIR/vocab.model    the SentencePiece vocabulary the model was trained with (T5 ids)
    DIR/export.json    {"format": "stmoe-export", "dtype", "step", "source", "num_parameters", ...}

`load(path)` reads an export directory OR a training checkpoint (resolved by stmoe.checkpoints.resolve:
MODEL_DIR, its checkpoints/ folder, a step directory, MODEL_DIR/best; the model comes from the nearest
config.gin -- the step's own copy first -- or from gin files you pass) and returns the model, float32
parameters and the vocabulary path. The checkpoint's gin config is parsed in isolation
(`gin_utils.isolated`): the caller's global gin configuration is left as it was.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Sequence

from stmoe.checkpoints import resolve as resolve_lib
from stmoe.errors import UserError

EXPORT_FILE = resolve_lib.EXPORT_FILE
PARAMS_SUBDIR = "params"
CONFIG_FILE = resolve_lib.CONFIG_FILE
VOCAB_FILE = "vocab.model"
FORMAT = "stmoe-export"


class ExportError(UserError):
  """A checkpoint/export directory that can't be read; the message says what to pass instead."""


is_export_dir = resolve_lib.is_export_dir
find_config = resolve_lib.nearest_config


@dataclasses.dataclass
class Loaded:
  """A model ready to decode/score: the API object, float32 params and where they came from."""
  model: Any
  params: Any
  vocab_path: str | None
  config_path: str | None
  step: int | None
  is_export: bool
  source: str
  config_text: str = ""  # the gin config the model was built from (as parsed, with your extra bindings)


def configure_model(config_path: str | None, gin_files: Sequence[str] = (),
                    bindings: Sequence[str] = ()) -> tuple[Any, str | None, str]:
  """(model, vocabulary path, config text) from a run's config.gin plus extra gin files / bindings.

  Parsed in isolation: the caller's global gin configuration is restored afterwards. Unknown
  configurables in the run's config (e.g. a callback of a module that is not imported) are skipped: only
  the model and data settings matter here.
  """
  import gin

  from stmoe import gin_utils

  if config_path is None and not gin_files:
    raise ExportError("No config.gin found next to the checkpoint: pass the model's gin file, e.g. "
                      "--gin_file models/st_moe_tiny.gin (and the bindings the run used, e.g. --gin.VOCAB_SIZE=8192).")
  with gin_utils.isolated():
    gin_utils.parse_gin(list(gin_files), list(bindings), check_macros=config_path is None)
    if config_path is not None:
      gin.parse_config_files_and_bindings([config_path], list(bindings), skip_unknown=True)
    # An operative config records the model's bindings under the scope of the macro that built it
    # (`MODEL/ModelConfig.d_model = ...` for `MODEL = @make_model()`); unscoped bindings are visible inside
    # the scope too, so building inside it works for both kinds of config file.
    with gin.config_scope("MODEL"):
      model = gin_utils.configured_model()
    return model, _resolve_vocab(), gin.config_str()


def _single_device_abstract(model: Any, dtype: Any = None):
  """The model's abstract parameters on one device (the shared run setup on a 1-device mesh), optionally
  in another dtype (a bfloat16 export)."""
  import jax

  from stmoe import partitioning
  from stmoe.training import setup as setup_lib

  mesh = partitioning.make_mesh(1, 1, devices=jax.devices()[:1])  # explicit: gin's mesh bindings do not apply
  setup = setup_lib.setup_run(model, mesh, batch_size=1, task_feature_lengths={"inputs": 8, "targets": 8})
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype or a.dtype, sharding=a.sharding),
                      setup.abstract_params)


def _to_float32(params: Any) -> Any:
  import jax
  import jax.numpy as jnp

  return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def _read_export_params(model: Any, export_dir: str) -> Any:
  import orbax.checkpoint as ocp

  from stmoe.checkpoints.manager import restore_args

  with open(os.path.join(export_dir, EXPORT_FILE), encoding="utf-8") as f:
    info = json.load(f)
  abstract = _single_device_abstract(model, info.get("dtype", "float32"))
  with ocp.PyTreeCheckpointer() as ckptr:
    params = ckptr.restore(os.path.join(export_dir, PARAMS_SUBDIR),
                           args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args(abstract)))
  return _to_float32(params)


def _read_params(model: Any, location: resolve_lib.CheckpointLocation) -> Any:
  """float32 parameters of `model` from a resolved export dir or step dir (verified, fit-checked)."""
  from stmoe.checkpoints import manager

  if location.is_export:
    return _read_export_params(model, location.path)
  return manager.restore_params(location.path, _single_device_abstract(model))


def _locate(path: str) -> resolve_lib.CheckpointLocation:
  try:
    return resolve_lib.resolve(path)
  except FileNotFoundError as e:
    raise ExportError(str(e)) from None


def load(path: str, gin_files: Sequence[str] = (), bindings: Sequence[str] = ()) -> Loaded:
  """Model + float32 parameters from an export directory or a training checkpoint (see module doc)."""
  location = _locate(path)
  model, vocab_path, config_text = configure_model(location.config_path, gin_files, bindings)
  if location.is_export:
    vocab = os.path.join(location.path, VOCAB_FILE)
    vocab_path = vocab if os.path.exists(vocab) else None
  return Loaded(model=model, params=_read_params(model, location), vocab_path=vocab_path,
                config_path=location.config_path, step=location.step, is_export=location.is_export,
                source=location.path, config_text=config_text)


def restore_for_model(model: Any, path: str) -> tuple[Any, int | None]:
  """(float32 params, step) for an already-configured `model` from an export dir or a training checkpoint."""
  location = _locate(path)
  return _read_params(model, location), location.step


def _resolve_vocab() -> str | None:
  """The vocabulary the (just parsed) config selects; None if it can't be resolved."""
  try:
    from stmoe.data import vocab

    return vocab.resolve_vocabulary_path()
  except Exception:  # no vocabulary available (e.g. bundled data missing): export without one
    return None


def num_parameters(params: Any) -> int:
  import jax
  import numpy as np

  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def export(checkpoint: str, output: str, *, bfloat16: bool = False, gin_files: Sequence[str] = (),
           bindings: Sequence[str] = ()) -> str:
  """Writes the export directory `output` from `checkpoint` (atomically: staged, then renamed)."""
  import jax
  import jax.numpy as jnp
  import orbax.checkpoint as ocp

  loaded = load(checkpoint, gin_files, bindings)  # an export can be re-exported (e.g. to cast to bfloat16)
  params = loaded.params
  dtype = "bfloat16" if bfloat16 else "float32"
  if bfloat16:
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
  output = os.path.abspath(os.path.expanduser(output))
  parent = os.path.dirname(output)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".export-tmp-", dir=parent)
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      ckptr.save(os.path.join(staging, PARAMS_SUBDIR), params)
    if loaded.config_path and os.path.exists(loaded.config_path):
      shutil.copyfile(loaded.config_path, os.path.join(staging, CONFIG_FILE))
    elif loaded.config_text:
      with open(os.path.join(staging, CONFIG_FILE), "w", encoding="utf-8") as f:
        f.write(loaded.config_text)
    if loaded.vocab_path and os.path.exists(loaded.vocab_path):
      shutil.copyfile(loaded.vocab_path, os.path.join(staging, VOCAB_FILE))
    info = {"format": FORMAT, "version": 1, "dtype": dtype, "step": loaded.step, "source": loaded.source,
            "num_parameters": num_parameters(params),
            "vocab_file": VOCAB_FILE if loaded.vocab_path else None,
            "bytes": sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(params))}
    with open(os.path.join(staging, EXPORT_FILE), "w", encoding="utf-8") as f:
      json.dump(info, f, indent=2, sort_keys=True)
    if os.path.exists(output):
      if not is_export_dir(output) and os.listdir(output):
        raise ExportError(f"--output {output!r} exists and is not an stmoe export directory; pick a new path.")
      shutil.rmtree(output)
    os.replace(staging, output)
  finally:
    if os.path.exists(staging):
      shutil.rmtree(staging, ignore_errors=True)
  return output


