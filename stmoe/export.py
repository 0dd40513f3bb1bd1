"""`stmoe export`: an inference checkpoint -- parameters only, optionally bfloat16, with its config and vocab.

    stmoe export --checkpoint /tmp/run [--output /tmp/run_export] [--bfloat16]

Layout of an export directory (everything a user needs to decode, nothing from training)::

    DIR/params/        the parameter pytree (orbax PyTree), float32 or bfloat16
    DIR/config.gin     the operative gin config of the run the checkpoint came from
    DIR/vocab.model    the SentencePiece vocabulary the model was trained with (T5 ids)
    DIR/export.json    {"format": "stmoe-export", "dtype", "step", "source", "num_parameters", ...}

`load(path)` reads an export directory OR a training checkpoint (MODEL_DIR, its checkpoints/ folder or a
step directory; the model comes from the nearest config.gin, or from gin files you pass) and returns the
model, float32 parameters and the vocabulary path; `stmoe infer` and `stmoe eval` use it, so both accept
either kind of directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Sequence

from stmoe.errors import UserError, run_command

EXPORT_FILE = "export.json"
PARAMS_SUBDIR = "params"
CONFIG_FILE = "config.gin"
VOCAB_FILE = "vocab.model"
FORMAT = "stmoe-export"


class ExportError(UserError):
  """A checkpoint/export directory that can't be read; the message says what to pass instead."""


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


def is_export_dir(path: str) -> bool:
  return os.path.exists(os.path.join(path, EXPORT_FILE))


def find_config(path: str) -> str | None:
  """The config.gin of an export dir, a step dir, a checkpoints dir or a MODEL_DIR: the nearest one, so a
  step directory's own copy (the config that produced that step) wins over MODEL_DIR/config.gin."""
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


def configure_model(config_path: str | None, gin_files: Sequence[str] = (), bindings: Sequence[str] = ()):
  """Parses the run's config.gin (plus extra gin files/bindings) and builds the configured model.

  Clears the global gin config first. Unknown configurables in the run's config (e.g. a callback from a
  module that is not imported) are skipped: only the model and data settings matter here.
  """
  import gin

  from stmoe import gin_utils
  import stmoe.training.evaluate  # noqa: F401  (registers what run configs bind)
  import stmoe.training.trainer  # noqa: F401
  import stmoe.training.finetune  # noqa: F401

  if config_path is None and not gin_files:
    raise ExportError("No config.gin found next to the checkpoint: pass the model's gin file, e.g. "
                      "--gin_file models/st_moe_tiny.gin (and the bindings the run used, e.g. --gin.VOCAB_SIZE=8192).")
  gin_utils.parse_gin(list(gin_files), list(bindings), check_macros=config_path is None)
  if config_path is not None:
    gin.parse_config_files_and_bindings([config_path], list(bindings), skip_unknown=True)
  # An operative config records the model's bindings under the scope of the macro that built it
  # (`MODEL/ModelConfig.d_model = ...` for `MODEL = @make_model()`); unscoped bindings are visible inside
  # the scope too, so building inside it works for both kinds of config file.
  with gin.config_scope("MODEL"):
    return gin_utils.configured_model()


def _single_device_abstract(model: Any, dtype: Any = None):
  import jax

  from stmoe.training import layout

  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  example = layout.input_shapes_for(layout.model_type_of(model), 1, {"inputs": 8, "targets": 8})
  shapes = jax.eval_shape(lambda: model.get_initial_variables(jax.random.PRNGKey(0), example)["params"])
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype or a.dtype, sharding=sharding), shapes)


def _step_of(step_dir: str) -> int | None:
  """The training step of a step directory (MODEL_DIR/best records it in best_metric.json)."""
  name = os.path.basename(step_dir.rstrip("/"))
  if name.isdigit():
    return int(name)
  best = os.path.join(step_dir, "best_metric.json")
  if os.path.exists(best):
    with open(best, encoding="utf-8") as f:
      return json.load(f).get("step")
  return None


def _to_float32(params: Any) -> Any:
  import jax
  import jax.numpy as jnp

  return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def load(path: str, gin_files: Sequence[str] = (), bindings: Sequence[str] = ()) -> Loaded:
  """Model + float32 parameters from an export directory or a training checkpoint (see module doc)."""
  import orbax.checkpoint as ocp

  from stmoe import checkpoints as ckpt_lib
  from stmoe.checkpoints import _restore_args

  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise ExportError(f"{path!r} does not exist: pass an export directory (stmoe export) or a MODEL_DIR.")
  if is_export_dir(path):
    with open(os.path.join(path, EXPORT_FILE), encoding="utf-8") as f:
      info = json.load(f)
    config_path = os.path.join(path, CONFIG_FILE)
    model = configure_model(config_path if os.path.exists(config_path) else None, gin_files, bindings)
    abstract = _single_device_abstract(model, info.get("dtype", "float32"))
    with ocp.PyTreeCheckpointer() as ckptr:
      params = ckptr.restore(os.path.join(path, PARAMS_SUBDIR),
                             args=ocp.args.PyTreeRestore(item=abstract, restore_args=_restore_args(abstract)))
    vocab = os.path.join(path, VOCAB_FILE)
    return Loaded(model=model, params=_to_float32(params), vocab_path=vocab if os.path.exists(vocab) else None,
                  config_path=config_path, step=info.get("step"), is_export=True, source=path)
  try:
    step_dir = ckpt_lib.latest_step_dir(path)
  except FileNotFoundError as e:
    raise ExportError(str(e)) from e
  config_path = find_config(step_dir)
  model = configure_model(config_path, gin_files, bindings)
  params = ckpt_lib.restore_params(step_dir, _single_device_abstract(model))
  return Loaded(model=model, params=params, vocab_path=_resolve_vocab(), config_path=config_path,
                step=_step_of(step_dir), is_export=False, source=step_dir)


def restore_for_model(model: Any, path: str) -> tuple[Any, int | None]:
  """(float32 params, step) for an already-configured `model` from an export dir or a training checkpoint."""
  import orbax.checkpoint as ocp

  from stmoe import checkpoints as ckpt_lib
  from stmoe.checkpoints import _restore_args

  path = os.path.abspath(os.path.expanduser(path))
  if is_export_dir(path):
    with open(os.path.join(path, EXPORT_FILE), encoding="utf-8") as f:
      info = json.load(f)
    abstract = _single_device_abstract(model, info.get("dtype", "float32"))
    with ocp.PyTreeCheckpointer() as ckptr:
      params = ckptr.restore(os.path.join(path, PARAMS_SUBDIR),
                             args=ocp.args.PyTreeRestore(item=abstract, restore_args=_restore_args(abstract)))
    return _to_float32(params), info.get("step")
  step_dir = ckpt_lib.latest_step_dir(path)
  return ckpt_lib.restore_params(step_dir, _single_device_abstract(model)), _step_of(step_dir)


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

  loaded = load(checkpoint, gin_files, bindings)
  if loaded.is_export and not bfloat16:
    pass  # re-exporting an export: allowed (e.g. to cast), the params are already float32 here
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
    elif gin_files or bindings:
      import gin

      with open(os.path.join(staging, CONFIG_FILE), "w", encoding="utf-8") as f:
        f.write(gin.config_str())
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


def main(argv: list[str] | None = None) -> int:
  """`stmoe export`: write an inference checkpoint (parameters only, optionally bfloat16)."""
  return run_command("stmoe export", _main, list(argv or []))


def _main(argv: list[str]) -> int:
  from stmoe import gin_utils

  parser = argparse.ArgumentParser(prog="stmoe export", description=main.__doc__)
  parser.add_argument("--checkpoint", required=True,
                      help="MODEL_DIR, its checkpoints/ folder, a step directory or MODEL_DIR/best")
  parser.add_argument("--output", default=None, help="export directory to write (default: CHECKPOINT_export)")
  parser.add_argument("--bfloat16", action="store_true", help="store the parameters as bfloat16 (half the size)")
  gin_utils.add_gin_flags(parser)
  args, bindings = gin_utils.parse_known_gin_args(parser, argv)
  output = args.output or os.path.abspath(os.path.expanduser(args.checkpoint)).rstrip("/") + "_export"
  try:
    out = export(args.checkpoint, output, bfloat16=args.bfloat16, gin_files=args.gin_file, bindings=bindings)
  except FileNotFoundError as e:
    raise ExportError(str(e)) from e
  with open(os.path.join(out, EXPORT_FILE), encoding="utf-8") as f:
    info = json.load(f)
  print(f"stmoe export: wrote {out} ({info['num_parameters']:,} parameters, {info['dtype']}, "
        f"{info['bytes'] / 2**20:.1f} MiB, step {info['step']})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
