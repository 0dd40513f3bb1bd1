"""Shared pieces of the Hugging Face importers (T5 and SwitchTransformers).

Both HF architectures are the same T5 encoder-decoder apart from the feed-forward block, so everything
but the feed-forward conversion lives here:

* reading a checkpoint: a ``save_pretrained`` directory (config.json + safetensors or pytorch_model.bin,
  single or sharded) or an in-memory ``transformers`` model; safetensors are read with NumPy only, so
  neither torch nor transformers is needed to import a safetensors checkpoint;
* :class:`HFWeights`: name lookup that remembers which tensors were used, so a conversion that leaves
  a tensor behind fails loudly instead of silently dropping weights;
* the mapping of the T5 fields shared by both configs onto :class:`stmoe.config.ModelConfig`;
* the conversion of embeddings, attention, norms, relative position biases and the output head, with a
  caller-supplied function for each layer's feed-forward block;
* a final check of the converted tree against the tree the stmoe model itself initialises.

HF ``nn.Linear`` weights are ``[out, in]``; stmoe kernels are ``[in, out]`` with heads split out:
``q.weight [heads*kv, embed]`` -> ``query/kernel [embed, heads, kv]`` and ``o.weight [embed, heads*kv]``
-> ``out/kernel [heads, kv, embed]`` (HF reshapes the inner dimension as ``(heads, kv)``, head-major).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from stmoe.config import ModelConfig

Params = dict[str, Any]
StateDict = dict[str, np.ndarray]
# (weights, hf_prefix of the block's feed-forward sub-layer, role, layer index) -> {"mlp": ...} or {"moe": ...}
FeedForwardFn = Callable[["HFWeights", str, str, int], Params]

# HF activation names (ACT2FN keys) -> stmoe activation names. HF "gelu" is the exact erf form; T5's
# "gelu_new" (also written "gelu_pytorch_tanh") is the tanh approximation, which stmoe calls "gelu".
_HF_ACTIVATIONS = {
    "relu": "relu",
    "gelu_new": "gelu",
    "gelu_pytorch_tanh": "gelu",
    "gelu": "gelu_exact",
    "silu": "silu",
    "swish": "silu",
    "linear": "linear",
}


# --------------------------------------------------------------------------------------------------------
# Configs.
# --------------------------------------------------------------------------------------------------------


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


def check_architecture(cfg: Mapping[str, Any], *, model_types: Iterable[str], architectures: Iterable[str],
                       importer: str) -> None:
  """Raises a ValueError naming the model type / architecture when this importer cannot convert it."""
  model_types, architectures = tuple(model_types), tuple(architectures)
  model_type = cfg.get("model_type")
  if model_type not in model_types:
    raise ValueError(
        f"{importer} converts model_type in {model_types}, but this checkpoint has model_type={model_type!r}. "
        f"Use the importer for that architecture (stmoe.interop.hf_t5 for T5/mT5, stmoe.interop.hf_switch for "
        f"SwitchTransformers); other architectures are not supported.")
  bad = [a for a in cfg.get("architectures") or () if a not in architectures]
  if bad:
    raise ValueError(
        f"{importer} converts {architectures} checkpoints, but this one is {bad}: stmoe needs the full "
        f"encoder-decoder with its LM head. Save the model as one of {architectures}.")


def check_special_tokens(cfg: Mapping[str, Any]) -> None:
  """stmoe hard-codes pad 0 (masks are `token > 0`) and decoder start 0; other ids cannot be represented."""
  pad = cfg.get("pad_token_id", 0)
  start = cfg.get("decoder_start_token_id", 0)
  if pad not in (0, None):
    raise ValueError(f"pad_token_id={pad} is unsupported: stmoe treats token id 0 as padding. Remap the "
                     f"vocabulary so that padding is id 0 (T5's convention).")
  if start not in (0, None):
    raise ValueError(f"decoder_start_token_id={start} is unsupported: stmoe's decoder always starts from id 0.")


def activation_from_hf(name: str) -> str:
  """HF activation name (ACT2FN key) -> stmoe activation name, or a ValueError naming the unsupported one."""
  if name not in _HF_ACTIVATIONS:
    raise ValueError(f"Activation {name!r} is not supported; stmoe supports the HF activations "
                     f"{sorted(_HF_ACTIVATIONS)}.")
  return _HF_ACTIVATIONS[name]


def t5_family_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """ModelConfig keyword arguments for the fields HF T5 and SwitchTransformers configs share."""
  num_layers = int(cfg["num_layers"])
  num_decoder_layers = cfg.get("num_decoder_layers")
  return dict(
      vocab_size=int(cfg["vocab_size"]),
      d_model=int(cfg["d_model"]),
      num_heads=int(cfg["num_heads"]),
      d_kv=int(cfg["d_kv"]),
      d_ff=int(cfg["d_ff"]),
      num_encoder_layers=num_layers,
      num_decoder_layers=num_layers if num_decoder_layers is None else int(num_decoder_layers),
      dropout_rate=float(cfg.get("dropout_rate", 0.1)),
      relative_attention_num_buckets=int(cfg.get("relative_attention_num_buckets", 32)),
      relative_attention_max_distance=int(cfg.get("relative_attention_max_distance", 128)),
      layer_norm_epsilon=float(cfg.get("layer_norm_epsilon", 1e-6)),
      # PretrainedConfig's default is True; both HF models then rescale by d_model**-0.5 before the tied
      # projection, which is exactly stmoe's logits_via_embedding.
      logits_via_embedding=bool(cfg.get("tie_word_embeddings", True)),
  )


# --------------------------------------------------------------------------------------------------------
# Reading checkpoints.
# --------------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------------
# Weight lookup and conversion of the shared T5 parts.
# --------------------------------------------------------------------------------------------------------


class HFWeights:
  """A HF state dict with use tracking; every tensor must be consumed exactly by the conversion."""

  def __init__(self, state: StateDict):
    self._state = state
    self._used: set[str] = set()

  def has(self, name: str) -> bool:
    return name in self._state

  def get(self, name: str) -> np.ndarray:
    """The float32 tensor `name` (marked as used)."""
    if name not in self._state:
      raise KeyError(f"The checkpoint has no tensor {name!r}; it does not match its config (a different "
                     f"architecture, or a truncated/sharded save with a shard missing).")
    self._used.add(name)
    return np.asarray(self._state[name], dtype=np.float32)

  def get_alias(self, names: Iterable[str]) -> np.ndarray:
    """The first of `names` present; all present ones must be equal (HF ties them) and are marked used."""
    present = [n for n in names if n in self._state]
    if not present:
      raise KeyError(f"The checkpoint has none of {list(names)}.")
    value = self.get(present[0])
    for other in present[1:]:
      if not np.array_equal(value, self.get(other)):
        raise ValueError(f"{present[0]} and {other} differ, but stmoe shares one embedding between the encoder, "
                         f"the decoder (and the tied output head); this checkpoint cannot be represented.")
    return value

  def mark_used(self, names: Iterable[str]) -> None:
    self._used.update(n for n in names if n in self._state)

  def check_all_used(self) -> None:
    left = sorted(set(self._state) - self._used)
    if left:
      shown = ", ".join(left[:8]) + (f" ... ({len(left)} in all)" if len(left) > 8 else "")
      raise ValueError(f"The conversion did not use these checkpoint tensors: {shown}. The checkpoint has "
                       f"features stmoe's model does not (e.g. biases); refusing to drop weights silently.")


def dense_kernel(w: np.ndarray) -> np.ndarray:
  """HF nn.Linear weight [out, in] -> stmoe kernel [in, out]."""
  return np.ascontiguousarray(w.T)


def attention_params(weights: HFWeights, prefix: str, num_heads: int, d_kv: int) -> Params:
  """`prefix` is e.g. 'encoder.block.0.layer.0.SelfAttention'; HF q/k/v [heads*kv, embed], o [embed, heads*kv]."""
  out = {}
  for hf, ours in (("q", "query"), ("k", "key"), ("v", "value")):
    w = weights.get(f"{prefix}.{hf}.weight")  # [heads*kv, embed]
    out[ours] = {"kernel": dense_kernel(w).reshape(w.shape[1], num_heads, d_kv)}  # [embed, heads, kv]
  o = weights.get(f"{prefix}.o.weight")  # [embed, heads*kv]
  out["out"] = {"kernel": dense_kernel(o).reshape(num_heads, d_kv, o.shape[0])}  # [heads, kv, embed]
  return out


def norm_params(weights: HFWeights, name: str) -> Params:
  return {"scale": weights.get(name)}


def dense_mlp_params(weights: HFWeights, prefix: str, activations: tuple[str, ...]) -> Params:
  """HF T5 DenseReluDense / DenseGatedActDense (wi or wi_0, wi_1; wo) -> stmoe MlpBlock params."""
  if len(activations) == 1:
    out = {"wi": {"kernel": dense_kernel(weights.get(f"{prefix}.wi.weight"))}}  # [embed, mlp]
  else:
    out = {f"wi_{i}": {"kernel": dense_kernel(weights.get(f"{prefix}.wi_{i}.weight"))} for i in range(len(activations))}
  out["wo"] = {"kernel": dense_kernel(weights.get(f"{prefix}.wo.weight"))}  # [mlp, embed]
  return out


def _stack_params(weights: HFWeights, cfg: ModelConfig, role: str, feed_forward: FeedForwardFn) -> Params:
  """One HF stack ('encoder' | 'decoder') -> stmoe TransformerStack params.

  HF keeps the relative position bias table in block 0's self-attention and reuses it in every block;
  stmoe keeps it once per stack as relpos_bias/rel_embedding [buckets, heads].
  """
  n = cfg.num_encoder_layers if role == "encoder" else cfg.num_decoder_layers
  if weights.has(f"{role}.block.{n}.layer.0.SelfAttention.q.weight"):
    raise ValueError(f"The checkpoint's {role} has more than the {n} layers its config declares.")
  params: Params = {
      "relpos_bias": {"rel_embedding": weights.get(f"{role}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")},
      "final_norm": norm_params(weights, f"{role}.final_layer_norm.weight"),
  }
  for i in range(n):
    block = f"{role}.block.{i}.layer"
    layer = {
        "pre_self_attention_norm": norm_params(weights, f"{block}.0.layer_norm.weight"),
        "self_attention": attention_params(weights, f"{block}.0.SelfAttention", cfg.num_heads, cfg.d_kv),
    }
    ff = 1
    if role == "decoder":
      layer["pre_cross_attention_norm"] = norm_params(weights, f"{block}.1.layer_norm.weight")
      layer["encoder_decoder_attention"] = attention_params(weights, f"{block}.1.EncDecAttention", cfg.num_heads,
                                                            cfg.d_kv)
      ff = 2
    layer["pre_mlp_norm"] = norm_params(weights, f"{block}.{ff}.layer_norm.weight")
    layer.update(feed_forward(weights, f"{block}.{ff}", role, i))
    params[f"layer_{i}"] = layer
  return params


def encoder_decoder_params(weights: HFWeights, cfg: ModelConfig, feed_forward: FeedForwardFn) -> Params:
  """The whole stmoe EncoderDecoder param tree from a HF T5-family state dict."""
  params: Params = {
      "token_embedder": {"embedding": weights.get_alias(
          ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"))},  # [vocab, embed]
      "encoder": _stack_params(weights, cfg, "encoder", feed_forward),
      "decoder": _stack_params(weights, cfg, "decoder", feed_forward),
  }
  if cfg.logits_via_embedding:
    weights.mark_used(["lm_head.weight"])  # an alias of shared.weight in memory; absent from tied saves
  else:
    params["head"] = {"logits_dense": {"kernel": dense_kernel(weights.get("lm_head.weight"))}}  # [embed, vocab]
  weights.check_all_used()
  return params


def check_against_model(params: Params, model: Any) -> None:
  """Raises if `params` differs in names or shapes from what `model` itself initialises (nothing materialised)."""
  import jax

  shapes = {"encoder_input_tokens": (1, 1), "decoder_input_tokens": (1, 1)}
  expected = jax.eval_shape(lambda rng: model.get_initial_variables(rng, shapes)["params"], jax.random.PRNGKey(0))
  flat = lambda tree: {"/".join(str(getattr(k, "key", k)) for k in path): tuple(v.shape)
                       for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  got, want = flat(params), flat(expected)
  missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  wrong = sorted(k for k in set(got) & set(want) if got[k] != want[k])
  if missing or extra or wrong:
    raise ValueError(
        "Converted parameters do not fit the stmoe model built from the config: "
        f"missing {missing[:6]}, unexpected {extra[:6]}, wrong shapes "
        f"{[(k, got[k], want[k]) for k in wrong[:6]]}.")


# --------------------------------------------------------------------------------------------------------
# Export: the inverse mapping, stmoe params -> HF state dict / save_pretrained directory.
# --------------------------------------------------------------------------------------------------------

# (HF feed-forward name, is_gated) for each stmoe activation tuple HF can express.
_TO_HF_ACTIVATION = {"relu": "relu", "gelu": "gelu_new", "gelu_exact": "gelu", "silu": "silu"}


def activation_to_hf(activations: tuple[str, ...]) -> tuple[str, bool]:
  """stmoe activations -> (HF activation name, gated?); ("gelu", "linear") -> ("gelu_new", True)."""
  gated = len(activations) == 2 and activations[1] == "linear"
  if not (len(activations) == 1 or gated) or activations[0] not in _TO_HF_ACTIVATION:
    raise ValueError(f"activations={activations} have no Hugging Face equivalent; HF T5-family models support "
                     f"(ACT,) or (ACT, 'linear') with ACT in {sorted(_TO_HF_ACTIVATION)}.")
  return _TO_HF_ACTIVATION[activations[0]], gated


def check_exportable(cfg: ModelConfig) -> None:
  if cfg.decoder_only:
    raise ValueError("Only encoder-decoder models can be exported to Hugging Face T5/Switch; this one is "
                     "decoder_only.")


def t5_family_config(cfg: ModelConfig) -> dict[str, Any]:
  """The HF config fields that T5 and SwitchTransformers share, from a stmoe ModelConfig."""
  return {
      "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.d_kv, "d_ff": cfg.d_ff,
      "num_heads": cfg.num_heads, "num_layers": cfg.num_encoder_layers,
      "num_decoder_layers": cfg.num_decoder_layers,
      "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
      "relative_attention_max_distance": cfg.relative_attention_max_distance,
      "dropout_rate": cfg.dropout_rate, "layer_norm_epsilon": cfg.layer_norm_epsilon,
      "tie_word_embeddings": cfg.logits_via_embedding, "is_encoder_decoder": True,
      "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
  }


def _np(x: Any) -> np.ndarray:
  return np.asarray(x, dtype=np.float32)


def to_hf_linear(kernel: Any) -> np.ndarray:
  """stmoe kernel [in, out] -> HF nn.Linear weight [out, in]."""
  return np.ascontiguousarray(_np(kernel).T)


def export_attention(params: Params, prefix: str) -> StateDict:
  out = {}
  for hf, ours in (("q", "query"), ("k", "key"), ("v", "value")):
    k = _np(params[ours]["kernel"])  # [embed, heads, kv]
    out[f"{prefix}.{hf}.weight"] = to_hf_linear(k.reshape(k.shape[0], -1))  # [heads*kv, embed]
  o = _np(params["out"]["kernel"])  # [heads, kv, embed]
  out[f"{prefix}.o.weight"] = to_hf_linear(o.reshape(-1, o.shape[-1]))  # [embed, heads*kv]
  return out


def export_dense_mlp(params: Params, prefix: str) -> StateDict:
  return {f"{prefix}.{name}.weight": to_hf_linear(value["kernel"]) for name, value in params.items()}


# (stmoe layer params, hf prefix of the feed-forward sub-layer, role, index) -> HF tensors of that sub-layer
FeedForwardExportFn = Callable[[Params, str, str, int], StateDict]


def export_encoder_decoder(params: Params, cfg: ModelConfig, feed_forward: FeedForwardExportFn) -> StateDict:
  """HF T5-family state dict from stmoe EncoderDecoder params (the inverse of encoder_decoder_params).

  The embedding is written as ``shared.weight`` and also as ``{encoder,decoder}.embed_tokens.weight``:
  HF SwitchTransformers re-ties the stacks' embeddings to ``shared`` only when tie_word_embeddings is
  set, so an untied Switch checkpoint without them would load with freshly initialised embeddings.
  A tied ``lm_head`` is not written (HF ties it to ``shared`` when loading).
  """
  check_exportable(cfg)
  embedding = _np(params["token_embedder"]["embedding"])  # [vocab, embed]
  state: StateDict = {name: embedding for name in
                      ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")}
  for role in ("encoder", "decoder"):
    stack = params[role]
    n = cfg.num_encoder_layers if role == "encoder" else cfg.num_decoder_layers
    state[f"{role}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = _np(
        stack["relpos_bias"]["rel_embedding"])
    state[f"{role}.final_layer_norm.weight"] = _np(stack["final_norm"]["scale"])
    for i in range(n):
      layer, block = stack[f"layer_{i}"], f"{role}.block.{i}.layer"
      state[f"{block}.0.layer_norm.weight"] = _np(layer["pre_self_attention_norm"]["scale"])
      state.update(export_attention(layer["self_attention"], f"{block}.0.SelfAttention"))
      ff = 1
      if role == "decoder":
        state[f"{block}.1.layer_norm.weight"] = _np(layer["pre_cross_attention_norm"]["scale"])
        state.update(export_attention(layer["encoder_decoder_attention"], f"{block}.1.EncDecAttention"))
        ff = 2
      state[f"{block}.{ff}.layer_norm.weight"] = _np(layer["pre_mlp_norm"]["scale"])
      state.update(feed_forward(layer, f"{block}.{ff}", role, i))
  if not cfg.logits_via_embedding:
    state["lm_head.weight"] = to_hf_linear(params["head"]["logits_dense"]["kernel"])  # [vocab, embed]
  return state


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
