"""Ahead-of-time compilation of the train step for any mesh (a TPU pod described on a laptop, or CPU devices).

`compile_train_step` builds exactly the step `stmoe train` runs (the shared run setup, the same optimizer,
microbatching and shardings) from abstract shapes only -- nothing is materialised -- lowers it on the
mesh and compiles it. `analyse` then reads what the compiler decided, per chip:

* memory (`memory_analysis()`): arguments, outputs, temporaries; and the parameter and optimizer-state
  bytes each chip holds (from their shardings);
* FLOPs (`cost_analysis()["flops"]`, per chip) against the model's FLOPs (`stmoe info`: 3x the forward);
* every collective of the optimised HLO by kind, with its count and bytes, and what each all-gather
  gathers (its `op_name`); an all-gather of expert parameters means the expert sharding was lost.

TPU topologies come from libtpu (`pip install 'stmoe[tpu]'`): `jax.experimental.topologies` describes
e.g. `v5p:8x8x8` on a CPU-only machine and XLA compiles for it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from stmoe import partitioning
from stmoe.errors import UserError
from stmoe.training import optimizers as opt_lib
from stmoe.training import setup as setup_lib
from stmoe.training import step as step_lib

GIB = 2 ** 30
# HBM per chip (GiB) of the TPU generations `--topology` accepts.
HBM_GIB = {"v4": 32.0, "v5e": 16.0, "v5litepod": 16.0, "v5p": 95.0, "v6e": 32.0}
# Published peak dense bf16 FLOP/s per chip (Google Cloud TPU system architecture pages): what a step's
# model FLOPs are divided by to project its time at a given model FLOPs utilisation (MFU).
PEAK_BF16_FLOPS = {"v4": 275e12, "v5e": 197e12, "v5litepod": 197e12, "v5p": 459e12, "v6e": 918e12}
# The MFUs `stmoe compile` projects a step at: 40% is what well-tuned large MoE runs report, 55% the best
# published dense-model figures.
PROJECTED_MFUS = (0.40, 0.55)
# ragged-all-to-all (jax.lax.ragged_all_to_all: the dropless dispatch under expert parallelism) is its own kind;
# its bytes are those of its result, the static receive buffer, an upper bound on what it really sends.
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


@dataclasses.dataclass
class CompiledStep:
  """A compiled train step and what it was built from."""

  compiled: Any  # jax.stages.Compiled
  setup: setup_lib.RunSetup
  compile_seconds: float
  num_microbatches: int


def topology_devices(name: str) -> tuple[list[Any], str]:
  """(devices, chip generation) of `--topology`: 'v5p:2x2x1'-style TPU names, or 'cpu:N'."""
  kind, _, shape = name.partition(":")
  if kind == "cpu":
    n = int(shape or 1)
    devices = jax.devices("cpu")
    if len(devices) < n:
      raise UserError(f"--topology {name} needs {n} CPU devices but this process has {len(devices)}: "
                      "`stmoe compile` sets XLA_FLAGS=--xla_force_host_platform_device_count=N itself unless "
                      "jax was already initialised (run it as its own command).")
    return devices[:n], "cpu"
  if kind not in HBM_GIB or not shape:
    raise UserError(f"--topology {name!r}: use a TPU topology such as v4:2x2x1, v5e:2x2, v5p:4x4x4, v6e:4x4, "
                    "or cpu:N for N simulated CPU devices.")
  try:
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(platform="tpu", topology_name=name)
  except Exception as e:  # libtpu missing, or a shape the generation does not have
    text = str(e).split("\n")[0][:300]
    if "libtpu" in text.lower() or "tpu" not in text.lower():
      raise UserError(f"cannot describe TPU topology {name!r} ({type(e).__name__}: {text}). Compiling for TPUs "
                      "needs libtpu: pip install 'stmoe[tpu]' (jax[tpu] with the libtpu that matches jax).") from e
    raise UserError(f"cannot describe TPU topology {name!r}: {text}") from e
  return list(desc.devices), kind


def compile_train_step(model: Any, mesh: Mesh, *, batch_size: int, task_feature_lengths: Mapping[str, int],
                       optimizer: opt_lib.OptimizerDef, num_microbatches: int = 1, model_type: str | None = None,
                       seed: int = 0) -> CompiledStep:
  """Lowers and compiles the train step of `stmoe train` on `mesh` from abstract shapes only."""
  setup = setup_lib.setup_run(model, mesh, batch_size=batch_size, task_feature_lengths=task_feature_lengths,
                              model_type=model_type, optimizer=optimizer, seed=seed)
  train_fn = step_lib.make_train_step(setup.model.loss_fn, setup.tx, optimizer.schedule, num_microbatches)
  batch = {k: jax.ShapeDtypeStruct(v, np.int32, sharding=partitioning.batch_sharding(mesh, len(v)))
           for k, v in setup.input_shapes.items()}
  t0 = time.time()
  with partitioning.mesh_context(mesh):
    jitted = step_lib.jit_train_step(train_fn, setup.spec.shardings, {k: v.sharding for k, v in batch.items()},
                                     mesh)
    lowered = jitted.lower(setup.spec.abstract, batch)
    try:
      compiled = lowered.compile()
    except Exception as e:  # XLA:TPU refuses a program that cannot fit HBM at compile time
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      raise StepDoesNotFitError(
          f"the train step does not fit one chip ({' '.join(str(e).split())[:300]}). Try: more expert or model "
          "partitions (NUM_EXPERT_PARTITIONS / NUM_MODEL_PARTITIONS) to shard parameters and optimizer state "
          "further; a smaller per-chip batch (BATCH_SIZE, or NUM_MICROBATCHES for the same global batch); "
          "rematerialisation and scan over layers (ModelConfig.remat / scan_layers).") from None
  return CompiledStep(compiled, setup, time.time() - t0, num_microbatches)


class StepDoesNotFitError(UserError):
  """The compiled train step needs more memory per chip than the chip has; the message says what to change."""

  exit_code = 1


def _shard_bytes(tree: Any) -> int:
  """Bytes of one device's shard of every array of an abstract tree with shardings."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return int(total)


# A computation's header line: `%name (params) -> result_type {`.
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.-]+) \(.*\) -> (.*) \{\s*$")
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")


def _bytes_of(text: str) -> int:
  """Bytes of the (possibly tuple-shaped) result type at the start of an HLO instruction's right side."""
  total = 0
  for dtype, dims in _SHAPE.findall(text):
    total += math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES[dtype]
  return total


def collectives(hlo_text: str) -> dict[str, dict[str, Any]]:
  """{kind: {"count", "bytes", "ops": [{"name", "bytes", "op_name", "expert_parameter"}]}} of an HLO module.

  Async pairs (`*-start` / `*-done`) count once, at their start; `ragged-all-to-all` is not also an
  `all-to-all`; the all-reduce inside an XLA:TPU `all-reduce-scatter` fusion is a reduce-scatter (bytes:
  the shard it yields). `op_name` is the JAX source op the
  collective came from; an all-gather whose op_name points at `moe/experts` is flagged: expert weights
  must stay sharded over the expert axis and never be gathered.
  """
  out: dict[str, dict[str, Any]] = {k: {"count": 0, "bytes": 0, "ops": []} for k in COLLECTIVES}
  scatter_bytes = None  # inside an XLA:TPU `all-reduce-scatter` computation: the bytes of its result (a shard)
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      scatter_bytes = _bytes_of(header.group(2)) if header.group(1).startswith("all-reduce-scatter") else None
      continue
    if line.startswith("}"):
      scatter_bytes = None
      continue
    if "=" not in line:
      continue
    lhs, rhs = line.split("=", 1)
    for kind in COLLECTIVES:
      m = re.search(rf"(?<![\w-]){kind}(-start)?\(", rhs)  # whole name: all-to-all is not ragged-all-to-all
      if not m or f"{kind}-done(" in rhs:
        continue
      head = rhs[:m.start()]
      size = _bytes_of(head)
      if kind == "all-reduce" and scatter_bytes is not None:
        # XLA:TPU fuses all-reduce + dynamic-slice into an `all-reduce-scatter` computation: a reduce-scatter,
        # counted as one at the size of the shard it yields (as a reduce-scatter instruction's result).
        kind, size = "reduce-scatter", scatter_bytes
      op_name = re.search(r'op_name="([^"]*)"', rhs)
      op = op_name.group(1) if op_name else ""
      out[kind]["count"] += 1
      out[kind]["bytes"] += size
      out[kind]["ops"].append({"name": lhs.strip().lstrip("%").split()[-1], "bytes": size, "op_name": op,
                               "expert_parameter": kind == "all-gather" and "experts" in op})
      break
  return out


def projection(model_flops_per_step: float | None, tokens_per_step: int, num_devices: int,
               peak_flops_per_chip: float | None) -> dict[str, dict[str, float]]:
  """{"mfu_0.40": {"step_seconds", "tokens_per_second"}, ...}: the step at each of `PROJECTED_MFUS`.

  step time = model FLOPs per step / (chips x peak FLOP/s per chip x MFU); empty when the peak or the model
  FLOPs are unknown (CPU devices).
  """
  if not model_flops_per_step or not peak_flops_per_chip:
    return {}
  out = {}
  for mfu in PROJECTED_MFUS:
    seconds = model_flops_per_step / (num_devices * peak_flops_per_chip * mfu)
    out[f"mfu_{mfu:.2f}"] = {"step_seconds": seconds, "tokens_per_second": tokens_per_step / seconds}
  return out


def analyse(step: CompiledStep, *, hbm_gib: float | None, model_flops_per_step: float | None = None,
            peak_flops_per_chip: float | None = None) -> dict[str, Any]:
  """The per-chip report of a compiled step (see the module docstring); `fits` against `hbm_gib`."""
  mem = step.compiled.memory_analysis()
  spec = step.setup.spec
  params = _shard_bytes(spec.abstract["params"])
  opt_state = _shard_bytes(spec.abstract["opt_state"])
  arguments = int(getattr(mem, "argument_size_in_bytes", 0))
  temporaries = int(getattr(mem, "temp_size_in_bytes", 0))
  outputs = int(getattr(mem, "output_size_in_bytes", 0))
  aliased = int(getattr(mem, "alias_size_in_bytes", 0))
  # The state is donated: its outputs alias its arguments, so they are not counted twice.
  total = arguments + temporaries + max(outputs - aliased, 0)
  cost = step.compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float((cost or {}).get("flops", float("nan")))
  colls = collectives(step.compiled.as_text())
  num_devices = int(np.prod(list(step.setup.mesh.shape.values())))
  tokens_per_step = step.setup.batch_size * sum(step.setup.task_feature_lengths.values())
  report = {
      "mesh": dict(step.setup.mesh.shape),
      "num_devices": num_devices,
      "batch_size": step.setup.batch_size,
      "task_feature_lengths": step.setup.task_feature_lengths,
      "num_microbatches": step.num_microbatches,
      "compile_seconds": round(step.compile_seconds, 2),
      "memory_per_chip_bytes": {"parameters": params, "optimizer_state": opt_state, "arguments": arguments,
                                "temporaries": temporaries, "outputs": outputs, "aliased": aliased,
                                "total": total},
      "hbm_per_chip_bytes": int(hbm_gib * GIB) if hbm_gib else None,
      "fits": (total <= hbm_gib * GIB) if hbm_gib else None,
      "compiler_flops_per_chip": flops,
      "model_flops_per_step": model_flops_per_step,
      "compiler_vs_model_flops": (flops * num_devices / model_flops_per_step
                                  if model_flops_per_step and math.isfinite(flops) else None),
      "tokens_per_step": tokens_per_step,
      "peak_bf16_flops_per_chip": peak_flops_per_chip,
      "projected": projection(model_flops_per_step, tokens_per_step, num_devices, peak_flops_per_chip),
      "collectives": {k: {"count": v["count"], "bytes": v["bytes"]} for k, v in colls.items()},
      "all_gathers": [op for op in colls["all-gather"]["ops"]],
      "expert_parameter_all_gathers": [op for op in colls["all-gather"]["ops"] if op["expert_parameter"]],
  }
  return report


def advice(report: Mapping[str, Any]) -> str:
  """What to change when a step does not fit one chip's memory."""
  mem = report["memory_per_chip_bytes"]
  hints = []
  if mem["parameters"] + mem["optimizer_state"] > 0.5 * (report["hbm_per_chip_bytes"] or 1):
    hints.append("shard parameters and optimizer state further: over data as well (--gin_file "
                 "partitioning/fsdp.gin), more expert partitions (NUM_EXPERT_PARTITIONS) or model partitions "
                 "(NUM_MODEL_PARTITIONS)")
  hints.append("a smaller per-chip batch (BATCH_SIZE, or NUM_MICROBATCHES for the same global batch)")
  hints.append("rematerialisation and scan over layers (ModelConfig.remat / scan_layers)")
  return (f"the train step needs {mem['total'] / GIB:.2f} GiB per chip (parameters {mem['parameters'] / GIB:.2f}, "
          f"optimizer state {mem['optimizer_state'] / GIB:.2f}, temporaries {mem['temporaries'] / GIB:.2f}) but a "
          f"chip has {report['hbm_per_chip_bytes'] / GIB:.0f} GiB. Try: " + "; ".join(hints) + ".")
