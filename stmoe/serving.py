"""Run a serving export (`stmoe export --format stablehlo`) with only jax and numpy installed.

This file imports nothing from stmoe, flax, gin, seqio, TensorFlow, optax or orbax, so it also works when
copied on its own next to an application (`import serving`). The artifact directory holds::

    manifest.json       shapes, dtypes and feature names of each function, jax version, platforms
    score.stablehlo     jax.export-serialized (params, batch) -> summed target log-likelihood [batch]
    greedy.stablehlo    jax.export-serialized (params, inputs) -> greedy token ids [batch, max_decode_length]
    params.npz          the parameters, one array per '/'-joined path (bfloat16 stored as uint16 bits)
    vocab.model         the SentencePiece vocabulary (T5 ids: 0 padding, 1 EOS), if the model had one

The parameters are an argument of each function rather than constants baked into it: the programs stay
small, and one artifact serves every checkpoint of the same architecture (swap params.npz).

Shapes are fixed at export time (a polymorphic batch only where the export said so): a batch of another
shape is refused with a `ShapeMismatchError` naming the expected and the given shapes. MoE layers route the
tokens of several rows as one group that shares expert capacity, so pad a short batch with rows of zeros
rather than expecting per-row results to be independent of the batch they came in.

    import serving  # or: from stmoe import serving
    model = serving.load("/tmp/run_export/serving")
    ll = model.score({"encoder_input_tokens": enc, "decoder_target_tokens": tgt})  # [batch] float32
    ids = model.greedy({"encoder_input_tokens": enc})  # [batch, max_decode_length] int32, 0 after EOS
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np

MANIFEST_FILE = "manifest.json"
FORMAT = "stmoe-serving"
FORMAT_VERSION = 1
# Features of a t5x-style batch that the artifacts could be asked to honour but do not take (packing):
# passing one is an error rather than silently ignored.
_UNSUPPORTED_FEATURES = ("encoder_segment_ids", "decoder_segment_ids", "encoder_positions", "decoder_positions")


class ServingError(ValueError):
  """A serving artifact directory that can't be used as given; the message says what to change."""


class ShapeMismatchError(ServingError):
  """A batch whose features do not have the shapes the artifact was exported for."""


def _shape_str(shape: Any) -> str:
  return "[" + ", ".join(str(d) for d in shape) + "]"


class ServingFunction:
  """One exported function: checks and casts its batch, then calls the deserialized StableHLO program."""

  def __init__(self, name: str, spec: Mapping[str, Any], exported: Any):
    self.name = name
    self.spec = spec
    self.exported = exported
    # {feature: (shape with None for a symbolic dim, numpy dtype)}
    self.inputs: dict[str, tuple[tuple[int | None, ...], np.dtype]] = {
        k: (tuple(d if isinstance(d, int) else None for d in v["shape"]), _np_dtype(v["dtype"]))
        for k, v in spec["inputs"].items()}

  def check(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The batch restricted to this function's features, cast to their dtypes; raises on a wrong shape."""
    for name in _UNSUPPORTED_FEATURES:
      if name in batch and batch[name] is not None:
        raise ServingError(f"{self.name}: feature {name!r} (packed examples) is not supported by serving "
                           f"artifacts; pass one example per row. Inputs: {sorted(self.inputs)}.")
    missing = [k for k in self.inputs if k not in batch]
    if missing:
      raise ServingError(f"{self.name}: the batch lacks feature(s) {missing}; this artifact takes "
                         f"{ {k: _shape_str(s) for k, (s, _) in self.inputs.items()} }.")
    out = {}
    symbolic: int | None = None
    for k, (expected, dtype) in self.inputs.items():
      value = np.asarray(batch[k])
      given = tuple(value.shape)
      ok = len(given) == len(expected) and all(e is None or e == g for e, g in zip(expected, given))
      if ok and None in expected:  # a polymorphic batch: one size for every feature, at least 1
        size = given[expected.index(None)]
        ok = size >= 1 and (symbolic is None or symbolic == size)
        symbolic = size
      if not ok:
        want = {f: _shape_str(tuple("batch" if d is None else d for d in s)) for f, (s, _) in self.inputs.items()}
        got = {f: _shape_str(np.shape(batch[f])) for f in self.inputs}
        raise ShapeMismatchError(
            f"{self.name}: feature {k!r} has shape {_shape_str(given)} but the artifact was exported for "
            f"{_shape_str(tuple('batch' if d is None else d for d in expected))} (expected {want}, given {got}). "
            + ("Every feature must have the same number of rows. " if None in expected else "") +
            "Pad the batch to the exported size (rows and positions of zeros are padding), or re-export with "
            "`stmoe export --format stablehlo --batch_size/--inputs_length/--targets_length`.")
      out[k] = value.astype(dtype, copy=False)
    return out

  def __call__(self, params: Mapping[str, jax.Array], batch: Mapping[str, Any]) -> np.ndarray:
    return np.asarray(self.exported.call(dict(params), self.check(batch)))


class ServingModel:
  """A loaded serving export: parameters on the default device plus the score / greedy programs."""

  def __init__(self, path: str, manifest: Mapping[str, Any], params: Mapping[str, jax.Array],
               functions: Mapping[str, ServingFunction]):
    self.path = path
    self.manifest = manifest
    self.params = params
    self.functions = functions

  @property
  def vocab_path(self) -> str | None:
    """The SentencePiece vocabulary shipped with the artifact (None if the model had none)."""
    name = self.manifest.get("vocab_file")
    return os.path.join(self.path, name) if name else None

  def _fn(self, name: str) -> ServingFunction:
    if name not in self.functions:
      raise ServingError(f"{self.path} has no {name!r} function (it has {sorted(self.functions)}).")
    return self.functions[name]

  def score(self, batch: Mapping[str, Any]) -> np.ndarray:
    """Summed target log-likelihood per row [batch] float32, weighted by decoder_loss_weights.

    decoder_input_tokens defaults to decoder_target_tokens shifted right (start token 0), and
    decoder_loss_weights to (decoder_target_tokens > 0), as in an unpacked t5x batch.
    """
    batch = dict(batch)
    if "decoder_target_tokens" in batch:
      targets = np.asarray(batch["decoder_target_tokens"])
      if batch.get("decoder_input_tokens") is None:
        shifted = np.zeros_like(targets)  # [batch, length]
        shifted[..., 1:] = targets[..., :-1]
        batch["decoder_input_tokens"] = shifted
      if batch.get("decoder_loss_weights") is None:
        batch["decoder_loss_weights"] = (targets > 0).astype(np.float32)
    return self._fn("score")(self.params, batch)

  def greedy(self, batch: Mapping[str, Any]) -> np.ndarray:
    """Greedy decoding: token ids [batch, max_decode_length] int32, 0 after each row's EOS (id 1)."""
    return self._fn("greedy")(self.params, batch)


def _np_dtype(name: str) -> np.dtype:
  if name == "bfloat16":
    return np.dtype(jax.numpy.bfloat16)
  return np.dtype(name)


def read_manifest(path: str) -> dict[str, Any]:
  """The manifest of the artifact directory `path`; raises ServingError if it isn't one."""
  file = os.path.join(path, MANIFEST_FILE)
  if not os.path.exists(file):
    raise ServingError(f"{path!r} is not a serving export: {MANIFEST_FILE} is missing. Write one with "
                       "`stmoe export --checkpoint CKPT --format stablehlo` and pass its serving/ directory.")
  with open(file, encoding="utf-8") as f:
    manifest = json.load(f)
  if manifest.get("format") != FORMAT or int(manifest.get("version", 0)) > FORMAT_VERSION:
    raise ServingError(f"{file} is format {manifest.get('format')!r} version {manifest.get('version')}; this "
                       f"loader reads {FORMAT!r} up to version {FORMAT_VERSION}.")
  return manifest


def load_params(path: str, manifest: Mapping[str, Any]) -> dict[str, jax.Array]:
  """The flat {'/'-joined path: array} parameters of the artifact, placed on the default device."""
  spec = manifest["params"]
  dtype = _np_dtype(spec["dtype"])
  with np.load(os.path.join(path, spec["file"])) as npz:
    arrays = {k: npz[k] for k in npz.files}
  if sorted(arrays) != sorted(spec["names"]):
    raise ServingError(f"{spec['file']} in {path} holds {len(arrays)} arrays but the manifest lists "
                       f"{len(spec['names'])}; the parameters and the programs come from different exports.")
  if dtype == np.dtype(jax.numpy.bfloat16):
    arrays = {k: v.view(dtype) for k, v in arrays.items()}  # stored as uint16 bit patterns
  return {k: jax.device_put(v) for k, v in arrays.items()}


def load(path: str, functions: tuple[str, ...] | None = None) -> ServingModel:
  """Loads a serving export directory (manifest, parameters, programs) for the default jax backend."""
  path = os.path.abspath(os.path.expanduser(path))
  manifest = read_manifest(path)
  platform = jax.default_backend()
  platforms = [p.lower() for p in manifest.get("platforms", [])]
  if platforms and platform not in platforms and not (platform == "gpu" and {"cuda", "rocm"} & set(platforms)):
    raise ServingError(f"{path} was exported for platforms {platforms} but jax runs on {platform!r}; re-export "
                       f"with `--platforms {platform}` (several may be given, comma-separated).")
  fns = {}
  for name, spec in manifest["functions"].items():
    if functions is not None and name not in functions:
      continue
    with open(os.path.join(path, spec["file"]), "rb") as f:
      fns[name] = ServingFunction(name, spec, jax.export.deserialize(bytearray(f.read())))
  return ServingModel(path, manifest, load_params(path, manifest), fns)
