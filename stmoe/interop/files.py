"""Hugging Face checkpoint files: reading ``save_pretrained`` directories and writing them back.

* A directory holds config.json plus model.safetensors or pytorch_model.bin, single or sharded
  (``*.index.json``). Safetensors are read with NumPy only (bfloat16 through ml_dtypes), so neither torch
  nor transformers is needed to import a safetensors checkpoint; a .bin pickle needs torch.
* An in-memory ``transformers`` model is read through its ``state_dict()`` and ``config``.
* :func:`write_directory` writes config.json and a float32 model.safetensors, as save_pretrained does.

Nothing here knows the T5 layout: names and shapes are converted in :mod:`stmoe.interop.param_layout`.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Callable, Mapping

import numpy as np

StateDict = dict[str, np.ndarray]  # HF tensor name -> array


def config_dict(hf_config: Any) -> dict[str, Any]:
  """A HF config as a plain dict: accepts a ``PretrainedConfig``, a dict (config.json) or a json path."""
  if isinstance(hf_config, Mapping):
    return dict(hf_config)
  if isinstance(hf_config, (str, os.PathLike)):
    path = os.fspath(hf_config)
    if os.path.isdir(path):
      path = os.path.join(path, "config.json")
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  if hasattr(hf_config, "to_dict"):
    return hf_config.to_dict()
  raise TypeError(f"Expected a transformers config, a dict or a path to config.json; got {type(hf_config)!r}.")


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
                       "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _read_safetensors_raw(path: str) -> StateDict:
  """Minimal safetensors reader (8-byte header length, JSON header, raw little-endian data).

  Used for dtypes that `safetensors.numpy` cannot return (bfloat16, via ml_dtypes, which JAX ships).
  """
  import ml_dtypes  # a JAX dependency

  dtypes = dict(_SAFETENSORS_DTYPES, BF16=ml_dtypes.bfloat16)
  with open(path, "rb") as f:
    (header_len,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(header_len))
    data = f.read()
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in dtypes:
      raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, which stmoe cannot read; re-save the "
                       f"model in float32, float16 or bfloat16.")
    start, end = info["data_offsets"]
    out[name] = np.frombuffer(data[start:end], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
  return out


def _read_safetensors(path: str) -> StateDict:
  try:
    from safetensors.numpy import load_file
  except ImportError:
    return _read_safetensors_raw(path)
  try:
    return load_file(path)
  except (KeyError, TypeError, ValueError):  # e.g. bfloat16, which NumPy has no dtype for
    return _read_safetensors_raw(path)


def _read_torch_bin(path: str) -> StateDict:
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"{path} is a PyTorch pickle, which needs torch to read. Install torch, or re-save the "
                      f"model with save_pretrained(..., safe_serialization=True) to get model.safetensors.") from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  return {k: v.detach().to(torch.float32).numpy() for k, v in state.items()}


def _read_sharded(directory: str, index_file: str, reader: Callable[[str], StateDict]) -> StateDict:
  with open(os.path.join(directory, index_file), encoding="utf-8") as f:
    weight_map = json.load(f)["weight_map"]
  out: StateDict = {}
  for shard in sorted(set(weight_map.values())):
    out.update(reader(os.path.join(directory, shard)))
  return out


def read_directory(directory: str) -> tuple[dict[str, Any], StateDict]:
  """(config.json as a dict, {name: array}) from a ``save_pretrained`` directory."""
  directory = os.fspath(directory)
  config_path = os.path.join(directory, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{directory} has no config.json; pass a directory written by transformers' "
                            f"save_pretrained (or an in-memory model).")
  cfg = config_dict(config_path)
  candidates = (
      ("model.safetensors", _read_safetensors, False),
      ("model.safetensors.index.json", _read_safetensors, True),
      ("pytorch_model.bin", _read_torch_bin, False),
      ("pytorch_model.bin.index.json", _read_torch_bin, True),
  )
  for name, reader, sharded in candidates:
    if os.path.isfile(os.path.join(directory, name)):
      state = _read_sharded(directory, name, reader) if sharded else reader(os.path.join(directory, name))
      return cfg, state
  raise FileNotFoundError(
      f"{directory} has no model.safetensors or pytorch_model.bin (single or sharded). TensorFlow/Flax "
      f"checkpoints are not read directly: load them with transformers and save_pretrained them first.")


def read_source(source: Any) -> tuple[dict[str, Any], StateDict]:
  """(HF config dict, {name: float array}) from a directory path or an in-memory transformers model."""
  if isinstance(source, (str, os.PathLike)):
    return read_directory(source)
  if hasattr(source, "state_dict") and hasattr(source, "config"):
    import torch  # an in-memory model means torch is there

    state = {k: v.detach().to(torch.float32).cpu().numpy() for k, v in source.state_dict().items()}
    return config_dict(source.config), state
  raise TypeError(f"Expected a save_pretrained directory or an in-memory transformers model, got {type(source)!r}.")


def write_directory(directory: Any, hf_config: Mapping[str, Any], state: StateDict) -> str:
  """Writes config.json and model.safetensors (float32) like save_pretrained; needs neither torch nor transformers."""
  from safetensors.numpy import save_file

  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
    json.dump(dict(hf_config), f, indent=2, sort_keys=True)
  save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()},
            os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
  return directory
