"""Serving exports: the model's scoring and greedy decoding as StableHLO programs (jax.export), or a SavedModel.

`stmoe export --format stablehlo` writes, beside the params-only export (stmoe.checkpoints.export)::

    DIR/serving/manifest.json     shapes, dtypes, feature names, vocab file, jax version, platforms
    DIR/serving/score.stablehlo   (params, batch) -> summed target log-likelihood [batch] float32
    DIR/serving/greedy.stablehlo  (params, inputs) -> greedy ids [batch, max_decode_length] int32
    DIR/serving/params.npz        flat {'/'-joined path: array} parameters, in the export's dtype
    DIR/serving/vocab.model       copy of the vocabulary, so that the folder stands alone

and `stmoe.serving` (jax + numpy only) loads and runs it. Parameters are an argument, not constants: the
programs stay a few hundred KB whatever the model size, and one program serves any checkpoint of the
architecture. bfloat16 exports keep bfloat16 parameters (cast to float32 inside the program, as
`checkpoints.export.load` does), so the numbers equal the params export's.

Shapes are fixed. A polymorphic batch (`batch_size=None`, `--batch_size poly`) is attempted on request but
MoE models cannot take it: `stmoe.moe.grouping` derives the number and size of the token groups from the
token count (group_size is an upper bound; groups split evenly over the devices) -- Python decisions on the count
that a symbolic batch leaves open (one-token decoding steps always hit them) -- and the rows of a group
share expert capacity anyway, so a row's output depends on the batch it came in. Dense models may export
with a symbolic batch.

`--format saved_model` writes DIR/saved_model through jax2tf (signatures `score` and `greedy`, parameters as
TF variables). TensorFlow's XlaCallModule only reads StableHLO up to its own version (TF 2.21: 1.13.7) while
jax.export targets a 4-week-old version (jax 0.10.2: 1.15.0), so the programs are serialised for the
12-week compatibility window while converting; the SavedModel is loaded and run once before it is kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from stmoe import serving
from stmoe.checkpoints import export as export_lib
from stmoe.errors import UserError

SERVING_SUBDIR = "serving"
SAVED_MODEL_SUBDIR = "saved_model"
PARAMS_FILE = "params.npz"
FORMATS = ("params", "stablehlo", "saved_model")


class ServingExportError(UserError):
  """A serving export that can't be written as asked; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class ServingShapes:
  """The fixed shapes of the exported programs.

  batch_size: rows per call; None for a symbolic batch (dense models only, see the module doc).
  inputs_length: encoder input tokens (encoder-decoder) or prompt tokens (decoder-only).
  targets_length: target tokens of a scored batch (decoder-only: scored length = inputs + targets).
  max_decode_length: tokens produced by greedy decoding; None: targets_length.
  """

  batch_size: int | None = 8
  inputs_length: int = 512
  targets_length: int = 114
  max_decode_length: int | None = None

  def __post_init__(self):
    for name in ("batch_size", "inputs_length", "targets_length", "max_decode_length"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value < 1):
        raise ServingExportError(f"{name}={value!r}: pass a positive integer.")

  @property
  def decode_length(self) -> int:
    return self.max_decode_length or self.targets_length


def _flatten(params: Any) -> dict[str, Any]:
  """{'/'-joined path: leaf} of a nested-dict parameter tree."""
  import jax

  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    flat["/".join(str(getattr(k, "key", k)) for k in path)] = leaf
  return flat


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """The nested dict tree back from `_flatten`'s keys."""
  tree: dict[str, Any] = {}
  for key, leaf in flat.items():
    *parents, last = key.split("/")
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[last] = leaf
  return tree


def _score_features(model: Any, model_type: str, shapes: ServingShapes, batch: Any) -> dict[str, tuple[tuple, Any]]:
  """{feature: (shape, dtype)} of the scoring program's batch (t5x feature names).

  Decoder-only models score inputs_length + targets_length tokens; decoder_causal_attention (the prefix
  mask) is an input only for prefix LMs.
  """
  import jax.numpy as jnp

  from stmoe.training import layout

  lengths = {"inputs": shapes.inputs_length, "targets": shapes.targets_length}
  feats = dict(layout.input_shapes_for(model_type, 1, lengths))
  if model_type == "decoder_only" and not getattr(model.config, "prefix_lm", False):
    feats.pop("decoder_causal_attention", None)
  return {k: ((batch,) + tuple(s[1:]), jnp.float32 if k == "decoder_loss_weights" else jnp.int32)
          for k, s in feats.items()}


def _greedy_features(model_type: str, shapes: ServingShapes, batch: Any) -> dict[str, tuple[tuple, Any]]:
  """{feature: (shape, dtype)} of the greedy program's inputs: encoder tokens, or the decoder-only prompt."""
  import jax.numpy as jnp

  name = "decoder_input_tokens" if model_type == "decoder_only" else "encoder_input_tokens"
  return {name: ((batch, shapes.inputs_length), jnp.int32)}


def _programs(model: Any, shapes: ServingShapes, model_type: str) -> dict[str, Callable]:
  """The functions to export, each (flat params, batch) -> array, calling only the public model API."""
  import jax
  import jax.numpy as jnp

  from stmoe.decoding import DecodeConfig

  def unpack(flat):
    params = _unflatten(flat)
    return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)

  def score(flat, batch):
    return model.score_batch(unpack(flat), batch)  # [batch] float32

  decode_config = DecodeConfig(method="greedy", max_decode_length=shapes.decode_length)

  def greedy(flat, batch):
    batch = dict(batch)
    if model_type != "decoder_only":  # predict_batch's batch carries decoder tokens: zeros of the output size
      rows = batch["encoder_input_tokens"].shape[0]
      batch["decoder_input_tokens"] = jnp.zeros((rows, shapes.decode_length), jnp.int32)
    return model.predict_batch(unpack(flat), batch, None, decode_config=decode_config)  # [batch, length]

  return {"score": score, "greedy": greedy}


def _dim(d: Any) -> int | str:
  return d if isinstance(d, int) else str(d)


def _export_program(fn: Callable, flat_params: Mapping[str, Any], features: Mapping[str, tuple[tuple, Any]],
                    platforms: Sequence[str]):
  """jax.export of `fn` at the given abstract shapes; a symbolic batch that can't trace is a user error."""
  import jax
  from jax._src.export.shape_poly import InconclusiveDimensionOperation  # not re-exported by jax.export

  abstract_params = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat_params.items()}
  abstract_batch = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in features.items()}
  try:
    return jax.export.export(jax.jit(fn), platforms=tuple(platforms))(abstract_params, abstract_batch)
  except InconclusiveDimensionOperation as e:
    raise ServingExportError(
        "A polymorphic batch (--batch_size poly) can't be exported for this model: "
        f"{str(e).splitlines()[0]} MoE layers choose their token groups from the number of tokens "
        "(stmoe.moe.grouping: group_size is an upper bound), which a symbolic batch leaves undecided. "
        "Pass an integer --batch_size.") from None


def _poly_batch():
  import jax

  (dim,) = jax.export.symbolic_shape("batch")
  return dim


def _describe(features: Mapping[str, tuple[tuple, Any]]) -> dict[str, Any]:
  import numpy as np_

  return {k: {"shape": [_dim(d) for d in s], "dtype": np_.dtype(d).name} for k, (s, d) in features.items()}


def _params_for_storage(flat: Mapping[str, Any], dtype: str) -> dict[str, np.ndarray]:
  """numpy copies for params.npz: bfloat16 as uint16 bit patterns (npz has no bfloat16 type)."""
  import jax.numpy as jnp

  out = {}
  for k, v in flat.items():
    arr = np.asarray(v)
    if dtype == "bfloat16" and np.issubdtype(arr.dtype, np.floating):
      arr = np.asarray(jnp.asarray(arr, jnp.bfloat16)).view(np.uint16)
    out[k] = arr
  return out


def _as_export_dtype(flat: Mapping[str, Any], dtype: str) -> dict[str, Any]:
  import jax.numpy as jnp

  if dtype != "bfloat16":
    return dict(flat)
  return {k: v.astype(jnp.bfloat16) if jnp.issubdtype(v.dtype, jnp.floating) else v for k, v in flat.items()}


def write_stablehlo(export_dir: str, shapes: ServingShapes, *, platforms: Sequence[str] | None = None,
                    functions: Sequence[str] = ("score", "greedy")) -> str:
  """Writes EXPORT_DIR/serving/ (see the module doc) from a params export directory; returns its path.

  The model and parameters are read back from the export (`checkpoints.export.load`), so the programs
  compute exactly what the params export does. Written atomically: staged, then renamed.
  """
  import jax

  loaded = export_lib.load(export_dir)
  with open(os.path.join(export_dir, export_lib.EXPORT_FILE), encoding="utf-8") as f:
    info = json.load(f)
  dtype = info.get("dtype", "float32")
  from stmoe.training import layout

  model_type = layout.model_type_of(loaded.model)
  platforms = tuple(p.lower() for p in (platforms or (jax.default_backend(),)))
  platforms = tuple("cuda" if p == "gpu" else p for p in platforms)
  flat = _as_export_dtype(_flatten(loaded.params), dtype)
  batch = _poly_batch() if shapes.batch_size is None else shapes.batch_size
  programs = _programs(loaded.model, shapes, model_type)
  features = {"score": _score_features(loaded.model, model_type, shapes, batch),
              "greedy": _greedy_features(model_type, shapes, batch)}
  outputs = {"score": {"name": "log_likelihood", "shape": [_dim(batch)], "dtype": "float32"},
             "greedy": {"name": "ids", "shape": [_dim(batch), shapes.decode_length], "dtype": "int32"}}

  out = os.path.join(os.path.abspath(export_dir), SERVING_SUBDIR)
  with _staging(out) as staging:
    manifest_fns = {}
    for name in functions:
      exported = _export_program(programs[name], flat, features[name], platforms)
      file = f"{name}.stablehlo"
      with open(os.path.join(staging, file), "wb") as f:
        f.write(exported.serialize())
      manifest_fns[name] = {"file": file, "inputs": _describe(features[name]), "output": outputs[name],
                            "platforms": list(exported.platforms)}
    stored = _params_for_storage(flat, dtype)
    np.savez(os.path.join(staging, PARAMS_FILE), **stored)
    vocab = None
    if loaded.vocab_path and os.path.exists(loaded.vocab_path):
      vocab = export_lib.VOCAB_FILE
      shutil.copyfile(loaded.vocab_path, os.path.join(staging, vocab))
    manifest = {
        "format": serving.FORMAT, "version": serving.FORMAT_VERSION, "model_type": model_type,
        "jax_version": jax.__version__, "platforms": list(platforms),
        "batch_size": shapes.batch_size, "inputs_length": shapes.inputs_length,
        "targets_length": shapes.targets_length, "max_decode_length": shapes.decode_length,
        "eos_id": 1, "pad_id": 0, "vocab_file": vocab, "step": info.get("step"), "source": info.get("source"),
        "params": {"file": PARAMS_FILE, "dtype": dtype, "names": sorted(stored),
                   "num_parameters": int(sum(v.size for v in stored.values())),
                   "bytes": int(sum(v.nbytes for v in stored.values()))},
        "functions": manifest_fns,
    }
    with open(os.path.join(staging, serving.MANIFEST_FILE), "w", encoding="utf-8") as f:
      json.dump(manifest, f, indent=2, sort_keys=True)
  return out


@contextlib.contextmanager
def _staging(out: str) -> Iterator[str]:
  """A temporary folder beside `out` that replaces `out` when the block succeeds."""
  parent = os.path.dirname(out)
  staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}-tmp-", dir=parent)
  try:
    yield staging
    if os.path.exists(out):
      shutil.rmtree(out)
    os.replace(staging, out)
  finally:
    if os.path.exists(staging):
      shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _tf_compatible_stablehlo() -> Iterator[None]:
  """Serialises jax.export programs for the 12-week StableHLO window (what TF's XlaCallModule can read).

  jax 0.10.2 has no public switch for the target version, so this swaps jax's private serialiser while
  jax2tf converts; if that private function is gone (another jax version) the conversion runs unchanged and
  the round-trip check in `write_saved_model` reports any incompatibility.
  """
  try:
    from jax._src import xla_bridge
    from jax._src.export import _export
    from jax._src.lib import _jax
    from jax._src.lib.mlir.dialects import hlo
  except ImportError:
    yield
    return
  original = getattr(_export, "_module_to_bytecode", None)
  if original is None:
    yield
    return

  def to_bytecode(module):
    target = hlo.get_version_from_compatibility_requirement(hlo.StablehloCompatibilityRequirement.WEEK_12)
    return _jax.mlir.serialize_portable_artifact(module, target, xla_bridge.get_backend().serialize_with_sdy)

  _export._module_to_bytecode = to_bytecode
  try:
    yield
  finally:
    _export._module_to_bytecode = original


def write_saved_model(export_dir: str, shapes: ServingShapes, *,
                      functions: Sequence[str] = ("score", "greedy")) -> str:
  """Writes EXPORT_DIR/saved_model (jax2tf): signatures per function, parameters as TF variables.

  Raises ServingExportError if TensorFlow is missing or the SavedModel it wrote does not run.
  """
  try:
    import tensorflow as tf
    from jax.experimental import jax2tf
  except ImportError as e:
    raise ServingExportError(f"--format saved_model needs TensorFlow and jax2tf ({e}); install tensorflow, "
                             "or use --format stablehlo (runs with jax only).") from None
  if shapes.batch_size is None:
    raise ServingExportError("--format saved_model needs an integer --batch_size.")
  loaded = export_lib.load(export_dir)
  from stmoe.training import layout

  model_type = layout.model_type_of(loaded.model)
  flat = {k: np.asarray(v) for k, v in _flatten(loaded.params).items()}
  programs = _programs(loaded.model, shapes, model_type)
  features = {"score": _score_features(loaded.model, model_type, shapes, shapes.batch_size),
              "greedy": _greedy_features(model_type, shapes, shapes.batch_size)}
  out = os.path.join(os.path.abspath(export_dir), SAVED_MODEL_SUBDIR)
  # jax2tf lowers when the tf.functions are traced (get_concrete_function and save): all inside the switch.
  with _tf_compatible_stablehlo(), _staging(out) as staging:
    module = tf.Module()
    module.params = {k: tf.Variable(v, trainable=False, name=k.replace("/", "__")) for k, v in flat.items()}
    signatures = {}
    for name in functions:
      converted = jax2tf.convert(programs[name], with_gradient=False)
      spec = {k: tf.TensorSpec(s, tf.as_dtype(np.dtype(d)), name=k) for k, (s, d) in features[name].items()}
      out_name = "log_likelihood" if name == "score" else "ids"
      fn = tf.function(functools.partial(_tf_serve, converted, module.params, out_name), autograph=False,
                       input_signature=[spec])
      setattr(module, name, fn)
      signatures[name] = fn.get_concrete_function()
    signatures["serving_default"] = signatures[functions[0]]
    tf.saved_model.save(module, staging, signatures=signatures)
    _check_saved_model(tf, staging, features, functions)
  return out


def _tf_serve(converted: Callable, params: Mapping[str, Any], out_name: str, batch: Mapping[str, Any]):
  return {out_name: converted(dict(params), dict(batch))}


def _check_saved_model(tf: Any, path: str, features: Mapping[str, Mapping[str, tuple]],
                       functions: Sequence[str]) -> None:
  """Runs each signature once on a zeros batch; a TF that can't read the programs is a clear error."""
  reloaded = tf.saved_model.load(path)
  for name in functions:
    zeros = {k: tf.zeros(s, tf.as_dtype(np.dtype(d))) for k, (s, d) in features[name].items()}
    try:
      reloaded.signatures[name](**zeros)
    except Exception as e:  # tf.errors.* from XlaCallModule
      import jax

      raise ServingExportError(
          f"The SavedModel's {name!r} signature does not run in TensorFlow {tf.__version__} with programs "
          f"from jax {jax.__version__}: {' '.join(str(e).split())[:300]} ... Use --format stablehlo (jax only), "
          "or a TensorFlow release as new as your jax.") from None


def parse_batch_size(text: str) -> int | None:
  """`--batch_size` value: a positive integer, or 'poly' for a symbolic batch (None)."""
  if text.strip().lower() == "poly":
    return None
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise ServingExportError(f"--batch_size={text!r}: pass a positive integer or 'poly'.")
  return value
