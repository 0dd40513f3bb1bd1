"""Model facts without materialising anything: parameter counts, active parameters and training FLOPs.

`stmoe info --gin_file models/st_moe_32b.gin --json` answers "how big is this, and what will a step cost"
for a 269B configuration on a laptop: shapes come from `jax.eval_shape` of the real initialiser.

FLOPs are *model* FLOPs (what MFU is measured against): 2 per multiply-add of every matmul a token takes
part in, counting k experts per token in a sparse layer (not the capacity padding), attention scores and
weighted sums over the full key length, and the output projection; training = 3x forward (backward = 2x).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any

import jax
import numpy as np

from stmoe.config import ModelConfig
from stmoe.models.api import BaseModel
from stmoe.models.transformer import num_layers, sparse_layers


@dataclasses.dataclass
class ModelFacts:
  total_params: int
  active_params_per_token: int
  flops_per_token: float  # training (forward + backward), averaged over all input and target tokens
  forward_flops_per_token: float
  inputs_length: int
  targets_length: int
  params_by_group: dict[str, int]  # e.g. "encoder/attention", "decoder/moe_experts", "embedding"

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _group_of(path: tuple[str, ...]) -> str:
  stack = path[0]
  if stack in ("token_embedder",):
    return "embedding"
  if stack == "head":
    return "output_head"
  keys = set(path)
  if "experts" in keys:
    kind = "moe_experts"
  elif "router" in keys:
    kind = "moe_router"
  elif keys & {"self_attention", "encoder_decoder_attention"}:
    kind = "attention"
  elif keys & {"mlp", "extra_mlp"}:
    kind = "dense_mlp"
  elif "relpos_bias" in keys:
    kind = "relpos_bias"
  else:
    kind = "norms"
  return f"{stack}/{kind}"


def model_facts(model: BaseModel, inputs_length: int = 512, targets_length: int = 114) -> ModelFacts:
  """Counts from abstract shapes; sequence lengths only matter for attention FLOPs."""
  cfg: ModelConfig = model.config
  if cfg.scan_layers:
    # Scanned stacks put a `layers` axis before the expert axis of the stacked expert weights; count the
    # same parameters unscanned, where axis 0 of every expert weight is the expert axis.
    cfg = dataclasses.replace(cfg, scan_layers=False, remat=False)
    model = type(model)(cfg)
  if cfg.decoder_only:
    shapes = {"decoder_input_tokens": (1, 8)}
  else:
    shapes = {"encoder_input_tokens": (1, 8), "decoder_input_tokens": (1, 8)}
  abstract = jax.eval_shape(lambda rng: model.get_initial_variables(rng, shapes), jax.random.PRNGKey(0))["params"]
  k = cfg.moe.experts_per_token if cfg.moe is not None else 1
  by_group: dict[str, int] = defaultdict(int)
  active_by_group: dict[str, float] = defaultdict(float)
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    names = tuple(getattr(p, "key", str(p)) for p in path)
    size = int(np.prod(leaf.shape))
    group = _group_of(names)
    by_group[group] += size
    # Expert params are stacked [experts, ...]: a token uses k of them.
    active_by_group[group] += size * k / leaf.shape[0] if group.endswith("moe_experts") else size
  total = sum(by_group.values())
  active = sum(active_by_group.values())

  # Forward matmul FLOPs per token of each stack: 2 x (matmul weights the token multiplies).
  def stack_matmul_params(stack: str) -> float:
    return sum(v for g, v in active_by_group.items()
               if g.startswith(stack + "/") and g.split("/")[1] in ("attention", "dense_mlp", "moe_experts",
                                                                     "moe_router"))

  attn_width = cfg.num_heads * cfg.d_kv
  head_params = cfg.vocab_size * cfg.d_model  # output projection (tied or not)
  if cfg.decoder_only:
    length = inputs_length + targets_length
    dec_flops = 2 * stack_matmul_params("decoder") + 2 * head_params
    dec_flops += num_layers(cfg, "decoder_only") * 4 * length * attn_width  # scores + weighted sum
    enc_tokens, dec_tokens, enc_flops = 0, length, 0.0
  else:
    enc_flops = 2 * stack_matmul_params("encoder") + cfg.num_encoder_layers * 4 * inputs_length * attn_width
    dec_flops = (2 * stack_matmul_params("decoder") + 2 * head_params
                 + cfg.num_decoder_layers * 4 * (targets_length + inputs_length) * attn_width)
    enc_tokens, dec_tokens = inputs_length, targets_length
  forward = (enc_tokens * enc_flops + dec_tokens * dec_flops) / max(enc_tokens + dec_tokens, 1)
  return ModelFacts(
      total_params=int(total), active_params_per_token=int(round(active)), flops_per_token=3 * forward,
      forward_flops_per_token=forward, inputs_length=inputs_length, targets_length=targets_length,
      params_by_group=dict(sorted(by_group.items())))


def _human(n: float) -> str:
  for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.2f}{unit}"
  return f"{n:.0f}"


def format_table(model: BaseModel, facts: ModelFacts) -> str:
  cfg = model.config
  lines = [f"{'group':<28}{'params':>14}", "-" * 42]
  for group, n in facts.params_by_group.items():
    lines.append(f"{group:<28}{_human(n):>14}")
  lines.append("-" * 42)
  lines.append(f"{'total parameters':<28}{_human(facts.total_params):>14}")
  lines.append(f"{'active parameters / token':<28}{_human(facts.active_params_per_token):>14}")
  lines.append(f"{'train FLOPs / token':<28}{_human(facts.flops_per_token):>14}")
  for role in (("decoder_only",) if cfg.decoder_only else ("encoder", "decoder")):
    n = num_layers(cfg, role)
    lines.append(f"{role}: {n} layers, sparse at {list(sparse_layers(cfg, role)) or 'none'}")
  lines.append(f"(FLOPs at inputs_length={facts.inputs_length}, targets_length={facts.targets_length})")
  return "\n".join(lines)
