"""Import Hugging Face SwitchTransformers (``SwitchTransformersForConditionalGeneration``) checkpoints.

    from stmoe.interop import hf_switch
    model, params = hf_switch.load_pretrained("/path/to/switch-base-8", group_size=512)

How HF Switch maps onto stmoe (transformers 4.57.6, modeling_switch_transformers.py):

* Block i of a stack is sparse iff ``i % sparse_step == 1`` (or every block if ``sparse_step == 1``):
  ``SparseLayout(kind="hf_switch", every=sparse_step)``.
* Top-1 tokens-choose routing; experts are plain (non-gated) MLPs with ``dense_act_fn`` (ReLU); the expert
  output is multiplied by the top-1 router probability, which is stmoe's combine weight with
  ``renormalize="none"``; ``expert_capacity`` is an absolute slot count per group:
  ``capacity_convention="absolute"``; slots go in token order (HF's cumsum over the sequence).
* HF's routing group is one sequence (``[batch, seq, experts]``, capacity counted along ``seq``).
  stmoe groups ``group_size`` consecutive tokens of the flattened batch, one size for both stacks: with
  ``group_size`` equal to a stack's sequence length, that stack's groups are exactly HF's. When no token
  overflows its expert (e.g. eval with enough capacity) the outputs do not depend on grouping at all.
* Router: ``router.classifier.weight [experts, embed]`` -> ``moe/router/w [embed, experts]`` (no bias),
  float32 router math whatever HF's ``router_dtype``; jitter U(1-eps, 1+eps) on the router input in training
  only.
* Experts ``experts.expert_j.{wi,wo}.weight`` -> stacked ``moe/experts/wi [expert, embed, mlp]`` and
  ``moe/experts/wo [expert, mlp, embed]``.

Differences that cannot be configured away are listed in docs/interop.md (padding tokens, HF's
cross-layer aux loss, decoding-time grouping).

Export: ``hf_switch.save_pretrained(params, config, directory)`` for top-1 models HF can express (it
raises naming every feature HF Switch lacks: top-2, renormalisation, extra dense MLPs, gated experts, ...).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from stmoe.config import ModelConfig, MoeConfig, SparseLayout
from stmoe.interop import config_map, files, param_layout, verify

MODEL_TYPES = ("switch_transformers",)
ARCHITECTURES = ("SwitchTransformersForConditionalGeneration",)


def _sparse_step(cfg: Mapping[str, Any], stack: str) -> int:
  """HF's encoder_sparse_step / decoder_sparse_step (stored in config.json, else derived as HF does)."""
  key = f"{stack}_sparse_step"
  if cfg.get(key) is not None:
    return int(cfg[key])
  layers = int(cfg["num_layers"]) if stack == "encoder" else int(cfg.get("num_decoder_layers") or cfg["num_layers"])
  num_sparse = int(cfg.get(f"num_sparse_{stack}_layers", 3))
  return layers // num_sparse if num_sparse > 0 else layers


def sparse_layout_from_step(step: int) -> SparseLayout:
  """HF: block i sparse iff (i % step == 1 or step == 1) if step > 0 else never."""
  return SparseLayout(kind="hf_switch", every=step) if step > 0 else SparseLayout(kind="none")


def config_from_hf(hf_config: Any, *, group_size: int = 512, moe_overrides: Mapping[str, Any] | None = None,
                   **overrides: Any) -> ModelConfig:
  """A sparse stmoe ModelConfig equivalent to a HF SwitchTransformersConfig (object, dict or config.json path).

  group_size: tokens per routing group. HF routes each sequence as one group; pass the sequence length
    to reproduce its capacity decisions exactly (see the module docstring).
  moe_overrides / overrides: replace MoeConfig / ModelConfig fields afterwards (e.g. dispatch="einsum",
    dtype="bfloat16").
  """
  cfg = files.config_dict(hf_config)
  config_map.check_architecture(cfg, model_types=MODEL_TYPES, architectures=ARCHITECTURES,
                            importer="stmoe.interop.hf_switch")
  config_map.check_special_tokens(cfg)
  if cfg.get("router_bias", False):
    raise ValueError("router_bias=True is unsupported: stmoe's router has no bias (as in Switch/ST-MoE). "
                     "Only checkpoints with router_bias=False can be imported.")
  act = config_map.activation_from_hf(cfg.get("dense_act_fn", "relu"))
  kwargs = config_map.t5_family_kwargs(cfg)
  kwargs["activations"] = (act,)
  moe = MoeConfig(
      num_experts=int(cfg["num_experts"]),
      num_selected_experts=1,
      router_type="tokens_choose",
      d_ff=int(cfg["d_ff"]),
      activations=(act,),
      group_size=int(group_size),
      capacity_convention="absolute",
      expert_capacity=int(cfg.get("expert_capacity", 64)),
      renormalize="none",  # the combine weight is the top-1 probability itself
      load_balance_count="top1",
      jitter_noise=float(cfg.get("router_jitter_noise", 0.0)),
      expert_dropout=kwargs["dropout_rate"],  # HF's experts are DenseActDense, with dropout before wo
      aux_loss_coef=float(cfg.get("router_aux_loss_coef", 1e-3)),
      router_z_loss_coef=float(cfg.get("router_z_loss_coef", 1e-3)),
      # HF's router_dtype is not carried over: stmoe's router math is always float32 (MoeConfig.router_dtype).
  )
  if moe_overrides:
    moe = dataclasses.replace(moe, **dict(moe_overrides))
  kwargs.update(
      moe=moe,
      encoder_sparse=sparse_layout_from_step(_sparse_step(cfg, "encoder")),
      decoder_sparse=sparse_layout_from_step(_sparse_step(cfg, "decoder")),
  )
  kwargs.update(overrides)
  return ModelConfig(**kwargs)


def _feed_forward(weights: verify.HFWeights, prefix: str, role: str, index: int, *, config: ModelConfig):
  """HF SwitchTransformersLayerFF.mlp: DenseActDense (wi, wo) or SparseMLP (router + experts)."""
  layout = config.encoder_sparse if role == "encoder" else config.decoder_sparse
  num_layers = config.num_encoder_layers if role == "encoder" else config.num_decoder_layers
  sparse = index in layout.sparse_indices(num_layers)
  has_router = weights.has(f"{prefix}.mlp.router.classifier.weight")
  if sparse != has_router:
    raise ValueError(f"{role} block {index} is {'sparse' if has_router else 'dense'} in the checkpoint but the "
                     f"config's sparse step makes it {'sparse' if sparse else 'dense'}; config.json does not "
                     f"match the weights.")
  if not sparse:
    return {"mlp": param_layout.dense_mlp_params(weights, f"{prefix}.mlp", config.activations)}
  moe = config.moe
  router = weights.get(f"{prefix}.mlp.router.classifier.weight")  # [experts, embed]
  experts = [f"{prefix}.mlp.experts.expert_{j}" for j in range(moe.num_experts)]
  if weights.has(f"{prefix}.mlp.experts.expert_{moe.num_experts}.wi.weight"):
    raise ValueError(f"{prefix} has more experts than num_experts={moe.num_experts}.")
  wi = np.stack([param_layout.dense_kernel(weights.get(f"{e}.wi.weight")) for e in experts])  # [expert, embed, mlp]
  wo = np.stack([param_layout.dense_kernel(weights.get(f"{e}.wo.weight")) for e in experts])  # [expert, mlp, embed]
  return {"moe": {"router": {"w": param_layout.dense_kernel(router)}, "experts": {"wi": wi, "wo": wo}}}


def params_from_state_dict(state: Mapping[str, Any], config: ModelConfig) -> dict:
  """stmoe params (float32 numpy) from a HF SwitchTransformers state dict and the matching ModelConfig."""
  weights = verify.HFWeights(dict(state))
  return param_layout.encoder_decoder_params(
      weights, config, lambda w, prefix, role, i: _feed_forward(w, prefix, role, i, config=config))


def load_pretrained(source: Any, *, group_size: int = 512, moe_overrides: Mapping[str, Any] | None = None,
                    **overrides: Any):
  """(model, params) from a SwitchTransformers save_pretrained directory or an in-memory model.

  See :func:`config_from_hf` for group_size and the overrides; params are float32 NumPy arrays, checked
  against the tree the model initialises.
  """
  from stmoe.models.api import make_model

  hf_cfg, state = files.read_source(source)
  config = config_from_hf(hf_cfg, group_size=group_size, moe_overrides=moe_overrides, **overrides)
  model = make_model(config)
  params = params_from_state_dict(state, config)
  verify.check_against_model(params, model)
  return model, params


# --------------------------------------------------------------------------------------------------------
# Export.
# --------------------------------------------------------------------------------------------------------


def _sparse_step_for(layout: SparseLayout, num_layers: int) -> int:
  """The HF sparse step whose placement equals `layout`'s in a `num_layers` stack (0: no sparse layer)."""
  want = layout.sparse_indices(num_layers)
  for step in range(0, num_layers + 1):
    if sparse_layout_from_step(step).sparse_indices(num_layers) == want:
      return step
  raise ValueError(f"Sparse layers {want} of a {num_layers}-layer stack cannot be expressed by HF's sparse step "
                   f"(block i sparse iff i % step == 1); use SparseLayout(kind='hf_switch', every=step).")


def to_hf_config(config: ModelConfig, *, expert_capacity: int | None = None) -> dict[str, Any]:
  """A HF SwitchTransformersConfig dict (config.json) for a top-1 stmoe model; raises naming what HF lacks.

  expert_capacity: HF's slots per expert per sequence; defaults to MoeConfig.expert_capacity when the
    model uses the "absolute" capacity convention (other conventions have no HF equivalent: pass it).
  """
  config_map.check_exportable(config)
  moe = config.moe
  if moe is None:
    raise ValueError("This model has no MoE config; export dense models with stmoe.interop.hf_t5.")
  problems = []
  if moe.router_type != "tokens_choose" or moe.num_selected_experts != 1:
    problems.append(f"router_type={moe.router_type!r} with k={moe.num_selected_experts} (HF Switch is "
                    f"tokens-choose top-1)")
  if moe.renormalize != "none":
    problems.append(f"renormalize={moe.renormalize!r} (HF scales by the top-1 probability itself)")
  if moe.batch_prioritized_routing:
    problems.append("batch_prioritized_routing=True (HF admits tokens in sequence order)")
  if moe.extra_dense_mlp:
    problems.append("extra_dense_mlp=True (HF has no dense MLP beside the experts)")
  if moe.d_ff != config.d_ff or tuple(moe.activations) != tuple(config.activations):
    problems.append(f"experts (d_ff={moe.d_ff}, {moe.activations}) differ from the dense MLPs "
                    f"(d_ff={config.d_ff}, {config.activations}); HF uses one d_ff and dense_act_fn for both")
  if len(config.activations) != 1:
    problems.append(f"gated activations {config.activations} (HF Switch MLPs are not gated)")
  if problems:
    raise ValueError("HF SwitchTransformers cannot express: " + "; ".join(problems) + ".")
  if expert_capacity is None:
    if moe.capacity_convention != "absolute":
      raise ValueError(f"MoeConfig.capacity_convention={moe.capacity_convention!r} has no HF equivalent: pass "
                       f"expert_capacity= (HF's slots per expert per sequence).")
    expert_capacity = moe.expert_capacity
  act, _ = config_map.activation_to_hf(config.activations)
  enc_step = _sparse_step_for(config.encoder_sparse, config.num_encoder_layers)
  dec_step = _sparse_step_for(config.decoder_sparse, config.num_decoder_layers)
  out = config_map.t5_family_config(config)
  out.update(
      model_type="switch_transformers", architectures=list(ARCHITECTURES), dense_act_fn=act,
      num_experts=moe.num_experts, expert_capacity=int(expert_capacity), router_bias=False,
      router_jitter_noise=moe.jitter_noise, router_dtype="float32", router_ignore_padding_tokens=False,
      router_z_loss_coef=moe.router_z_loss_coef, router_aux_loss_coef=moe.aux_loss_coef,
      encoder_sparse_step=enc_step, decoder_sparse_step=dec_step,
      num_sparse_encoder_layers=len(config.encoder_sparse.sparse_indices(config.num_encoder_layers)),
      num_sparse_decoder_layers=len(config.decoder_sparse.sparse_indices(config.num_decoder_layers)),
  )
  return out


def _export_feed_forward(layer: dict, prefix: str, role: str, index: int) -> dict:
  del role, index
  if "mlp" in layer:
    return param_layout.export_dense_mlp(layer["mlp"], f"{prefix}.mlp")
  moe = layer["moe"]
  out = {f"{prefix}.mlp.router.classifier.weight": param_layout.to_hf_linear(moe["router"]["w"])}  # [experts, embed]
  wi, wo = np.asarray(moe["experts"]["wi"]), np.asarray(moe["experts"]["wo"])  # [e, embed, mlp], [e, mlp, embed]
  for j in range(wi.shape[0]):
    out[f"{prefix}.mlp.experts.expert_{j}.wi.weight"] = param_layout.to_hf_linear(wi[j])  # [mlp, embed]
    out[f"{prefix}.mlp.experts.expert_{j}.wo.weight"] = param_layout.to_hf_linear(wo[j])  # [embed, mlp]
  return out


def state_dict_from_params(params: Mapping[str, Any], config: ModelConfig, *,
                           expert_capacity: int | None = None) -> dict:
  """HF SwitchTransformers state dict {name: float32 numpy} from stmoe params."""
  to_hf_config(config, expert_capacity=expert_capacity)  # validates that HF can express the model
  return param_layout.export_encoder_decoder(params, config, _export_feed_forward)


def save_pretrained(params: Mapping[str, Any], config: ModelConfig, directory: Any, *,
                    expert_capacity: int | None = None) -> str:
  """Writes a directory that SwitchTransformersForConditionalGeneration.from_pretrained loads (safetensors)."""
  hf_config = to_hf_config(config, expert_capacity=expert_capacity)
  return files.write_directory(directory, hf_config, state_dict_from_params(params, config,
                                                                              expert_capacity=expert_capacity))
