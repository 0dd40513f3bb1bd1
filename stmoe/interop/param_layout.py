"""Parameter names and layouts: a Hugging Face T5-family state dict <-> the stmoe parameter tree.

Both HF architectures are the same T5 encoder-decoder apart from the feed-forward block, so this module
converts embeddings, attention, norms, relative position biases and the output head, and takes a
caller-supplied function for each layer's feed-forward block (hf_t5.py: dense MLPs; hf_switch.py: dense
MLPs or router + experts).

HF ``nn.Linear`` weights are ``[out, in]``; stmoe kernels are ``[in, out]`` with heads split out:
``q.weight [heads*kv, embed]`` -> ``query/kernel [embed, heads, kv]`` and ``o.weight [embed, heads*kv]``
-> ``out/kernel [heads, kv, embed]`` (HF reshapes the inner dimension as ``(heads, kv)``, head-major).
HF keeps the relative position bias table in block 0's self-attention; stmoe once per stack.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from stmoe.config import ModelConfig
from stmoe.interop.config_map import check_exportable
from stmoe.interop.files import StateDict
from stmoe.interop.verify import HFWeights

Params = dict[str, Any]
# (weights, hf_prefix of the block's feed-forward sub-layer, role, layer index) -> {"mlp": ...} or {"moe": ...}
FeedForwardFn = Callable[[HFWeights, str, str, int], Params]


# --------------------------------------------------------------------------------------------------------
# Import: HF state dict -> stmoe params.
# --------------------------------------------------------------------------------------------------------


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
  """HF T5LayerNorm weight -> stmoe RMSNorm params {"scale": [embed]}."""
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


# --------------------------------------------------------------------------------------------------------
# Export: stmoe params -> HF state dict (the inverse mapping).
# --------------------------------------------------------------------------------------------------------


def _np(x: Any) -> np.ndarray:
  return np.asarray(x, dtype=np.float32)


def to_hf_linear(kernel: Any) -> np.ndarray:
  """stmoe kernel [in, out] -> HF nn.Linear weight [out, in]."""
  return np.ascontiguousarray(_np(kernel).T)


def export_attention(params: Params, prefix: str) -> StateDict:
  """stmoe attention params -> HF q/k/v/o weights under `prefix` (the inverse of attention_params)."""
  out = {}
  for hf, ours in (("q", "query"), ("k", "key"), ("v", "value")):
    k = _np(params[ours]["kernel"])  # [embed, heads, kv]
    out[f"{prefix}.{hf}.weight"] = to_hf_linear(k.reshape(k.shape[0], -1))  # [heads*kv, embed]
  o = _np(params["out"]["kernel"])  # [heads, kv, embed]
  out[f"{prefix}.o.weight"] = to_hf_linear(o.reshape(-1, o.shape[-1]))  # [embed, heads*kv]
  return out


def export_dense_mlp(params: Params, prefix: str) -> StateDict:
  """stmoe MlpBlock params (wi or wi_0, wi_1; wo) -> HF weights under `prefix` (the inverse of dense_mlp_params)."""
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
