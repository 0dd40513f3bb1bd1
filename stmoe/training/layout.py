"""Feature layouts: which batch features a model consumes, derived from the model itself.

A model is one of three kinds, and every path (train, eval, task eval, infer, export) derives the batch
layout from it rather than from a separate flag:

* ``encoder_decoder``: ``encoder_input_tokens`` [B, Li] + ``decoder_*`` [B, Lt]; tasks need "inputs" and
  "targets" (seqio's EncDecFeatureConverter);
* ``decoder_only`` (``ModelConfig.decoder_only``): one ``decoder_*`` stream. A task with only "targets"
  (``*_lm``) trains a causal LM on [B, Lt]; a task with "inputs" too (``*_prefix_lm``, span corruption)
  trains a prefix LM on [B, Li + Lt] with ``decoder_causal_attention`` marking the inputs
  (seqio's DecoderFeatureConverter picks between the two from TASK_FEATURE_LENGTHS);
* ``prefix_lm``: the same as decoder_only with inputs, requested explicitly (PrefixLMFeatureConverter).
"""

from __future__ import annotations

from typing import Any, Mapping

from stmoe.errors import TaskModelMismatchError, UserError

MODEL_TYPES = ("encoder_decoder", "decoder_only", "prefix_lm")


def model_type_of(model: Any) -> str:
  """"decoder_only" for a model (or ModelConfig) with decoder_only=True, else "encoder_decoder"."""
  config = getattr(model, "config", model)
  return "decoder_only" if getattr(config, "decoder_only", False) else "encoder_decoder"


def resolve_model_type(model: Any, requested: str | None = None) -> str:
  """The model's own type; an explicitly requested one must agree with it (prefix_lm for decoder-only)."""
  own = model_type_of(model)
  if requested is None:
    return own
  if requested not in MODEL_TYPES:
    raise UserError(f"model_type={requested!r} is not one of {MODEL_TYPES}; leave it unset: it follows the model.")
  compatible = {"encoder_decoder": ("encoder_decoder",), "decoder_only": ("decoder_only", "prefix_lm")}[own]
  if requested not in compatible:
    raise TaskModelMismatchError(
        f"model_type={requested!r} was requested but the configured model is {own} "
        f"(ModelConfig.decoder_only={own == 'decoder_only'}). Remove the model_type binding: the feature "
        "layout follows the model.")
  return requested


def check_feature_lengths(model_type: str, lengths: Mapping[str, int]) -> None:
  """TASK_FEATURE_LENGTHS must name what the model consumes, with positive integer lengths."""
  if not isinstance(lengths, Mapping):
    raise UserError(f"TASK_FEATURE_LENGTHS must be a dict such as {{'inputs': 512, 'targets': 114}}, got {lengths!r}.")
  need = ("inputs", "targets") if model_type == "encoder_decoder" else ("targets",)
  missing = [k for k in need if k not in lengths]
  if missing:
    example = "{'inputs': 512, 'targets': 114}" if model_type == "encoder_decoder" else "{'targets': 512}"
    raise UserError(f"TASK_FEATURE_LENGTHS={dict(lengths)!r} has no {' or '.join(repr(k) for k in missing)} "
                    f"length, which {'an' if model_type[0] in 'aeiou' else 'a'} {model_type} model needs: pass e.g. "
                    f"\"--gin.TASK_FEATURE_LENGTHS={example}\".")
  for k, v in lengths.items():
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      raise UserError(f"TASK_FEATURE_LENGTHS[{k!r}]={v!r} must be a positive integer.")


def check_task_features(model_type: str, task_name: str, task_features: set[str] | frozenset[str],
                        lengths: Mapping[str, int]) -> None:
  """Refuses a task whose features do not fit the model (naming both) before anything is compiled."""
  has_inputs = "inputs" in task_features
  if model_type == "encoder_decoder" and not has_inputs:
    raise TaskModelMismatchError(
        f"task {task_name!r} has only {sorted(task_features)} (a language-modelling task) but the model is "
        "encoder-decoder, which needs 'inputs' and 'targets'. Use a decoder-only model (e.g. --gin_file "
        "models/moe_lm_tiny.gin) or a task with inputs (e.g. *_span_corruption).")
  if model_type != "encoder_decoder" and has_inputs and "inputs" not in lengths:
    raise TaskModelMismatchError(
        f"task {task_name!r} has 'inputs' and 'targets' but TASK_FEATURE_LENGTHS={dict(lengths)!r} has no "
        "'inputs' length, so the decoder-only model would silently train on the targets alone. Add an "
        "'inputs' length (prefix LM) or use the task's *_lm variant.")
  if model_type == "prefix_lm" and not has_inputs:
    raise TaskModelMismatchError(f"model_type='prefix_lm' needs a task with inputs; {task_name!r} has only "
                                 f"{sorted(task_features)}.")


def input_shapes_for(model_type: str, batch_size: int, lengths: Mapping[str, int]) -> dict[str, tuple[int, int]]:
  """Feature shapes of a global batch, from the task feature lengths (used for shapes-only init)."""
  lt = int(lengths["targets"])
  if model_type in ("decoder_only", "prefix_lm"):
    n = lt + int(lengths.get("inputs", 0))
    shapes = {"decoder_input_tokens": (batch_size, n), "decoder_target_tokens": (batch_size, n),
              "decoder_loss_weights": (batch_size, n)}
    if "inputs" in lengths:
      shapes["decoder_causal_attention"] = (batch_size, n)
    return shapes
  li = int(lengths["inputs"])
  return {"encoder_input_tokens": (batch_size, li), "decoder_input_tokens": (batch_size, lt),
          "decoder_target_tokens": (batch_size, lt), "decoder_loss_weights": (batch_size, lt)}
