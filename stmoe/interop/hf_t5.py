"""Import Hugging Face T5 / mT5 (``T5ForConditionalGeneration``) checkpoints into stmoe.

    from stmoe.interop import hf_t5
    model, params = hf_t5.load_pretrained("/path/to/t5-small")   # a save_pretrained directory
    model, params = hf_t5.load_pretrained(hf_model)               # or an in-memory torch model
    scores = model.score_batch(params, batch)

T5.0 (``feed_forward_proj="relu"``, tied embeddings with the d_model**-0.5 rescale) and T5.1.1 / mT5
(``"gated-gelu"``, separate ``lm_head``) are both supported; see docs/interop.md for the name mapping.
A safetensors directory is read with NumPy only (no torch, no transformers needed).

Export goes the other way: ``hf_t5.save_pretrained(params, config, directory)`` writes config.json and
model.safetensors that ``T5ForConditionalGeneration.from_pretrained(directory)`` loads.
"""

from __future__ import annotations

from typing import Any, Mapping

from stmoe.config import ModelConfig
from stmoe.interop import config_map, files, param_layout, verify

MODEL_TYPES = ("t5", "mt5")
ARCHITECTURES = ("T5ForConditionalGeneration", "MT5ForConditionalGeneration")


def activations_from_feed_forward_proj(feed_forward_proj: str) -> tuple[str, ...]:
  """HF ``feed_forward_proj`` -> stmoe activations: "gated-gelu" -> ("gelu", "linear"), "relu" -> ("relu",).

  HF's rule: "gated-ACT" is a gated MLP act(x wi_0) * (x wi_1), "ACT" a plain one; "gated-gelu" means
  the tanh-approximated gelu ("gelu_new") for backwards compatibility, while a plain "gelu" is exact.
  """
  parts = feed_forward_proj.split("-")
  if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
    raise ValueError(f"feed_forward_proj={feed_forward_proj!r} is not 'ACT' or 'gated-ACT'.")
  act = "gelu_new" if feed_forward_proj == "gated-gelu" else parts[-1]
  ours = config_map.activation_from_hf(act)
  return (ours, "linear") if len(parts) == 2 else (ours,)


def config_from_hf(hf_config: Any, **overrides: Any) -> ModelConfig:
  """A dense stmoe ModelConfig equivalent to a HF T5Config (object, dict, or path to config.json).

  `overrides` replace ModelConfig fields afterwards (e.g. dtype="bfloat16", dropout_rate=0.0).
  """
  cfg = files.config_dict(hf_config)
  config_map.check_architecture(cfg, model_types=MODEL_TYPES, architectures=ARCHITECTURES,
                            importer="stmoe.interop.hf_t5")
  config_map.check_special_tokens(cfg)
  kwargs = config_map.t5_family_kwargs(cfg)
  kwargs["activations"] = activations_from_feed_forward_proj(cfg.get("feed_forward_proj", "relu"))
  kwargs.update(overrides)
  return ModelConfig(**kwargs)


def _feed_forward(weights: verify.HFWeights, prefix: str, role: str, index: int, *, config: ModelConfig):
  del role, index
  return {"mlp": param_layout.dense_mlp_params(weights, f"{prefix}.DenseReluDense", config.activations)}


def params_from_state_dict(state: Mapping[str, Any], config: ModelConfig) -> dict:
  """stmoe params (float32 numpy) from a HF T5 state dict {name: array} and the matching ModelConfig."""
  weights = verify.HFWeights(dict(state))
  return param_layout.encoder_decoder_params(
      weights, config, lambda w, prefix, role, i: _feed_forward(w, prefix, role, i, config=config))


def load_pretrained(source: Any, **overrides: Any):
  """(model, params) from a T5 save_pretrained directory or an in-memory T5ForConditionalGeneration.

  model is ``stmoe.models.api.make_model(config_from_hf(...))``; params is the float32 parameter tree
  (NumPy arrays), checked against the tree the model initialises. `overrides` replace ModelConfig fields.
  """
  from stmoe.models.api import make_model

  hf_cfg, state = files.read_source(source)
  config = config_from_hf(hf_cfg, **overrides)
  model = make_model(config)
  params = params_from_state_dict(state, config)
  verify.check_against_model(params, model)
  return model, params


# --------------------------------------------------------------------------------------------------------
# Export.
# --------------------------------------------------------------------------------------------------------


def feed_forward_proj_from_activations(activations: tuple[str, ...]) -> str:
  """stmoe activations -> HF feed_forward_proj (the inverse of activations_from_feed_forward_proj)."""
  act, gated = config_map.activation_to_hf(activations)
  if not gated:
    return act
  if act == "gelu":
    raise ValueError("Gated exact gelu (('gelu_exact', 'linear')) has no HF T5 spelling: 'gated-gelu' means the "
                     "tanh approximation. Use activations=('gelu', 'linear').")
  return "gated-gelu" if act == "gelu_new" else f"gated-{act}"


def to_hf_config(config: ModelConfig) -> dict[str, Any]:
  """A HF T5Config dict (config.json contents) for a dense stmoe encoder-decoder."""
  config_map.check_exportable(config)
  if config.is_sparse:
    raise ValueError("This model has MoE layers; export it with stmoe.interop.hf_switch (top-1 Switch models) "
                     "instead of hf_t5.")
  out = config_map.t5_family_config(config)
  out.update(model_type="t5", architectures=list(ARCHITECTURES[:1]),
             feed_forward_proj=feed_forward_proj_from_activations(config.activations))
  return out


def _export_feed_forward(layer: dict, prefix: str, role: str, index: int) -> dict:
  del role, index
  return param_layout.export_dense_mlp(layer["mlp"], f"{prefix}.DenseReluDense")


def state_dict_from_params(params: Mapping[str, Any], config: ModelConfig) -> dict:
  """HF T5 state dict {name: float32 numpy} from stmoe params (the inverse of params_from_state_dict)."""
  to_hf_config(config)  # validates that HF T5 can express the model
  return param_layout.export_encoder_decoder(params, config, _export_feed_forward)


def save_pretrained(params: Mapping[str, Any], config: ModelConfig, directory: Any) -> str:
  """Writes a directory that transformers' T5ForConditionalGeneration.from_pretrained loads (safetensors)."""
  return files.write_directory(directory, to_hf_config(config), state_dict_from_params(params, config))
