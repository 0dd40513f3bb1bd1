"""Sparse upcycling (Komatsuzaki et al. 2022): start a sparse (MoE) model from a dense checkpoint.

Every sparse layer of the target model replaces a dense MLP of the source model at the same layer index.
What each parameter of the sparse model starts from:

* ``moe/experts/wi[_j]`` / ``moe/experts/wo`` ``[expert, embed, mlp]`` / ``[expert, mlp, embed]``: the dense
  MLP's ``mlp/wi[_j]/kernel`` / ``mlp/wo/kernel`` repeated along a new leading expert axis, so every expert
  starts as an exact copy of the MLP it replaces;
* ``moe/router/*``: fresh. ``w`` (and ``w_primary`` of hierarchical routers) ~ normal(``router_init_std``),
  0.02 by default: the router initialiser of a sparse model trained from scratch (ST-MoE / flaxformer),
  seeded by ``router_init_rng``. Small random logits give near-uniform probabilities and a roughly
  balanced, token-dependent first assignment; ``router_init_std=0`` (zeros: exactly uniform
  probabilities) is allowed but every token then ties and top-k picks experts 0..k-1 for all of them, which
  overflows capacity. Noise networks (``w_noise``, ``w_primary_noise``) start at zero as in from-scratch
  training;
* ``extra_mlp`` (ST-MoE's extra dense MLP beside a sparse one, ``MoeConfig.extra_dense_mlp``): a copy of the
  dense MLP with its output projection ``wo`` set to zero (``extra_dense_mlp_init="zero_output"``, the
  default), so the block adds nothing at step 0 and the upcycled model computes the dense model's function;
  ``wo`` still receives gradients, so the block starts learning at once. ``"copy"`` copies ``wo`` too (the
  dense MLP is then applied twice and the function changes). ``pre_extra_mlp_norm`` copies ``pre_mlp_norm``;
* everything else (attention, norms, embeddings, relative position biases, the head, layers that stay
  dense): copied unchanged.

The scale factor. A sparse layer outputs sum_k g_k * expert_k(x) over the kept choices of each token. With
experts that are copies, that is (sum_k g_k) * MLP(x). With ``MoeConfig.renormalize`` ("before_drop" /
"after_drop") the kept gates sum to one and, when no token is dropped (capacity large enough), the
upcycled model equals the dense one up to float rounding (measured ~1e-6, docs/interop.md). Without
renormalisation each sparse MLP output is scaled by the sum of the kept router probabilities: top-1 Switch
by the top-1 probability, about 1/num_experts at a normal(0.02) router init, top-k by about k/num_experts.
Dropped tokens output zero (the residual carries them).

Optimizer state (``optimizer_state``): "reset" starts the sparse model's optimizer from scratch; "carry"
(stmoe checkpoints only: an HF directory or an export has none) maps the dense optimizer state onto the
sparse one by parameter path, generically for any optax state tree whose per-parameter leaves end in the
parameter path (AdamW's mu/nu, Adafactor's v_row/v_col/v, momentum): the dense MLP's slots are repeated
along the expert axis (as its weights are), router slots start fresh (zero), and the optimizer's step
counts are carried (bias correction / Adafactor's decay schedule continue where they were). The train
step of the written checkpoint is 0 either way (the learning-rate schedule starts again).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Sequence

import numpy as np

from stmoe.config import ModelConfig
from stmoe.errors import UserError

OPTIMIZER_STATES = ("reset", "carry")
EXTRA_DENSE_MLP_INITS = ("zero_output", "copy")
UPCYCLE_FILE = "upcycle.json"  # what a checkpoint was upcycled from, next to its config.gin

# ModelConfig fields that must agree between the dense source and the sparse target (everything that
# changes a parameter shape or the function of a copied parameter; dtype, dropout, losses, remat and
# scan_layers do not).
_MATCHING_FIELDS = ("vocab_size", "d_model", "num_heads", "d_kv", "d_ff", "num_encoder_layers",
                    "num_decoder_layers", "activations", "relative_attention_num_buckets",
                    "relative_attention_max_distance", "logits_via_embedding", "layer_norm_epsilon",
                    "decoder_only")
_ROUTER_WEIGHTS = ("w", "w_primary")  # router parameters drawn from normal(std); the rest start at zero
_LAYER = re.compile(r"^layer_(\d+)$")


class UpcycleError(UserError):
  """A dense source that cannot become the configured sparse model; the message lists every reason."""


# --------------------------------------------------------------------------------------------------------
# Configuration check.


def config_mismatches(dense_config: ModelConfig, sparse_config: ModelConfig) -> list[str]:
  """Every reason why `dense_config` cannot be upcycled into `sparse_config` (empty if it can)."""
  reasons = []
  if dense_config.is_sparse:
    reasons.append("the source model already has sparse layers (upcycle a dense model)")
  if not sparse_config.is_sparse:
    reasons.append("the target model has no sparse layers (set ModelConfig.moe and encoder_sparse/decoder_sparse)")
  for name in _MATCHING_FIELDS:
    a, b = getattr(dense_config, name), getattr(sparse_config, name)
    if a != b:
      reasons.append(f"ModelConfig.{name}: dense {a!r}, sparse {b!r}")
  moe = sparse_config.moe
  if moe is not None:
    if moe.d_ff != dense_config.d_ff:
      reasons.append(f"MoeConfig.d_ff={moe.d_ff} differs from the dense d_ff={dense_config.d_ff} (each expert "
                     "starts as a copy of the dense MLP)")
    if tuple(moe.activations) != tuple(dense_config.activations):
      reasons.append(f"MoeConfig.activations={tuple(moe.activations)!r} differ from the dense activations="
                     f"{tuple(dense_config.activations)!r}")
  return reasons


def check_compatible(dense_config: ModelConfig, sparse_config: ModelConfig) -> None:
  """Raises UpcycleError listing every mismatch at once."""
  reasons = config_mismatches(dense_config, sparse_config)
  if reasons:
    raise UpcycleError(
        f"cannot upcycle the dense model into the configured sparse model ({len(reasons)} reason"
        f"{'s' if len(reasons) > 1 else ''}): " + "; ".join(reasons) +
        ". Make the sparse gin config match the dense model (only the MoE settings and the sparse layouts "
        "may differ). Nothing was written.")


# --------------------------------------------------------------------------------------------------------
# Paths: pytree leaves split into (optimizer prefix, parameter path), with scanned layers unstacked.


def _key_str(k: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _is_label_key(path: Sequence[Any], i: int) -> bool:
  """Is path[i] part of an optax.multi_transform wrapper (`.inner_states[label].inner_state`)? Wrappers are
  dropped, so Adafactor's slots of a dense MLP (no multi_transform when nothing is batched, or its "plain"
  group) and the "batched_0" slots of its experts line up."""
  name = _key_str(path[i])
  if name == "inner_states" and not hasattr(path[i], "key"):
    return True
  if i >= 1 and _key_str(path[i - 1]) == "inner_states" and hasattr(path[i], "key"):
    return True
  return (name == "inner_state" and i >= 2 and _key_str(path[i - 2]) == "inner_states"
          and not hasattr(path[i], "key"))


@dataclasses.dataclass(frozen=True)
class _Leaf:
  prefix: str  # the optimizer-structure part of the path, multi_transform labels removed ("" for params)
  param: tuple[str, ...] | None  # the parameter path it belongs to (None: a step count etc.)


def _split(path: Sequence[Any], param_paths: set[tuple[str, ...]]) -> _Leaf:
  names = tuple(_key_str(k) for k in path)
  for i in range(len(names)):
    if names[i:] in param_paths:
      prefix = "/".join(n for j, n in enumerate(names[:i]) if not _is_label_key(path, j))
      return _Leaf(prefix, names[i:])
  return _Leaf("/".join(n for j, n in enumerate(names) if not _is_label_key(path, j)), None)


def _param_paths(params: Any) -> set[tuple[str, ...]]:
  import jax

  return {tuple(_key_str(k) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}


def _role(config: ModelConfig, stack: str) -> str:
  if stack == "encoder":
    return "encoder"
  return "decoder_only" if config.decoder_only else "decoder"


def _unscan(param: tuple[str, ...], config: ModelConfig) -> list[tuple[str, ...]] | None:
  """The per-layer paths of a scanned path `stack/layers/layer_j/...` (one per group g: layer g*p + j), in
  the order of the leaf's leading axis; None for paths that are not scanned."""
  if len(param) < 3 or param[1] != "layers" or not _LAYER.match(param[2]):
    return None
  from stmoe.models.transformer import num_layers, scan_period

  role = _role(config, param[0])
  period = scan_period(config, role)
  j = int(_LAYER.match(param[2]).group(1))
  return [(param[0], f"layer_{g * period + j}") + param[3:] for g in range(num_layers(config, role) // period)]


def _canonical(tree: Any, params: Any, config: ModelConfig) -> tuple[dict, dict]:
  """({(prefix, per-layer param path): array}, {prefix: [arrays]}) of `tree` (params or optimizer state)."""
  import jax

  param_paths = _param_paths(params)
  by_param, other = {}, {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    where = _split(path, param_paths)
    leaf = np.asarray(jax.device_get(leaf))
    if where.param is None:
      other.setdefault(where.prefix, []).append(leaf)
      continue
    layers = _unscan(where.param, config)
    if layers is None:
      by_param[(where.prefix, where.param)] = leaf
      continue
    if leaf.ndim == 0 or leaf.shape[0] != len(layers):
      raise ValueError(f"{'/'.join(where.param)} ({where.prefix or 'params'}) has shape {leaf.shape}; expected "
                       f"a leading scanned-layers axis of {len(layers)}.")
    for i, p in enumerate(layers):
      by_param[(where.prefix, p)] = leaf[i]
  return by_param, other


# --------------------------------------------------------------------------------------------------------
# Where each sparse parameter comes from.


@dataclasses.dataclass(frozen=True)
class _Source:
  kind: str  # "copy" | "experts" (repeat along a new leading expert axis) | "fresh" (router)
  dense: tuple[str, ...] | None = None
  zero_param: bool = False  # the parameter itself starts at zero (extra_mlp/wo with "zero_output")


def _source_of(param: tuple[str, ...], extra_dense_mlp_init: str) -> _Source:
  """The dense parameter a (per-layer) sparse parameter path starts from."""
  if len(param) >= 3 and _LAYER.match(param[1]):
    head, rest = param[:2], param[2:]
    if rest[:2] == ("moe", "router"):
      return _Source("fresh")
    if rest[:2] == ("moe", "experts") and len(rest) == 3:
      return _Source("experts", head + ("mlp", rest[2], "kernel"))
    if rest[0] == "extra_mlp":
      zero = extra_dense_mlp_init == "zero_output" and rest[1] == "wo"
      return _Source("copy", head + ("mlp",) + rest[1:], zero_param=zero)
    if rest[0] == "pre_extra_mlp_norm":
      return _Source("copy", head + ("pre_mlp_norm",) + rest[1:])
  return _Source("copy", param)


def _fill(template: Any, params_template: Any, config: ModelConfig, value_of) -> Any:
  """A tree like `template` whose leaves are `value_of(prefix, per-layer param path | None, shape, fresh)`,
  restacking scanned layers."""
  import jax

  param_paths = _param_paths(params_template)
  paths, treedef = jax.tree_util.tree_flatten_with_path(template)
  leaves = []
  for path, fresh in paths:
    where = _split(path, param_paths)
    fresh = np.asarray(jax.device_get(fresh))
    layers = _unscan(where.param, config) if where.param is not None else None
    if layers is None:
      leaves.append(value_of(where.prefix, where.param, fresh))
    else:
      leaves.append(np.stack([value_of(where.prefix, p, fresh[i]) for i, p in enumerate(layers)]))
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _from_dense(dense: np.ndarray, source: _Source, fresh: np.ndarray, what: str) -> np.ndarray:
  if source.kind == "experts":
    if tuple(fresh.shape[1:]) != tuple(dense.shape):
      raise ValueError(f"{what}: expert shape {fresh.shape} is not [experts] + dense {dense.shape}.")
    out = np.broadcast_to(dense[None], fresh.shape)  # [expert, ...] copies of the dense MLP
  else:
    if tuple(fresh.shape) != tuple(dense.shape):
      raise ValueError(f"{what}: sparse shape {fresh.shape} differs from dense {dense.shape}.")
    out = dense
  return np.array(out, dtype=fresh.dtype)


def sparse_abstract_params(sparse_model: Any) -> Any:
  """Shapes of the sparse model's parameters (jax.eval_shape: nothing is materialised)."""
  import jax

  from stmoe.training import layout

  shapes = layout.input_shapes_for(layout.model_type_of(sparse_model), 1, {"inputs": 8, "targets": 8})
  return jax.eval_shape(lambda: sparse_model.get_initial_variables(jax.random.PRNGKey(0), shapes)["params"])


def upcycle_params(dense_params: Any, sparse_config: ModelConfig, dense_config: ModelConfig, *,
                   router_init_rng: Any, router_init_std: float = 0.02,
                   extra_dense_mlp_init: str = "zero_output") -> dict:
  """The sparse model's parameters (float32 NumPy) from a dense model's (see the module docstring).

  Args:
    dense_params: the dense model's parameter tree (arrays of any kind; scanned or not).
    sparse_config / dense_config: the two models; refused with UpcycleError listing every mismatch.
    router_init_rng: a jax PRNG key for the fresh routers.
    router_init_std: std of the normal router init (0.02, as from scratch; 0 = zeros = uniform routing).
    extra_dense_mlp_init: "zero_output" (function-preserving) or "copy" for ST-MoE's extra dense MLP.
  """
  import jax

  from stmoe.models.api import make_model

  check_compatible(dense_config, sparse_config)
  if extra_dense_mlp_init not in EXTRA_DENSE_MLP_INITS:
    raise UpcycleError(f"extra_dense_mlp_init={extra_dense_mlp_init!r} is not one of {EXTRA_DENSE_MLP_INITS}.")
  template = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), sparse_abstract_params(make_model(sparse_config)))
  dense, _ = _canonical(dense_params, dense_params, dense_config)
  used: set[tuple[str, ...]] = set()
  counter = [0]

  def value_of(prefix: str, param: tuple[str, ...], fresh: np.ndarray) -> np.ndarray:
    source = _source_of(param, extra_dense_mlp_init)
    if source.kind == "fresh":
      counter[0] += 1
      if param[-1] in _ROUTER_WEIGHTS and router_init_std > 0:
        key = jax.random.fold_in(router_init_rng, counter[0])
        return np.asarray(router_init_std * jax.random.normal(key, fresh.shape, fresh.dtype))
      return np.zeros(fresh.shape, fresh.dtype)
    if (prefix, source.dense) not in dense:
      raise UpcycleError(f"the sparse parameter {'/'.join(param)} starts from the dense {'/'.join(source.dense)}, "
                         "which the dense model does not have.")
    used.add(source.dense)
    out = _from_dense(dense[(prefix, source.dense)], source, fresh, "/".join(param))
    return np.zeros_like(out) if source.zero_param else out

  params = _fill(template, template, sparse_config, value_of)
  unused = sorted("/".join(p) for _, p in dense if p not in used)
  if unused:
    raise UpcycleError(f"dense parameters with no place in the sparse model: {', '.join(unused[:6])}"
                       f"{' ...' if len(unused) > 6 else ''}.")
  return params


def carry_optimizer_state(dense_opt_state: Any, dense_params: Any, dense_config: ModelConfig,
                          sparse_opt_state: Any, sparse_params: Any, sparse_config: ModelConfig, *,
                          extra_dense_mlp_init: str = "zero_output") -> Any:
  """`sparse_opt_state` (a fresh tx.init of the sparse params) with the dense optimizer's state carried.

  Per-parameter leaves are matched by (optimizer structure, parameter path) with multi_transform labels
  ignored; expert slots repeat the dense MLP's along the expert axis (Adafactor's factored v_row/v_col are
  [expert, rows] / [expert, cols] per expert, AdamW's mu/nu [expert, embed, mlp]); router slots keep their
  fresh value; leaves that belong to no parameter (step counts) take the dense value, broadcast.
  """
  dense, dense_other = _canonical(dense_opt_state, dense_params, dense_config)

  def value_of(prefix: str, param: tuple[str, ...] | None, fresh: np.ndarray) -> np.ndarray:
    if param is None:  # e.g. count: all of the dense optimizer's counts are equal (one step counter)
      if prefix not in dense_other:
        return fresh
      return np.array(np.broadcast_to(dense_other[prefix][0].reshape(-1)[0], fresh.shape), dtype=fresh.dtype)
    source = _source_of(param, extra_dense_mlp_init)
    if source.kind == "fresh":
      return fresh
    if (prefix, source.dense) not in dense:
      raise UpcycleError(
          f"cannot carry the optimizer state: the sparse state has {prefix}:{'/'.join(param)} but the dense "
          f"one has no {prefix}:{'/'.join(source.dense)} (different optimizers?). Use optimizer_state='reset'.")
    return _from_dense(dense[(prefix, source.dense)], source, fresh, f"{prefix}:{'/'.join(param)}")

  return _fill(sparse_opt_state, sparse_params, sparse_config, value_of)


# --------------------------------------------------------------------------------------------------------
# Reading a dense source and writing the upcycled checkpoint.


@dataclasses.dataclass
class DenseSource:
  """A dense model read from disk: its config, parameters and (stmoe training checkpoints) optimizer state."""

  config: ModelConfig
  params: Any
  opt_state: Any | None
  path: str
  kind: str  # "hf_t5" | "export" | "step"


def is_hf_directory(path: str) -> bool:
  """A Hugging Face save_pretrained directory (config.json, no stmoe checkpoint)."""
  from stmoe.checkpoints import resolve as resolve_lib

  path = os.path.abspath(os.path.expanduser(path))
  return (os.path.isfile(os.path.join(path, "config.json")) and not resolve_lib.is_export_dir(path)
          and not os.path.isdir(os.path.join(path, resolve_lib.CHECKPOINTS_SUBDIR))
          and not resolve_lib.is_step_dir(path))


def _single_device(tree: Any) -> Any:
  import jax

  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def read_dense(path: str, *, optimizer: Any = None, with_opt_state: bool = False,
               gin_files: Sequence[str] = (), bindings: Sequence[str] = (), dense_model: Any = None) -> DenseSource:
  """The dense model at `path`: an HF T5 directory (config.json) or any stmoe checkpoint path
  (stmoe.checkpoints.resolve; the model from its config.gin or from `gin_files`/`bindings`).

  with_opt_state also reads the optimizer state (stmoe training checkpoints only), which must fit
  `optimizer` (an OptimizerDef; default adafactor(), the trainer's default). `dense_model` (a model API
  object) replaces the checkpoint's config.gin, e.g. for a model built in Python.
  """
  import jax

  from stmoe.checkpoints import export as export_lib
  from stmoe.checkpoints import manager
  from stmoe.checkpoints import resolve as resolve_lib
  from stmoe.training import layout
  from stmoe.training import optimizers as opt_lib

  if is_hf_directory(path):
    if with_opt_state:
      raise UpcycleError(f"{path!r} is a Hugging Face directory: it has no optimizer state to carry. Use "
                         "optimizer_state='reset'.")
    from stmoe.interop import hf_t5

    model, params = hf_t5.load_pretrained(path)
    return DenseSource(model.config, params, None, path, "hf_t5")
  try:
    location = resolve_lib.resolve(path)
  except FileNotFoundError as e:
    raise UpcycleError(f"{e} (or a Hugging Face T5 directory with config.json)") from None
  if location.is_export:
    if with_opt_state:
      raise UpcycleError(f"{path!r} is an export directory: it has no optimizer state to carry. Point at the "
                         "training checkpoint it was exported from, or use optimizer_state='reset'.")
    if dense_model is not None:
      params, _ = export_lib.restore_for_model(dense_model, path)
      return DenseSource(dense_model.config, params, None, location.path, "export")
    loaded = export_lib.load(path, gin_files, bindings)
    return DenseSource(loaded.model.config, loaded.params, None, location.path, "export")
  model = dense_model
  if model is None:
    model, _, _ = export_lib.configure_model(location.config_path, gin_files, bindings)
  shapes = layout.input_shapes_for(layout.model_type_of(model), 1, {"inputs": 8, "targets": 8})
  abstract_params = jax.eval_shape(lambda: model.get_initial_variables(jax.random.PRNGKey(0), shapes)["params"])
  if not with_opt_state:
    params = manager.restore_params(location.path, _single_device(abstract_params))
    return DenseSource(model.config, params, None, location.path, "step")
  tx = opt_lib.make_optimizer(optimizer or opt_lib.adafactor(), model.params_logical_axes(shapes), abstract_params)
  abstract = jax.eval_shape(lambda p: {"step": np.int32(0), "params": p, "opt_state": tx.init(p),
                                       "rng": jax.random.PRNGKey(0)}, abstract_params)
  state, _ = manager.restore_train_state(location.path, _single_device(abstract))
  return DenseSource(model.config, state["params"], state["opt_state"], location.path, "step")


def upcycle_state(dense: DenseSource, sparse_model: Any, optimizer: Any = None, *, optimizer_state: str = "reset",
                  seed: int = 0, router_init_std: float = 0.02, extra_dense_mlp_init: str = "zero_output") -> dict:
  """The sparse model's train state at step 0 ({"step", "params", "opt_state", "rng"}, on one device)."""
  import jax
  import jax.numpy as jnp

  from stmoe.training import optimizers as opt_lib

  if optimizer_state not in OPTIMIZER_STATES:
    raise UpcycleError(f"optimizer_state={optimizer_state!r} is not one of {OPTIMIZER_STATES}.")
  if optimizer_state == "carry" and optimizer is not None and optimizer.frozen_patterns:
    raise UpcycleError(f"optimizer_state='carry' cannot be combined with frozen parameters "
                       f"({optimizer.frozen_patterns}): frozen parameters have no optimizer state. Use "
                       "optimizer_state='reset' (RESTORE_OPTIMIZER_STATE=False) or train all parameters.")
  if optimizer_state == "carry" and dense.opt_state is None:
    raise UpcycleError(f"optimizer_state='carry' needs a dense stmoe training checkpoint; {dense.path!r} "
                       f"({dense.kind}) has no optimizer state. Use optimizer_state='reset'.")
  params_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))  # as stmoe.training.state does
  params = upcycle_params(dense.params, sparse_model.config, dense.config, router_init_rng=params_rng,
                          router_init_std=router_init_std, extra_dense_mlp_init=extra_dense_mlp_init)
  shapes = {"inputs": 8, "targets": 8}
  from stmoe.training import layout

  logical = sparse_model.params_logical_axes(layout.input_shapes_for(layout.model_type_of(sparse_model), 1, shapes))
  tx = opt_lib.make_optimizer(optimizer or opt_lib.adafactor(), logical, params)
  opt_state = jax.jit(tx.init)(params)
  if optimizer_state == "carry":
    opt_state = carry_optimizer_state(dense.opt_state, dense.params, dense.config, opt_state, params,
                                      sparse_model.config, extra_dense_mlp_init=extra_dense_mlp_init)
  return {"step": jnp.zeros((), jnp.int32), "params": jax.tree.map(jnp.asarray, params),
          "opt_state": jax.tree.map(jnp.asarray, opt_state), "rng": train_rng}


def upcycled_train_state(dense_checkpoint: str, sparse_model: Any, optimizer: Any, spec: Any, *,
                         optimizer_state: str = "reset", seed: int = 0) -> dict:
  """The trainer's path (`train(upcycle_from=...)`): the upcycled step-0 state placed with the run's shardings
  (`spec`: a stmoe.training.state.StateSpec whose optimizer is `optimizer`)."""
  import jax

  dense = read_dense(dense_checkpoint, optimizer=optimizer, with_opt_state=optimizer_state == "carry")
  state = upcycle_state(dense, sparse_model, optimizer, optimizer_state=optimizer_state, seed=seed)
  host = jax.tree.map(np.asarray, jax.device_get(state))
  return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]),
                      host, spec.shardings)


def upcycle(dense_checkpoint: str, sparse_model: Any, output_dir: str, *, optimizer_state: str = "reset",
            optimizer: Any = None, seed: int = 0, router_init_std: float = 0.02,
            extra_dense_mlp_init: str = "zero_output", config_text: str | None = None,
            dense_gin_files: Sequence[str] = (), dense_bindings: Sequence[str] = (), dense_model: Any = None) -> str:
  """Writes OUTPUT_DIR/checkpoints/0: the sparse model upcycled from `dense_checkpoint`; returns that step dir.

  `dense_checkpoint`: an HF T5 directory (config.json) or any stmoe checkpoint path (MODEL_DIR, a step
  directory, MODEL_DIR/best, an export). `sparse_model`: the target model API object (make_model(config)).
  The checkpoint is a normal stmoe one (orbax, checksums, config.gin = `config_text`, also written to
  OUTPUT_DIR/config.gin): `stmoe train --model_dir OUTPUT_DIR` with the sparse gin config resumes from it
  (its optimizer must be `optimizer`, default adafactor()), or pass it as INIT_CHECKPOINT. The dense model
  comes from the checkpoint's config.gin (plus `dense_gin_files` / `dense_bindings`) unless `dense_model`
  is given. Runs on one device (host memory); the checkpoint restores onto any mesh.
  """
  import jax

  from stmoe.checkpoints.manager import CheckpointManager

  output_dir = os.path.abspath(os.path.expanduser(output_dir))
  ckpt_dir = os.path.join(output_dir, "checkpoints")
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise UpcycleError(f"--output_dir {output_dir!r} already holds checkpoints; pick a new directory.")
  dense = read_dense(dense_checkpoint, optimizer=optimizer, with_opt_state=optimizer_state == "carry",
                     gin_files=dense_gin_files, bindings=dense_bindings, dense_model=dense_model)
  state = upcycle_state(dense, sparse_model, optimizer, optimizer_state=optimizer_state, seed=seed,
                        router_init_std=router_init_std, extra_dense_mlp_init=extra_dense_mlp_init)
  text = config_text if config_text is not None else _config_text_of(sparse_model)
  manager = CheckpointManager(output_dir, keep=None, async_save=False, config_text=lambda: text)
  manager.save(0, state, {})
  manager.close()
  if jax.process_index() == 0:
    with open(os.path.join(output_dir, "config.gin"), "w", encoding="utf-8") as f:
      f.write(text)
    info = {"source": os.path.abspath(os.path.expanduser(dense_checkpoint)), "source_kind": dense.kind,
            "optimizer_state": optimizer_state, "router_init_std": router_init_std, "seed": seed,
            "extra_dense_mlp_init": extra_dense_mlp_init}
    with open(os.path.join(output_dir, UPCYCLE_FILE), "w", encoding="utf-8") as f:
      json.dump(info, f, indent=1, sort_keys=True)
  return manager.step_dir(0)


def _config_text_of(model: Any) -> str:
  """A gin config that rebuilds `model` (for checkpoints upcycled from Python without a gin config)."""
  cfg = model.config
  lines = ["import stmoe.config", "import stmoe.models.api", "", "MODEL = @make_model()",
           "make_model.config = @ModelConfig()"]
  for f in dataclasses.fields(cfg):
    value = getattr(cfg, f.name)
    if f.name == "moe" and value is None:
      lines.append("ModelConfig.moe = None")
    elif f.name == "moe":
      lines.append("ModelConfig.moe = @MoeConfig()")
      lines += [f"MoeConfig.{g.name} = {getattr(value, g.name)!r}" for g in dataclasses.fields(value)]
    elif f.name in ("encoder_sparse", "decoder_sparse"):
      lines.append(f"ModelConfig.{f.name} = @{f.name}/SparseLayout()")
      lines += [f"{f.name}/SparseLayout.{g.name} = {getattr(value, g.name)!r}" for g in dataclasses.fields(value)]
    else:
      lines.append(f"ModelConfig.{f.name} = {value!r}")
  return "\n".join(lines) + "\n"
