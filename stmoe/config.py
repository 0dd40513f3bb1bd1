"""Plain frozen dataclasses that describe a model; gin binds them, Python builds them directly.

Every default is declared once, here, and validated in ``__post_init__`` so that a bad configuration
fails at construction with a message that says what to change (not deep inside a jitted function).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import gin

from stmoe.layers.activations import ACTIVATION_NAMES  # pure Python: no JAX imported here

Activation = str  # one of stmoe.layers.activations.ACTIVATION_NAMES

RouterType = Literal["tokens_choose", "expert_choice", "noisy_top_k", "hierarchical"]
_ROUTER_TYPES = ("tokens_choose", "expert_choice", "noisy_top_k", "hierarchical")
Dispatch = Literal["einsum", "sort", "grouped", "dropless"]
CapacityConvention = Literal["stmoe", "gshard", "absolute"]
Renormalize = Literal["none", "before_drop", "after_drop"]
SecondExpertPolicy = Literal["all", "sampling", "random"]
LoadBalanceCount = Literal["top1", "all"]


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ValueError(f"{name}={value!r} is not one of {tuple(choices)}; set it to one of those.")


def check_router_allowed(moe: "MoeConfig", *, causal: bool) -> None:
  """Raises if `moe` routes in a way that leaks future tokens into a causal (decoder) layer.

  Expert-choice routing and batch-prioritized routing both look at every token of a group before
  deciding for any one of them, so they are encoder-only. Called by ModelConfig (at construction, for
  sparse decoder layers) and by the router itself (for layers built directly with causal=True).
  """
  if not causal:
    return
  if moe.router_type == "expert_choice":
    raise ValueError(
        "Expert-choice routing is encoder-only: each expert ranks all tokens of a group at once, so in a "
        "decoder (causal=True) it leaks future tokens into the routing of past ones (and cannot decode one "
        "token at a time). Use router_type='tokens_choose' for decoder layers, or make the decoder dense "
        "(decoder_sparse=SparseLayout(kind='none')).")
  if moe.batch_prioritized_routing:
    raise ValueError(
        "Batch prioritized routing is encoder-only: it orders a group's tokens by router confidence, which "
        "leaks the future in a decoder (causal=True). Set MoeConfig.batch_prioritized_routing=False, or make "
        "the decoder dense (decoder_sparse=SparseLayout(kind='none')).")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SparseLayout:
  """Which layers of one stack use a sparse (MoE) MLP instead of a dense one.

  kind:
    "none":      every layer dense.
    "every":     layer i is sparse iff (i + 1) % every == 0, i.e. every Nth layer counting from 1, so
                 every=2 gives layers 1, 3, 5 (0-based) -- flaxformer's `sparse_layout=MIXED` with the
                 sparse layer last in each pair; every=1 gives all layers sparse.
    "hf_switch": layer i is sparse iff i % every == 1 (HF SwitchTransformers' `sparse_step` placement;
                 every=1 means all layers sparse, as in HF).
    "top":       the last `num` layers are sparse.
    "bottom":    the first `num` layers are sparse.
    "list":      exactly the 0-based indices in `layers`.
  """

  kind: Literal["none", "every", "hf_switch", "top", "bottom", "list"] = "none"
  every: int = 2
  num: int = 0
  layers: tuple[int, ...] = ()

  def __post_init__(self):
    _check_choice("SparseLayout.kind", self.kind, ("none", "every", "hf_switch", "top", "bottom", "list"))
    if self.kind in ("every", "hf_switch") and self.every < 1:
      raise ValueError(f"SparseLayout.every must be >= 1, got {self.every}.")
    object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))

  def sparse_indices(self, num_layers: int) -> tuple[int, ...]:
    """0-based indices of the sparse layers of a stack with `num_layers` layers."""
    if self.kind == "none":
      return ()
    if self.kind == "every":
      return tuple(i for i in range(num_layers) if (i + 1) % self.every == 0)
    if self.kind == "hf_switch":
      if self.every == 1:
        return tuple(range(num_layers))
      return tuple(i for i in range(num_layers) if i % self.every == 1)
    if self.kind == "top":
      return tuple(range(max(0, num_layers - self.num), num_layers))
    if self.kind == "bottom":
      return tuple(range(min(self.num, num_layers)))
    bad = [i for i in self.layers if not 0 <= i < num_layers]
    if bad:
      raise ValueError(
          f"SparseLayout.layers={self.layers} names layers {bad} outside a {num_layers}-layer stack; "
          f"use 0-based indices below {num_layers}.")
    return tuple(sorted(set(self.layers)))


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MoeConfig:
  """Routing, capacity, dispatch and expert settings of every MoE layer of a model.

  The semantics follow ST-MoE (Zoph et al. 2022), Switch (Fedus et al. 2021), GShard/fairseq top-2
  (Lepikhin et al. 2020; Artetxe et al. 2021) and noisy top-k gating (Shazeer et al. 2017, flat and
  hierarchical); see docs/routing.md for the exact algorithms and where implementations differ.
  """

  num_experts: int = 8
  num_selected_experts: int = 2  # k of top-k; 1 = Switch, 2 = ST-MoE / GShard; hierarchical: k within each group
  router_type: RouterType = "tokens_choose"
  # Hierarchical MoE (router_type="hierarchical"; Shazeer et al. 2017 Appendix B): the experts form
  # num_expert_groups groups of num_experts / num_expert_groups (expert i*b + j is expert j of group i);
  # a primary noisy top-k gate picks num_selected_groups groups per token, and each picked group's own
  # noisy top-k gate picks num_selected_experts of its experts: num_selected_groups * num_selected_experts
  # experts per token. (Expert groups, not the token groups of group_size.) Other routers: leave both at 1.
  num_expert_groups: int = 1
  num_selected_groups: int = 1
  d_ff: int = 1024  # hidden size of each expert MLP
  activations: tuple[Activation, ...] = ("relu",)  # ("gelu", "linear") = GEGLU experts (ST-MoE)
  # Grouping and capacity.
  # Upper bound on the tokens of a routing group (capacity is per group; t5x's GROUP_SIZE). The layer derives the
  # actual size from the token count and the devices holding the batch, so that groups split evenly over them
  # (stmoe/moe/grouping.py, docs/routing.md "Token groups"); on one device it is group_size whenever that divides
  # batch * length.
  group_size: int = 512
  train_capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0
  capacity_convention: CapacityConvention = "stmoe"  # stmoe: round(cf*G/E); gshard: 2*ceil(G/E)
  expert_capacity: int | None = None  # absolute slots per expert per group ("absolute" convention)
  min_expert_capacity: int = 4
  # einsum | sort | grouped (capacity drops as einsum/sort; the experts run only on the kept rows through the
  # grouped matmul below) | dropless (no capacity). See docs/routing.md.
  dispatch: Dispatch = "sort"
  # Grouped matmul of grouped/dropless: "ragged" (jax.lax.ragged_dot, fast on GPU/TPU), "blocked" (each expert's rows
  # padded to blocks of dropless_block_size, fast on CPU) or "auto" (blocked on CPU, ragged elsewhere).
  dropless_impl: Literal["auto", "ragged", "blocked"] = "auto"
  dropless_block_size: int = 128
  # grouped/dropless under expert parallelism (a mesh "expert" axis of size > 1; stmoe/moe/expert_parallel.py): rows
  # of each device's receive buffer, as a multiple of its own (token, choice) rows. None: the worst case, the expert
  # partition count (every peer sends all its rows to one device), so nothing drops. A smaller bound saves memory;
  # rows that do not fit are dropped (they output zero, like capacity drops).
  expert_parallel_buffer_factor: float | None = None
  # Top-k options.
  renormalize: Renormalize = "none"  # renormalise the k gates by their sum, before/after dropping
  second_expert_policy: SecondExpertPolicy = "all"
  second_expert_threshold: float = 0.2
  batch_prioritized_routing: bool = False  # encoder only: admit tokens by router confidence
  load_balance_count: LoadBalanceCount = "all"  # f_i from top-1 choices only, or from all k
  # Noise.
  jitter_noise: float = 0.0  # multiplicative U(1-eps, 1+eps) on the router input, training only
  noisy_gating_noise_std: float = 1.0  # scale of N(0,1) in Shazeer's noisy top-k (before softplus)
  # Regularisation.
  expert_dropout: float = 0.0  # dropout inside the expert MLPs (ST-MoE fine-tuning uses 0.2+)
  # Loss coefficients (applied by the model).
  aux_loss_coef: float = 1e-2
  # Relative weights of the two terms of the noisy_top_k / hierarchical auxiliary loss:
  # aux = importance_loss_weight * CV(importance)^2 + load_loss_weight * CV(load)^2, then times aux_loss_coef,
  # so Shazeer et al. 2017's (w_importance, w_load) = aux_loss_coef * (importance_loss_weight, load_loss_weight).
  # Other routers have no such terms: leave both at 1.
  importance_loss_weight: float = 1.0
  load_loss_weight: float = 1.0
  router_z_loss_coef: float = 1e-3
  # Extra dense MLP beside each sparse MLP (ST-MoE "dense-sparse" sandwich of Appendix B).
  extra_dense_mlp: bool = False
  # The dtype of the router math. The router always runs in float32 whatever the activation dtype
  # (ST-MoE section 3: bfloat16 router logits are unstable), so "float32" is the only accepted value; the
  # field exists so that configs can state it (HF SwitchTransformers has the same setting).
  router_dtype: str = "float32"

  def __post_init__(self):
    _check_choice("MoeConfig.router_type", self.router_type, _ROUTER_TYPES)
    _check_choice("MoeConfig.dispatch", self.dispatch, ("einsum", "sort", "grouped", "dropless"))
    _check_choice("MoeConfig.dropless_impl", self.dropless_impl, ("auto", "ragged", "blocked"))
    _check_choice("MoeConfig.capacity_convention", self.capacity_convention, ("stmoe", "gshard", "absolute"))
    _check_choice("MoeConfig.renormalize", self.renormalize, ("none", "before_drop", "after_drop"))
    _check_choice("MoeConfig.second_expert_policy", self.second_expert_policy, ("all", "sampling", "random"))
    _check_choice("MoeConfig.load_balance_count", self.load_balance_count, ("top1", "all"))
    if self.router_dtype != "float32":
      raise ValueError(f"MoeConfig.router_dtype={self.router_dtype!r}: the router always runs in float32 (bfloat16 "
                       "router logits are unstable, ST-MoE section 3); set router_dtype='float32' or leave it unset.")
    for a in self.activations:
      _check_choice("MoeConfig.activations", a, ACTIVATION_NAMES)
    object.__setattr__(self, "activations", tuple(self.activations))
    if self.num_experts < 1:
      raise ValueError(f"MoeConfig.num_experts must be >= 1, got {self.num_experts}.")
    if self.expert_parallel_buffer_factor is not None and not self.expert_parallel_buffer_factor > 0:
      raise ValueError("MoeConfig.expert_parallel_buffer_factor must be None (no bound) or > 0, got "
                       f"{self.expert_parallel_buffer_factor}.")
    if not 1 <= self.num_selected_experts <= self.num_experts:
      raise ValueError(
          f"MoeConfig.num_selected_experts={self.num_selected_experts} must be between 1 and "
          f"num_experts={self.num_experts}.")
    if self.router_type == "hierarchical":
      self._check_hierarchical()
    elif (self.num_expert_groups, self.num_selected_groups) != (1, 1):
      raise ValueError(
          f"MoeConfig.num_expert_groups={self.num_expert_groups} / num_selected_groups={self.num_selected_groups} "
          f"only apply to router_type='hierarchical' (got {self.router_type!r}); set router_type='hierarchical' "
          "or leave both at 1.")
    self._check_balance_weights()
    if self.capacity_convention == "absolute" and not self.expert_capacity:
      raise ValueError("MoeConfig.capacity_convention='absolute' needs MoeConfig.expert_capacity (slots per "
                       "expert per group).")
    if self.group_size < 1:
      raise ValueError(f"MoeConfig.group_size must be >= 1, got {self.group_size}.")

  def _check_balance_weights(self) -> None:
    weights = (self.importance_loss_weight, self.load_loss_weight)
    if min(weights) < 0:
      raise ValueError(
          f"MoeConfig.importance_loss_weight={weights[0]} / load_loss_weight={weights[1]} must be >= 0 (they weight "
          "the CV^2 terms of the noisy top-k auxiliary loss).")
    if self.router_type not in ("noisy_top_k", "hierarchical") and weights != (1.0, 1.0):
      raise ValueError(
          f"MoeConfig.importance_loss_weight={weights[0]} / load_loss_weight={weights[1]} only apply to "
          f"router_type='noisy_top_k' or 'hierarchical' (got {self.router_type!r}, whose auxiliary loss has no "
          "importance and load terms); scale its loss with aux_loss_coef and leave both at 1.")

  def _check_hierarchical(self) -> None:
    a, e = self.num_expert_groups, self.num_experts
    if a < 1 or e % a:
      raise ValueError(
          f"MoeConfig.num_expert_groups={a} must be >= 1 and divide num_experts={e} (router_type='hierarchical' "
          f"splits the experts into equal groups); pick a divisor of {e}, e.g. "
          f"{[d for d in range(2, e) if e % d == 0] or [1]}.")
    if not 1 <= self.num_selected_groups <= a:
      raise ValueError(
          f"MoeConfig.num_selected_groups={self.num_selected_groups} must be between 1 and "
          f"num_expert_groups={a} (the primary gate picks that many expert groups per token).")
    if self.num_selected_experts > e // a:
      raise ValueError(
          f"MoeConfig.num_selected_experts={self.num_selected_experts} is the number of experts picked *within* each "
          f"selected group for router_type='hierarchical', so it must be <= num_experts / num_expert_groups = "
          f"{e // a}.")
    if self.batch_prioritized_routing:
      raise ValueError("MoeConfig.batch_prioritized_routing is a tokens_choose option; router_type='hierarchical' "
                       "admits tokens in order. Set batch_prioritized_routing=False.")
    if self.second_expert_policy != "all":
      raise ValueError(
          f"MoeConfig.second_expert_policy={self.second_expert_policy!r} is a top-2 tokens_choose option; "
          "router_type='hierarchical' keeps every selected expert. Set second_expert_policy='all'.")

  @property
  def experts_per_token(self) -> int:
    """Expert assignments per token before capacity: num_selected_experts, times num_selected_groups for
    router_type='hierarchical'. (Expert choice has no fixed number per token.)"""
    if self.router_type == "hierarchical":
      return self.num_selected_groups * self.num_selected_experts
    return self.num_selected_experts


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A T5.1.1-style Transformer (encoder-decoder or decoder-only), optionally with sparse layers.

  Defaults are T5.1.1-small's. `moe` plus the `*_sparse` layouts turn dense layers into MoE layers.
  """

  vocab_size: int = 32128
  d_model: int = 512
  num_heads: int = 6
  d_kv: int = 64
  d_ff: int = 1024
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  activations: tuple[Activation, ...] = ("gelu", "linear")  # ("relu",) for T5.0 / Switch
  dropout_rate: float = 0.0
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  logits_via_embedding: bool = False  # tie the output projection to the embedding (T5.0: True)
  layer_norm_epsilon: float = 1e-6
  dtype: str = "float32"  # activation dtype: "float32" or "bfloat16"; parameters are always float32
  # Decoder-only models.
  decoder_only: bool = False
  prefix_lm: bool = False  # decoder-only: full attention over the inputs part (decoder_causal_attention)
  # Loss.
  z_loss: float = 1e-4  # T5's output-logit z-loss coefficient
  label_smoothing: float = 0.0
  loss_normalizing_factor: float | None = None  # None: divide by the number of target tokens
  # Sparse layers.
  moe: MoeConfig | None = None
  encoder_sparse: SparseLayout = SparseLayout()
  decoder_sparse: SparseLayout = SparseLayout()
  # Memory/speed.
  remat: bool = False  # rematerialise each layer in the backward pass
  # Scan over groups of layers that repeat the sparse pattern (e.g. [dense, sparse] for every=2): one
  # compiled group instead of N layers, and parameters stacked under `layers/` with a leading "layers" axis.
  scan_layers: bool = False

  def __post_init__(self):
    for a in self.activations:
      _check_choice("ModelConfig.activations", a, ACTIVATION_NAMES)
    object.__setattr__(self, "activations", tuple(self.activations))
    _check_choice("ModelConfig.dtype", self.dtype, ("float32", "bfloat16", "float16"))
    if min(self.vocab_size, self.d_model, self.num_heads, self.d_kv, self.d_ff) < 1:
      raise ValueError(f"ModelConfig sizes must be positive: {self}")
    has_sparse = bool(self.encoder_sparse.sparse_indices(self.num_encoder_layers)
                      or self.decoder_sparse.sparse_indices(self.num_decoder_layers))
    if has_sparse and self.moe is None:
      raise ValueError("ModelConfig has sparse layers (encoder_sparse/decoder_sparse) but no `moe` config; "
                       "bind ModelConfig.moe = @MoeConfig() or set the layouts to SparseLayout(kind='none').")
    if self.moe is not None and self.decoder_sparse.sparse_indices(self.num_decoder_layers):
      check_router_allowed(self.moe, causal=True)
    if self.decoder_only and self.num_encoder_layers and self.encoder_sparse.kind != "none":
      raise ValueError("A decoder-only model has no encoder: leave encoder_sparse at kind='none'.")

  @property
  def is_sparse(self) -> bool:
    return self.moe is not None and bool(
        self.encoder_sparse.sparse_indices(self.num_encoder_layers)
        or self.decoder_sparse.sparse_indices(self.num_decoder_layers))

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)
