"""Hugging Face T5-family configs <-> :class:`stmoe.config.ModelConfig`: field mapping and checks.

Import: :func:`check_architecture` and :func:`check_special_tokens` refuse checkpoints stmoe cannot
represent, :func:`t5_family_kwargs` maps the fields T5 and SwitchTransformers configs share, and
:func:`activation_from_hf` maps HF activation names. Export: :func:`check_exportable`,
:func:`t5_family_config` and :func:`activation_to_hf` go the other way. The feed-forward specific fields
(``feed_forward_proj``, the Switch router settings) are mapped in hf_t5.py / hf_switch.py.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from stmoe.config import ModelConfig

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
