"""Optimizers: T5's Adafactor (expert-aware factoring), AdamW, gradient clipping and parameter freezing.

An optimizer is described by a small gin-configurable :class:`OptimizerDef` (hyper-parameters + schedule)
and built into an ``optax.GradientTransformation`` by :func:`make_optimizer`, which needs the parameters'
logical axes: Adafactor must never factor its second-moment statistics across the ``expert`` dimension
(each expert is its own matrix), and optax's Adafactor would factor the two *largest* dimensions of a
stacked expert kernel ``[expert, embed, mlp]`` -- which can include ``expert``. We therefore run optax's
factored second-moment estimator ``vmap``-ed over the expert (and scanned-layer) axes, so every expert
gets its own row/column statistics over its last two dimensions.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import gin
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from stmoe.partitioning import key_name
from stmoe.training import schedules as schedules_lib

# Logical axes that are "batch" dimensions for Adafactor's statistics: never factored across.
BATCH_AXES = ("expert", "layers")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class OptimizerDef:
  """What optimizer to build; `kind` is "adafactor" or "adamw"; the rest are its hyper-parameters.

  Adafactor defaults are T5's (t5x adafactor): decay_rate 0.8, factored second moments for dims >= 128,
  update clipping at RMS 1.0, updates scaled by the parameter RMS, no momentum.
  """

  kind: str = "adafactor"
  learning_rate: Callable[[jnp.ndarray], jnp.ndarray] | float | None = None  # None -> rsqrt_with_warmup()
  # Adafactor.
  decay_rate: float = 0.8
  factored: bool = True
  min_dim_size_to_factor: int = 128
  clipping_threshold: float | None = 1.0
  multiply_by_parameter_scale: bool = True
  epsilon1: float = 1e-30
  momentum: float | None = None
  # AdamW.
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0  # AdamW decoupled weight decay on >=2-D parameters
  # Both.
  max_grad_norm: float | None = None  # global-norm gradient clipping before the optimizer
  frozen_patterns: tuple[str, ...] = ()  # regexes (re.search on 'a/b/kernel' paths) of frozen params

  def __post_init__(self):
    if self.kind not in ("adafactor", "adamw"):
      raise ValueError(f"OptimizerDef.kind={self.kind!r}: use 'adafactor' or 'adamw'.")
    object.__setattr__(self, "frozen_patterns", tuple(self.frozen_patterns))
    for p in self.frozen_patterns:
      re.compile(p)

  @property
  def schedule(self) -> Callable[[jnp.ndarray], jnp.ndarray]:
    lr = self.learning_rate
    if lr is None:
      return schedules_lib.rsqrt_with_warmup()
    if callable(lr):
      return lr
    return schedules_lib.constant(float(lr))


@gin.configurable
def adafactor(learning_rate=None, **kwargs) -> OptimizerDef:
  """Adafactor with T5 defaults (see OptimizerDef); the learning rate defaults to rsqrt-with-warmup."""
  return OptimizerDef(kind="adafactor", learning_rate=learning_rate, **kwargs)


@gin.configurable
def adamw(learning_rate=1e-3, **kwargs) -> OptimizerDef:
  """AdamW (b1 0.9, b2 0.999, eps 1e-8, decoupled weight decay on >=2-D params, default 0)."""
  return OptimizerDef(kind="adamw", learning_rate=learning_rate, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Per-parameter facts from logical axes.


def _path(path) -> str:
  return "/".join(key_name(k) for k in path)


def _is_spec(x) -> bool:
  return isinstance(x, PartitionSpec) or x is None


def batch_axes_by_path(logical_axes: Any) -> dict[str, tuple[int, ...]]:
  """'a/b/kernel' -> positions of its expert / layers dimensions (empty for ordinary parameters)."""
  out = {}
  for path, spec in jax.tree_util.tree_flatten_with_path(logical_axes, is_leaf=_is_spec)[0]:
    names = tuple(spec) if spec is not None else ()
    out[_path(path)] = tuple(i for i, n in enumerate(names) if n in BATCH_AXES)
  return out


def _labels_from(fn: Callable[[str], str]) -> Callable[[Any], Any]:
  return lambda params: jax.tree_util.tree_map_with_path(lambda path, _: fn(_path(path)), params)


# ---------------------------------------------------------------------------------------------------------
# Factored second moments, never across the expert dimension.


def _batched(tx: optax.GradientTransformation, axes: tuple[int, ...]) -> optax.GradientTransformation:
  """Apply a per-parameter transformation independently to every slice along `axes` (via vmap).

  Leaves are transposed so that `axes` lead, vmapped once per axis, and the updates transposed back; the
  state keeps the batch axes leading (e.g. Adafactor's v_row for [expert, embed, mlp] is [expert, embed]).
  """
  if not axes:
    return tx

  def front(x):
    return jnp.moveaxis(x, axes, tuple(range(len(axes))))

  def back(x):
    return jnp.moveaxis(x, tuple(range(len(axes))), axes)

  init, update = tx.init, tx.update
  for _ in axes:
    init, update = jax.vmap(init), jax.vmap(update)

  def init_fn(params):
    if not jax.tree.leaves(params):  # every parameter of this group is masked out (e.g. frozen)
      return tx.init(params)
    return init(jax.tree.map(front, params))

  def update_fn(updates, state, params=None):
    if not jax.tree.leaves(updates):
      return tx.update(updates, state, params)
    out, state = update(jax.tree.map(front, updates), state, jax.tree.map(front, params))
    return jax.tree.map(back, out), state

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_expert_factored_rms(logical_axes: Any, *, factored: bool = True, decay_rate: float = 0.8,
                                 min_dim_size_to_factor: int = 128,
                                 epsilon: float = 1e-30) -> optax.GradientTransformation:
  """optax's factored RMS scaling, run separately for every expert (and scanned layer) of a parameter."""
  by_path = batch_axes_by_path(logical_axes)
  base = optax.scale_by_factored_rms(factored=factored, decay_rate=decay_rate,
                                     min_dim_size_to_factor=min_dim_size_to_factor, epsilon=epsilon)
  groups = sorted(set(by_path.values()))
  if groups == [()] or not groups:
    return base
  label_of = {axes: "plain" if not axes else "batched_" + "_".join(map(str, axes)) for axes in groups}
  transforms = {label_of[axes]: _batched(base, axes) for axes in groups}

  def label(path: str) -> str:
    if path not in by_path:
      raise KeyError(f"parameter {path!r} has no logical axes; the optimizer needs model.params_logical_axes.")
    return label_of[by_path[path]]

  return optax.multi_transform(transforms, _labels_from(label))


def _adafactor(opt: OptimizerDef, logical_axes: Any) -> optax.GradientTransformation:
  """T5 Adafactor = factored RMS scaling -> update clipping -> lr -> parameter scale -> (momentum) -> -1."""
  parts = [scale_by_expert_factored_rms(logical_axes, factored=opt.factored, decay_rate=opt.decay_rate,
                                        min_dim_size_to_factor=opt.min_dim_size_to_factor,
                                        epsilon=opt.epsilon1)]
  if opt.clipping_threshold is not None:
    parts.append(optax.clip_by_block_rms(opt.clipping_threshold))
  parts.append(optax.scale_by_learning_rate(opt.schedule, flip_sign=False))
  if opt.multiply_by_parameter_scale:
    parts.append(optax.scale_by_param_block_rms())
  if opt.momentum is not None:
    parts.append(optax.ema(opt.momentum, debias=False))
  parts.append(optax.scale(-1.0))
  return optax.chain(*parts)


def _adamw(opt: OptimizerDef) -> optax.GradientTransformation:
  return optax.adamw(opt.schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                     mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))


def frozen_mask(params: Any, patterns: Sequence[str]) -> Any:
  """Pytree of bools: True where a parameter's path matches one of the `patterns` (re.search)."""
  compiled = [re.compile(p) for p in patterns]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(c.search(_path(path)) for c in compiled), params)


def make_optimizer(opt: OptimizerDef, logical_axes: Any, params: Any = None) -> optax.GradientTransformation:
  """Build the optax transformation for parameters with these logical axes.

  Frozen parameters (`opt.frozen_patterns`) get zero updates (they stay bit-identical) and no optimizer
  state at all (optax.multi_transform with set_to_zero); gradient clipping and the optimizer see only the
  trainable parameters, so the clipping norm ignores frozen gradients.
  """
  inner = _adafactor(opt, logical_axes) if opt.kind == "adafactor" else _adamw(opt)
  if opt.max_grad_norm is not None:
    inner = optax.chain(optax.clip_by_global_norm(opt.max_grad_norm), inner)
  if not opt.frozen_patterns:
    return inner
  if params is not None:
    mask = frozen_mask(params, opt.frozen_patterns)
    if not any(jax.tree.leaves(mask)):
      raise ValueError(f"frozen_patterns={opt.frozen_patterns} match no parameter; check the regexes against "
                       "parameter paths such as 'encoder/layer_1/moe/experts/wi'.")
  compiled = [re.compile(p) for p in opt.frozen_patterns]
  labels = _labels_from(lambda path: "frozen" if any(c.search(path) for c in compiled) else "trainable")
  return optax.multi_transform({"trainable": inner, "frozen": optax.set_to_zero()}, labels)
