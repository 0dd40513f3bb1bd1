"""Meshes, logical-axis rules and shardings: how stmoe spreads a model over devices.

One mesh with three named axes, always in this order:

* ``data``   -- data parallelism (batch rows; replicas of non-expert parameters),
* ``expert`` -- expert parallelism (stacked expert parameters are split over it; the batch is *also*
                split over it, so expert-parallel devices do useful data-parallel work outside MoE layers),
* ``model``  -- tensor (model) parallelism over d_ff, heads and vocab.

The model never names mesh axes: parameters and activations carry *logical* axis names (``embed``,
``mlp``, ``expert``, ``batch``, ...; see docs/architecture.md) and :data:`LOGICAL_AXIS_RULES` -- the one
table in the code base -- maps them to mesh axes. MoE expert buffers are constrained to
``("expert", "expert_group", ...)`` while the tokens before dispatch are constrained to ``("batch", ...)``;
under ``jax.jit`` GSPMD turns the change of sharding between the two into an all-to-all over the
``expert`` axis (see docs/training.md for why we use sharding constraints rather than shard_map).

Parameters get their shardings from :func:`param_shardings`: the rules table and, with its ``fsdp``
switch (gin/partitioning/fsdp.gin), one more dimension of every large parameter split over ``data``
(FSDP / ZeRO-3, t5x's 2-D parameter partitioning); optimizer state follows its parameter
(:func:`derived_shardings`).

Everything here is plain functions; :func:`make_mesh` is gin-configurable through the t5x-moe macros
``NUM_EXPERT_PARTITIONS`` and ``NUM_MODEL_PARTITIONS``, :func:`param_shardings` through ``fsdp`` and
``fsdp_min_size`` (gin/partitioning/*.gin).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from typing import Any, Iterator, Mapping, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from stmoe.errors import UserError
from stmoe.platform import building_for

MESH_AXES: tuple[str, str, str] = ("data", "expert", "model")

# logical axis name -> mesh axis (or tuple of mesh axes, or None = replicated). The ONE rules table.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "expert")),  # batch rows / token groups before dispatch
    ("expert_group", "data"),  # token groups after the all-to-all (inside an expert shard)
    ("expert", "expert"),  # stacked expert parameters and expert buffers
    ("vocab", "model"),
    ("mlp", "model"),  # d_ff of dense and expert MLPs
    ("heads", "model"),
    ("kv", None),
    ("embed", None),
    ("relpos_buckets", None),
    ("length", None),
    ("capacity", None),
    ("layers", None),  # scanned layer stacks
    ("unmodeled", None),
)


class MeshConfigError(UserError):
  """A mesh that cannot fit the devices, the model or the batch (raised before anything is compiled)."""


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MeshShape:
  """Sizes of the (data, expert, model) mesh axes."""

  data: int
  expert: int
  model: int

  @property
  def size(self) -> int:
    return self.data * self.expert * self.model

  def as_tuple(self) -> tuple[int, int, int]:
    return (self.data, self.expert, self.model)


def mesh_shape_for(num_devices: int, num_expert_partitions: int = 1, num_model_partitions: int = 1) -> MeshShape:
  """The (data, expert, model) sizes for `num_devices` devices; `data` takes what the others leave.

  Raises MeshConfigError (saying what to change) when the partitions do not divide the device count.
  """
  if num_expert_partitions < 1 or num_model_partitions < 1:
    raise MeshConfigError(
        f"NUM_EXPERT_PARTITIONS={num_expert_partitions} and NUM_MODEL_PARTITIONS={num_model_partitions} must "
        "both be >= 1.")
  per_replica = num_expert_partitions * num_model_partitions
  if num_devices % per_replica:
    raise MeshConfigError(
        f"Cannot build a mesh: NUM_EXPERT_PARTITIONS ({num_expert_partitions}) x NUM_MODEL_PARTITIONS "
        f"({num_model_partitions}) = {per_replica} does not divide the {num_devices} available devices. "
        f"Choose partition counts whose product divides {num_devices} (e.g. "
        f"{_divisors(num_devices)}).")
  return MeshShape(num_devices // per_replica, num_expert_partitions, num_model_partitions)


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


@gin.configurable
def make_mesh(num_expert_partitions: int = 1,
              num_model_partitions: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, expert, model) mesh over all devices of all processes (Auto axis types).

  Devices are laid out in ``jax.devices()`` order (process-major), so the ``data`` axis spans processes
  and each process holds a contiguous block of batch rows (see :func:`process_batch_slice`).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape_for(len(devices), num_expert_partitions, num_model_partitions)
  grid = np.asarray(devices, dtype=object).reshape(shape.as_tuple())
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def mesh_shape(mesh: Mesh) -> MeshShape:
  return MeshShape(*(int(mesh.shape[a]) for a in MESH_AXES))


def validate_mesh(mesh: Mesh | MeshShape, model_config: Any = None, batch_size: int | None = None) -> None:
  """Refuse, up front, a mesh that does not fit the model or the batch; the message says what to change.

  Checks: experts divisible by the expert partitions; heads, d_ff, expert d_ff and vocab divisible by the
  model partitions; the global batch divisible by data x expert (the batch is split over both).
  """
  shape = mesh if isinstance(mesh, MeshShape) else mesh_shape(mesh)
  problems: list[str] = []
  if model_config is not None:
    moe = getattr(model_config, "moe", None)
    if moe is not None and getattr(model_config, "is_sparse", True):
      if moe.num_experts % shape.expert:
        problems.append(
            f"num_experts={moe.num_experts} is not divisible by NUM_EXPERT_PARTITIONS={shape.expert}; use a "
            f"number of expert partitions that divides {moe.num_experts} (one of {_divisors(moe.num_experts)}).")
      if moe.d_ff % shape.model:
        problems.append(f"MoeConfig.d_ff={moe.d_ff} is not divisible by NUM_MODEL_PARTITIONS={shape.model}.")
    elif shape.expert > 1:
      problems.append(
          f"NUM_EXPERT_PARTITIONS={shape.expert} but the model has no experts; set NUM_EXPERT_PARTITIONS=1.")
    for name in ("num_heads", "d_ff", "vocab_size"):
      value = getattr(model_config, name, None)
      if value is not None and value % shape.model:
        problems.append(
            f"ModelConfig.{name}={value} is not divisible by NUM_MODEL_PARTITIONS={shape.model}; use a number "
            f"of model partitions that divides {value}.")
  if batch_size is not None and batch_size % (shape.data * shape.expert):
    problems.append(
        f"BATCH_SIZE={batch_size} is not divisible by data x expert = {shape.data} x {shape.expert} = "
        f"{shape.data * shape.expert} (the batch is split over both axes); use a multiple of "
        f"{shape.data * shape.expert}.")
  if problems:
    raise MeshConfigError(f"Mesh (data={shape.data}, expert={shape.expert}, model={shape.model}) does not fit: "
                          + " ".join(problems))


# ---------------------------------------------------------------------------------------------------------
# Logical axes -> shardings.


def logical_to_mesh_spec(logical: PartitionSpec | Sequence[str | None] | None,
                         rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> PartitionSpec:
  """A PartitionSpec of logical names -> a PartitionSpec of mesh axes (unknown names are replicated)."""
  if logical is None:
    return PartitionSpec()
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name in logical:
    mesh_axes = table.get(name) if name is not None else None
    if mesh_axes is None:
      out.append(None)
      continue
    axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    axes = tuple(a for a in axes if a not in used)  # a mesh axis can shard only one dimension
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*out)


def _fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Drop mesh axes from dimensions they do not divide (such dimensions are replicated instead)."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  fitted = []
  for dim, entry in zip(shape, entries):
    if entry is None:
      fitted.append(None)
      continue
    axes = (entry,) if isinstance(entry, str) else tuple(entry)
    size = math.prod(mesh.shape[a] for a in axes)
    fitted.append(entry if dim % size == 0 else None)
  return PartitionSpec(*fitted)


def logical_to_sharding(logical_tree: Any, mesh: Mesh, shapes: Any = None,
                        rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> Any:
  """A pytree of logical PartitionSpecs -> a pytree of NamedShardings on `mesh`.

  With `shapes` (a matching pytree of arrays / ShapeDtypeStructs), dimensions a mesh axis does not divide
  are replicated instead of failing inside XLA.
  """
  is_leaf = lambda x: isinstance(x, PartitionSpec) or x is None
  if shapes is None:
    return jax.tree.map(lambda s: NamedSharding(mesh, logical_to_mesh_spec(s, rules)), logical_tree,
                        is_leaf=is_leaf)
  return jax.tree.map(
      lambda s, x: NamedSharding(mesh, _fit_spec(logical_to_mesh_spec(s, rules), x.shape, mesh)),
      logical_tree, shapes, is_leaf=is_leaf)


# ---------------------------------------------------------------------------------------------------------
# Parameter shardings, optionally split over `data` as well (FSDP / ZeRO-3; t5x's 2-D parameter partitioning).

# Logical dimensions FSDP never splits: a scanned stack is sliced one layer per scan iteration, so splitting
# its `layers` dimension would gather the whole stack instead of one layer's weights.
FSDP_EXCLUDED_LOGICAL_AXES: tuple[str, ...] = ("layers",)
FSDP_MIN_SIZE = 2 ** 14  # elements; smaller parameters (norm scales, relpos biases, routers) stay replicated


def fsdp_spec(spec: PartitionSpec, shape: Sequence[int], logical: PartitionSpec | Sequence[str | None] | None,
              mesh: Mesh, min_size: int = FSDP_MIN_SIZE) -> PartitionSpec:
  """`spec` (a fitted mesh spec) with one more dimension split over the `data` axis, if one qualifies.

  The rule (deterministic, shape-only): a parameter of at least `min_size` elements gets its *largest*
  dimension that (a) is not already split over a mesh axis of size > 1, (b) is not a scanned `layers`
  dimension and (c) the `data` size divides, split over `data` (ties: the first such dimension). Size-1
  mesh axes on that dimension are dropped (they split nothing). Nothing changes when `data` has size 1,
  the spec already uses `data`, or no dimension qualifies (the parameter then stays replicated over data).
  Only the mesh's axis sizes are read (a jax.sharding.AbstractMesh will do).
  """
  data = int(mesh.shape["data"])
  entries = list(spec) + [None] * (len(shape) - len(spec))
  if data == 1 or math.prod(shape) < min_size or any("data" in _entry_axes(e) for e in entries):
    return PartitionSpec(*entries)
  names = list(logical or ()) + [None] * (len(shape) - len(logical or ()))
  candidates = [i for i, (dim, entry, name) in enumerate(zip(shape, entries, names))
                if name not in FSDP_EXCLUDED_LOGICAL_AXES and dim % data == 0
                and all(mesh.shape[a] == 1 for a in _entry_axes(entry))]
  if not candidates:
    return PartitionSpec(*entries)
  chosen = max(candidates, key=lambda i: (shape[i], -i))  # largest; the first of equals
  entries[chosen] = "data"
  return PartitionSpec(*entries)


def _entry_axes(entry: Any) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry (None, an axis name or a tuple of names)."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


@gin.configurable(allowlist=["fsdp", "fsdp_min_size"])
def param_shardings(logical_tree: Any, mesh: Mesh, shapes: Any, *, fsdp: bool = False,
                    fsdp_min_size: int = FSDP_MIN_SIZE) -> Any:
  """The parameters' NamedShardings: the rules table, and with `fsdp` one more dimension over `data`.

  Without `fsdp` this is :func:`logical_to_sharding` with shapes (non-expert parameters are replicated over
  `data`). With `fsdp` (gin: ``param_shardings.fsdp = True``, gin/partitioning/fsdp.gin) every parameter of
  at least `fsdp_min_size` elements is also split over `data` by :func:`fsdp_spec`, and so is its optimizer
  state (:func:`derived_shardings` follows the parameter). Activations stay batch-sharded, so under jit XLA
  all-gathers each weight where it is used and reduce-scatters its gradient back to the shards; the results
  do not depend on the switch (it changes where bytes live, not what is computed).
  """
  is_leaf = lambda x: isinstance(x, PartitionSpec) or x is None

  def one(logical, x):
    spec = _fit_spec(logical_to_mesh_spec(logical), x.shape, mesh)
    if fsdp:
      spec = fsdp_spec(spec, x.shape, logical, mesh, fsdp_min_size)
    return NamedSharding(mesh, spec)

  return jax.tree.map(one, logical_tree, shapes, is_leaf=is_leaf)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Sharding of one batch feature [batch, length, ...]: rows over (data, expert)."""
  return NamedSharding(mesh, PartitionSpec(("data", "expert"), *([None] * (ndim - 1))))


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> Iterator[None]:
  """Mesh + logical axis rules in scope, so `nn.with_logical_constraint` in the model takes effect.

  Trace (and call) jitted functions inside this context: the model's activation constraints (e.g. the MoE
  expert buffers on ("expert", "expert_group", ...)) then pin shardings and XLA inserts the all-to-alls.
  """
  platform = mesh.devices.flat[0].platform  # kernels follow the devices compiled for, not the host
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules), building_for(platform):
    yield


# ---------------------------------------------------------------------------------------------------------
# Optimizer-state shardings follow the parameters they belong to.


def key_name(k: Any) -> str:
  """The name of one pytree path entry: a dict key, an attribute name or a sequence index, as a string."""
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_str(path: Sequence[Any]) -> str:
  """'encoder/layer_0/attention/query/kernel' for a pytree key path."""
  return "/".join(key_name(k) for k in path)


def _spec_for_derived(param_shape: tuple[int, ...], param_spec: PartitionSpec,
                      shape: tuple[int, ...]) -> PartitionSpec:
  """The spec of an optimizer-state leaf of `shape` derived from a parameter (same, reduced or factored)."""
  entries = list(param_spec) + [None] * (len(param_shape) - len(param_spec))
  if tuple(shape) == tuple(param_shape):
    return PartitionSpec(*entries)
  if len(shape) == len(param_shape) - 1:  # a factored row/column statistic: one dimension removed
    for drop in range(len(param_shape)):
      if tuple(param_shape[:drop] + param_shape[drop + 1:]) == tuple(shape):
        return PartitionSpec(*(entries[:drop] + entries[drop + 1:]))
  if len(shape) == len(param_shape):  # reduced with keepdims: size-1 dimensions are replicated
    if all(s in (p, 1) for s, p in zip(shape, param_shape)):
      return PartitionSpec(*(e if s == p else None for e, s, p in zip(entries, shape, param_shape)))
  return PartitionSpec()


def derived_shardings(tree: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
  """Shardings for a pytree (e.g. optimizer state) whose leaves mirror parameters.

  A leaf whose key path ends with a parameter's key path takes that parameter's sharding (with the
  removed dimension dropped for factored Adafactor statistics); anything else (step counts, placeholders)
  is replicated. No arrays are touched, so this works on `jax.eval_shape` outputs.
  """
  param_info: dict[tuple[str, ...], tuple[tuple[int, ...], PartitionSpec]] = {}
  flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_s = jax.tree.leaves(param_shardings)
  for (path, p), s in zip(flat_p, flat_s):
    param_info[tuple(key_name(k) for k in path)] = (tuple(p.shape), s.spec)
  max_len = max((len(k) for k in param_info), default=0)

  def leaf_sharding(path, x):
    names = tuple(key_name(k) for k in path)
    for n in range(min(max_len, len(names)), 0, -1):
      info = param_info.get(names[-n:])
      if info is not None:
        spec = _spec_for_derived(info[0], info[1], tuple(x.shape))
        return NamedSharding(mesh, _fit_spec(spec, x.shape, mesh))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def describe_shardings(params: Any, shardings: Any, pattern: str = ".*") -> dict[str, str]:
  """'path' -> 'shape spec' for parameters matching `pattern` (for logs and tests)."""
  out = {}
  for (path, p), s in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(shardings)):
    name = path_str(path)
    if re.search(pattern, name):
      out[name] = f"{tuple(p.shape)} {s.spec}"
  return out


# ---------------------------------------------------------------------------------------------------------
# Host-local batches -> global arrays.


def process_batch_slice(global_batch_size: int) -> tuple[int, int]:
  """(shard_id, num_shards) of the data this process must read: one contiguous block of batch rows."""
  return jax.process_index(), jax.process_count()


def make_global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assemble each process's rows into global arrays sharded over (data, expert)."""
  out = {}
  for name, value in local_batch.items():
    value = np.asarray(value)
    sharding = batch_sharding(mesh, value.ndim)
    global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
    out[name] = jax.make_array_from_process_local_data(sharding, value, global_shape)
  return out
