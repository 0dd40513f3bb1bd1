"""One-shot accelerator benchmark: matmul peak, MoE layer per dispatch, and the st_moe_base train step.

`python tools/benchmark.py accelerator --json OUT.json [--tiny]`

Written for a lent GPU (H100/H200) where one run must finish inside 8 minutes, and runnable on CPU
(automatically with tiny sizes there, or with --tiny anywhere) so that its JSON contract is tested.
Three sections, in this order, each with its own share of the time budget:

(a) matmul: bf16 x bf16 -> float32 accumulation (`preferred_element_type`) at a few large square sizes;
    per size the best of several timed repeats after warm-up, each repeat a run of back-to-back calls
    (so host dispatch stays out of sub-millisecond kernels); TFLOP/s = 2 m k n / time. The largest rate
    is the `peak_tflops` that MFU is measured against below.
(b) moe_layer: MoeLayer forward + backward per dispatch (einsum, sort, grouped, dropless; on GPU grouped
    and dropless run `jax.lax.ragged_dot`) against a FLOP-matched dense MLP (d_ff = k x expert d_ff, same
    gated activations), at st_moe_base sizes: d_model 768, 16 GEGLU experts of d_ff 2048, top-2,
    capacity factor 1.25, 64k bf16 tokens, at a few routing-group sizes. Reports ms, ratio to dense, the
    fraction of assignments dropped, and TFLOP/s of the model FLOPs (k experts per token, no padding).
(c) train_step: the st_moe_base model (models/st_moe_base.gin, built here in Python so gin is not
    needed) with bfloat16 activations through the project's own trainer path (stmoe.models.api
    make_model, stmoe.training.state / step / optimizers, Adafactor, donated state, one-device mesh) on
    synthetic random token batches; the largest batch from the candidates whose compiled memory fits the
    device. Reports step time, tokens/s (inputs + targets), model TFLOP/s and MFU against (a)'s peak.

Every piece runs under a time guard: a piece that no longer fits the remaining budget is skipped with
the reason recorded, a failing piece records its error, and the JSON file is rewritten after every
piece, so a crash or a `timeout` kill later still leaves what was measured. Nothing here imports gin,
seqio or TensorFlow (stmoe itself imports gin; see tools/gin_shim for machines without gin-config).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import math
import os
import platform
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import bench_common
from bench_common import Budget, error_record, write_json_atomic
from bench_moe_layer import LayerSpec, time_dense, time_dispatch

SCHEMA_VERSION = 1
SECTIONS = ("matmul", "moe_layer", "train_step")


# ----------------------------------------------------------------------------------------------------
# Plans: what to measure at each size
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainPlan:
  """The train-step model and batch: st_moe_base's dimensions (gin/models/st_moe_base.gin) by default."""

  vocab_size: int = 32128
  d_model: int = 768
  num_heads: int = 12
  d_kv: int = 64
  d_ff: int = 2048
  num_encoder_layers: int = 12
  num_decoder_layers: int = 12
  num_experts: int = 16
  expert_d_ff: int = 2048
  top_k: int = 2
  sparse_every: int = 4  # layers 3, 7, 11 of each stack (SparseLayout kind "every")
  group_size: int = 512
  train_capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0
  inputs_length: int = 512
  targets_length: int = 114
  batches: tuple[int, ...] = (128, 64, 32, 16)  # tried largest first; the first whose memory fits runs
  dispatches: tuple[str, ...] = ("sort", "dropless")  # the first is the headline; later ones if time allows
  dtype: str = "bfloat16"
  warmup: int = 2
  iters: int = 10  # at most; fewer (>= min_iters) when the budget is short
  min_iters: int = 3
  memory_headroom: float = 0.92  # a batch fits if its compiled peak is under this fraction of the device limit

  def model_config(self, dispatch: str):
    """The stmoe ModelConfig: st_moe_base.gin's bindings (via st_moe_common / moe_common / t5_1_1_common)."""
    from stmoe.config import ModelConfig, MoeConfig, SparseLayout

    moe = MoeConfig(num_experts=self.num_experts, num_selected_experts=self.top_k, d_ff=self.expert_d_ff,
                    activations=("gelu", "linear"), group_size=self.group_size,
                    train_capacity_factor=self.train_capacity_factor,
                    eval_capacity_factor=self.eval_capacity_factor, capacity_convention="stmoe",
                    dispatch=dispatch, aux_loss_coef=1e-2, router_z_loss_coef=1e-3, expert_dropout=0.0,
                    min_expert_capacity=4, extra_dense_mlp=True, load_balance_count="all")
    layout = SparseLayout(kind="every", every=self.sparse_every)
    return ModelConfig(vocab_size=self.vocab_size, d_model=self.d_model, num_heads=self.num_heads,
                       d_kv=self.d_kv, d_ff=self.d_ff, num_encoder_layers=self.num_encoder_layers,
                       num_decoder_layers=self.num_decoder_layers, activations=("gelu", "linear"),
                       dropout_rate=0.0, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                       logits_via_embedding=False, z_loss=1e-4, dtype=self.dtype, moe=moe,
                       encoder_sparse=layout, decoder_sparse=layout)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything one run measures, and its time budget (seconds) with each section's share of it."""

  size: str
  matmul_shapes: tuple[tuple[int, int, int], ...]  # (m, k, n)
  matmul_repeats: int
  matmul_repeat_s: float  # target length of one timed repeat (back-to-back calls)
  layer: LayerSpec
  layer_group_sizes: tuple[int, ...]
  layer_dispatches: tuple[str, ...]
  layer_warmup: int
  layer_iters: int
  train: TrainPlan
  time_budget_s: float
  # Fractions of time_budget_s, so that --time_budget_s scales them: a section runs at most `share` of the
  # budget and must end while `reserve` of it is still left for the sections after it. Time a section
  # does not use goes to the later ones.
  share: dict[str, float]
  reserve: dict[str, float]
  min_piece_s: dict[str, float]  # section -> do not start a piece with less than this left


FULL = Plan(
    size="full",
    matmul_shapes=((4096, 4096, 4096), (8192, 8192, 8192), (16384, 16384, 16384)),
    matmul_repeats=5,
    matmul_repeat_s=0.05,
    # 128 x 512 = 65,536 tokens; the group size is replaced per entry of layer_group_sizes.
    layer=LayerSpec(batch=128, length=512, d_model=768, d_ff=2048, experts=16, k=2, group_size=1024,
                    capacity_factor=1.25, capacity_convention="stmoe", activations=("gelu", "linear"),
                    dtype="bfloat16"),
    layer_group_sizes=(1024, 4096),
    layer_dispatches=("einsum", "sort", "grouped", "dropless"),
    layer_warmup=2,
    layer_iters=10,
    train=TrainPlan(),
    time_budget_s=420.0,  # under device_bench.sh's 480 s timeout, with room for start-up and the last write
    # matmul: <= 42 s; moe_layer: <= 151 s and done by 231 s; train_step: the rest, >= 189 s.
    share={"matmul": 0.10, "moe_layer": 0.36, "train_step": 1.0},
    reserve={"matmul": 0.75, "moe_layer": 0.45, "train_step": 0.0},
    min_piece_s={"matmul": 5.0, "moe_layer": 10.0, "train_step": 90.0},
)

TINY = Plan(
    size="tiny",
    matmul_shapes=((256, 256, 256), (512, 512, 512)),
    matmul_repeats=3,
    matmul_repeat_s=0.01,
    # d_model >= 64: XLA:CPU rejects some bf16 products of the blocked grouped matmul at d_model 32/48.
    layer=LayerSpec(batch=4, length=64, d_model=64, d_ff=64, experts=4, k=2, group_size=128,
                    capacity_factor=1.25, capacity_convention="stmoe", activations=("gelu", "linear"),
                    dtype="bfloat16"),
    layer_group_sizes=(128,),
    layer_dispatches=("einsum", "sort", "grouped", "dropless"),
    layer_warmup=1,
    layer_iters=2,
    # One layer per stack, sparse, with ST-MoE's extra dense MLP beside it: the st_moe layer at the least
    # compile time (XLA:CPU compile dominates a tiny run).
    train=TrainPlan(vocab_size=128, d_model=64, num_heads=2, d_kv=32, d_ff=64, num_encoder_layers=1,
                    num_decoder_layers=1, num_experts=4, expert_d_ff=64, sparse_every=1, group_size=64,
                    inputs_length=32, targets_length=16, batches=(4,), dispatches=("sort",), warmup=1,
                    iters=2, min_iters=1),
    time_budget_s=120.0,
    share={"matmul": 0.125, "moe_layer": 0.5, "train_step": 1.0},
    reserve={"matmul": 0.25, "moe_layer": 0.125, "train_step": 0.0},
    min_piece_s={"matmul": 0.5, "moe_layer": 1.0, "train_step": 5.0},
)


# ----------------------------------------------------------------------------------------------------
# The run's record
# ----------------------------------------------------------------------------------------------------


def _versions() -> dict[str, str | None]:
  out: dict[str, str | None] = {"python": platform.python_version(), "jax": jax.__version__}
  for name in ("jaxlib", "flax", "optax", "numpy"):
    try:
      out[name] = getattr(__import__(name), "__version__", None)
    except ImportError:
      out[name] = None
  gin = sys.modules.get("gin")
  if gin is None:
    out["gin"] = None
  elif getattr(gin, "IS_SHIM", False):
    out["gin"] = "shim (tools/gin_shim: gin-config not installed)"
  else:
    try:
      from importlib import metadata
      out["gin"] = "gin-config " + metadata.version("gin-config")
    except Exception:  # noqa: BLE001 -- a version string is informative, never essential
      out["gin"] = "gin-config"
  return out


def _env(plan: Plan) -> dict[str, Any]:
  dev = jax.devices()[0]
  env = {
      "backend": jax.default_backend(),
      "device_kind": dev.device_kind,
      "device_count": jax.device_count(),
      "platform_version": getattr(dev.client, "platform_version", None),
      "versions": _versions(),
      "cpu_count": os.cpu_count(),
      "size": plan.size,
      "time_budget_s": plan.time_budget_s,
      "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "xla_python_client_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
  }
  env["device_memory_limit_bytes"] = _memory_limit()
  return env


def _memory_limit() -> int | None:
  """Bytes the first device can allocate (None where the backend does not say, e.g. CPU)."""
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # noqa: BLE001 -- some backends raise instead of returning None
    return None
  limit = stats.get("bytes_limit")
  return int(limit) if limit else None


def _plan_record(plan: Plan) -> dict[str, Any]:
  rec = dataclasses.asdict(plan)
  rec["layer"]["tokens"] = plan.layer.tokens
  return rec


def _new_section() -> dict[str, Any]:
  return {"status": "not_run", "results": [], "skipped": [], "errors": [], "wall_s": 0.0}


def _finish_section(sec: dict[str, Any], t0: float) -> None:
  sec["wall_s"] = time.perf_counter() - t0
  if sec["status"] in ("not_run", "running"):
    if sec["results"] and not (sec["errors"] or sec["skipped"]):
      sec["status"] = "ok"
    elif sec["results"]:
      sec["status"] = "partial"
    elif sec["errors"]:
      sec["status"] = "error"
    else:
      sec["status"] = "skipped"


def _skip(sec: dict[str, Any], what: Any, reason: str) -> None:
  sec["skipped"].append({"what": what, "reason": reason})
  print(f"  skipped {what}: {reason}", flush=True)


def _release() -> None:
  """Drop what the previous piece left on the device (arrays, cached executables) before the next."""
  gc.collect()
  jax.clear_caches()


# ----------------------------------------------------------------------------------------------------
# (a) matmul peak
# ----------------------------------------------------------------------------------------------------


def matmul_rate(m: int, k: int, n: int, repeats: int, repeat_s: float) -> dict[str, Any]:
  """bf16 [m, k] x bf16 [k, n] -> float32 [m, n] (f32 accumulation): best and median TFLOP/s."""
  a = jax.random.normal(jax.random.PRNGKey(0), (m, k), jnp.float32).astype(jnp.bfloat16)  # [m, k]
  b = jax.random.normal(jax.random.PRNGKey(1), (k, n), jnp.float32).astype(jnp.bfloat16)  # [k, n]
  f = jax.jit(lambda x, y: jax.lax.dot_general(x, y, (((1,), (0,)), ((), ())),
                                               preferred_element_type=jnp.float32))  # [m, n] float32
  t0 = time.perf_counter()
  jax.block_until_ready(f(a, b))  # compile + first run
  compile_s = time.perf_counter() - t0
  one = min(bench_common.time_per_call(f, (a, b), warmup=1, repeats=2, calls=1))
  calls = int(min(200, max(1, math.ceil(repeat_s / max(one, 1e-6)))))
  per_call = bench_common.time_per_call(f, (a, b), warmup=1, repeats=repeats, calls=calls)
  flops = 2.0 * m * k * n
  best, median = min(per_call), float(np.median(per_call))
  return {"m": m, "k": k, "n": n, "dtype": "bfloat16", "accumulation": "float32", "flops": flops,
          "best_s": best, "median_s": median, "tflops": flops / best / 1e12, "median_tflops": flops / median / 1e12,
          "calls_per_repeat": calls, "repeats": repeats, "compile_s": compile_s}


def run_matmul(plan: Plan, budget: Budget, sec: dict[str, Any], save: Callable[[], None]) -> None:
  for (m, k, n) in plan.matmul_shapes:
    what = f"{m}x{k}x{n}"
    if not budget.fits(plan.min_piece_s["matmul"]):
      _skip(sec, what, f"time budget: {budget.remaining():.0f} s left in the section")
      continue
    try:
      r = matmul_rate(m, k, n, plan.matmul_repeats, plan.matmul_repeat_s)
      sec["results"].append(r)
      print(f"  matmul {what}: {r['tflops']:.1f} TFLOP/s best ({r['median_tflops']:.1f} median)", flush=True)
    except Exception as e:  # noqa: BLE001 -- recorded; the run goes on
      sec["errors"].append(error_record(e, what=what))
      print(f"  matmul {what}: ERROR {type(e).__name__}: {str(e)[:300]}", flush=True)
    _release()
    save()
  if sec["results"]:
    best = max(sec["results"], key=lambda r: r["tflops"])
    sec["peak_tflops"] = best["tflops"]
    sec["peak_shape"] = [best["m"], best["k"], best["n"]]


# ----------------------------------------------------------------------------------------------------
# (b) MoE layer per dispatch vs dense
# ----------------------------------------------------------------------------------------------------


def run_moe_layer(plan: Plan, budget: Budget, sec: dict[str, Any], save: Callable[[], None],
                  peak_tflops: float | None) -> None:
  spec = plan.layer
  sec["config"] = {**dataclasses.asdict(spec), "tokens": spec.tokens, "dense_d_ff": spec.k * spec.d_ff,
                   "dropless_impl_resolved": spec.resolved_dropless_impl(),
                   "fwd_bwd_model_flops": spec.fwd_bwd_flops()}
  flops = spec.fwd_bwd_flops()

  def rates(ms: float) -> dict[str, float | None]:
    tflops = flops / (ms / 1e3) / 1e12
    return {"model_tflops": tflops, "fraction_of_peak": tflops / peak_tflops if peak_tflops else None}

  x = spec.input()
  piece_s = plan.min_piece_s["moe_layer"]  # grows to the slowest piece seen so far
  try:
    t0 = time.perf_counter()
    ms, cpu_ms = time_dense(spec, plan.layer_warmup, plan.layer_iters, x=x)
    piece_s = max(piece_s, time.perf_counter() - t0)
    sec["dense"] = {"ms": ms, "cpu_ms": cpu_ms, "d_ff": spec.k * spec.d_ff, **rates(ms)}
    print(f"  dense MLP (d_ff {spec.k * spec.d_ff}): {ms:.3f} ms", flush=True)
  except Exception as e:  # noqa: BLE001
    sec["errors"].append(error_record(e, what="dense"))
    print(f"  dense MLP: ERROR {type(e).__name__}: {str(e)[:300]}", flush=True)
  save()
  dense_ms = sec.get("dense", {}).get("ms")

  for gs in plan.layer_group_sizes:
    s = dataclasses.replace(spec, group_size=gs)
    for disp in plan.layer_dispatches:
      what = {"group_size": gs, "dispatch": disp}
      if not budget.fits(piece_s * 1.2):
        _skip(sec, what, f"time budget: {budget.remaining():.0f} s left in the section, a piece took "
                         f"up to {piece_s:.0f} s")
        continue
      try:
        t0 = time.perf_counter()
        r = time_dispatch(s, disp, plan.layer_warmup, plan.layer_iters, x=x)
        piece_s = max(piece_s, time.perf_counter() - t0)
        row = {**what, "dropless_impl": s.resolved_dropless_impl() if disp in ("grouped", "dropless") else None,
               **r, "ratio_to_dense": r["ms"] / dense_ms if dense_ms else None, **rates(r["ms"])}
        sec["results"].append(row)
        ratio = f"{row['ratio_to_dense']:.2f}x dense" if dense_ms else "no dense baseline"
        print(f"  {disp} (group {gs}): {r['ms']:.3f} ms ({ratio}), dropped {r['fraction_dropped']:.3f}",
              flush=True)
      except Exception as e:  # noqa: BLE001
        sec["errors"].append(error_record(e, **what))
        print(f"  {disp} (group {gs}): ERROR {type(e).__name__}: {str(e)[:300]}", flush=True)
      _release()
      save()
  sec["ratio_to_dense"] = {f"{r['dispatch']}@{r['group_size']}": r["ratio_to_dense"] for r in sec["results"]}


# ----------------------------------------------------------------------------------------------------
# (c) st_moe_base train step
# ----------------------------------------------------------------------------------------------------


def _memory_record(compiled: Any) -> dict[str, Any] | None:
  """Compiled memory use: arguments + outputs - aliased (donated) + temporaries, in bytes."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 -- not every backend reports it
    return None
  if m is None:
    return None
  rec = {name: int(getattr(m, f"{name}_size_in_bytes", 0) or 0)
         for name in ("argument", "output", "alias", "temp", "generated_code")}
  rec["peak_estimate"] = rec["argument"] + rec["output"] - rec["alias"] + rec["temp"]
  return rec


def _train_attempt(tp: TrainPlan, dispatch: str, batch_size: int, budget: Budget,
                   peak_tflops: float | None) -> dict[str, Any]:
  """Build, compile (AOT, to read its memory first) and time the train step for one batch size.

  Raises MemoryError when the compiled step would not fit the device; other errors propagate.
  """
  from stmoe import partitioning
  from stmoe.models.api import make_model
  from stmoe.training import optimizers as opt_lib
  from stmoe.training import state as state_lib
  from stmoe.training import step as step_lib

  cfg = tp.model_config(dispatch)
  model = make_model(cfg)
  mesh = partitioning.make_mesh(devices=jax.devices()[:1])
  local = bench_common.synthetic_batch(batch_size, tp.inputs_length, tp.targets_length, tp.vocab_size)
  input_shapes = state_lib.input_shapes_from_batch(local)
  optimizer = opt_lib.adafactor()  # T5's Adafactor with rsqrt-with-warmup, as the trainer's default
  logical = model.params_logical_axes(input_shapes)
  abstract_params = jax.eval_shape(
      lambda: model.get_initial_variables(jax.random.PRNGKey(0), input_shapes, None)["params"])
  tx = opt_lib.make_optimizer(optimizer, logical, abstract_params)
  spec = state_lib.state_spec(model, tx, input_shapes, mesh, seed=0)
  rec: dict[str, Any] = {"dispatch": dispatch, "batch": batch_size}

  # Compile from the state's shapes first: a batch that does not fit costs no initialisation.
  train_fn = step_lib.make_train_step(model.loss_fn, tx, optimizer.schedule)
  with partitioning.mesh_context(mesh):
    batch = partitioning.make_global_batch(local, mesh)
    jitted = step_lib.jit_train_step(train_fn, spec.shardings, step_lib.batch_shardings(mesh, batch), mesh)
    t0 = time.perf_counter()
    compiled = jitted.lower(spec.abstract, batch).compile()
    rec["compile_s"] = time.perf_counter() - t0
  rec["memory_bytes"] = _memory_record(compiled)
  limit = _memory_limit()
  rec["device_memory_limit_bytes"] = limit
  if limit and rec["memory_bytes"] and rec["memory_bytes"]["peak_estimate"] > tp.memory_headroom * limit:
    raise MemoryError(f"batch {batch_size}: compiled step needs ~{rec['memory_bytes']['peak_estimate'] / 2**30:.1f} "
                      f"GiB, over {tp.memory_headroom:.0%} of the device's {limit / 2**30:.1f} GiB")

  t0 = time.perf_counter()
  state = state_lib.init_train_state(model, tx, spec, mesh, 0, input_shapes)
  jax.block_until_ready(state)
  rec["init_s"] = time.perf_counter() - t0
  rec["params"] = int(sum(np.prod(x.shape) for x in jax.tree.leaves(state["params"])))

  holder = {"state": state}
  losses: list[float] = []

  def run() -> None:
    holder["state"], metrics = compiled(holder["state"], batch)
    losses.append(float(jax.device_get(metrics["loss"])))  # a blocking fetch: the step has finished

  t0 = time.perf_counter()
  run()
  rec["first_step_s"] = time.perf_counter() - t0
  warm_s = []
  for _ in range(max(0, tp.warmup - 1)):
    t0 = time.perf_counter()
    run()
    warm_s.append(time.perf_counter() - t0)
  step_estimate = min(warm_s) if warm_s else rec["first_step_s"]
  iters = int(min(tp.iters, max(tp.min_iters, (budget.remaining() - 5.0) // max(step_estimate, 1e-6))))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  tokens = batch_size * (tp.inputs_length + tp.targets_length)
  flops = bench_common.model_flops(cfg, batch_size, tp.inputs_length, tp.targets_length)
  tflops = flops["train_flops"] / step_s / 1e12
  rec.update({
      "iters": iters, "step_s": step_s, "step_s_min": min(times), "step_s_max": max(times),
      "tokens_per_step": tokens, "tokens_per_s": tokens / step_s, "model_flops": flops,
      "model_tflops": tflops, "mfu": tflops / peak_tflops if peak_tflops else None,
      "loss_first": losses[0], "loss_last": losses[-1], "loss_finite": bool(np.all(np.isfinite(losses))),
  })
  try:
    stats = jax.devices()[0].memory_stats() or {}
    rec["device_peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
  except Exception:  # noqa: BLE001
    pass
  return rec


def _is_oom(e: BaseException) -> bool:
  text = f"{type(e).__name__} {e}"
  return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def run_train_step(plan: Plan, budget: Budget, sec: dict[str, Any], save: Callable[[], None],
                   peak_tflops: float | None) -> None:
  tp = plan.train
  sec["config"] = {**dataclasses.asdict(tp), "model": "st_moe_base" if plan.size == "full" else "st_moe tiny",
                   "optimizer": "adafactor (T5 defaults, rsqrt-with-warmup)", "peak_tflops": peak_tflops}
  sec["attempts"] = []
  piece_s = plan.min_piece_s["train_step"]
  fitted: int | None = None  # batch that fitted for the first dispatch; later dispatches start there
  for dispatch in tp.dispatches:
    outcomes: list[str] = []  # this dispatch's attempts: "ok" | "out_of_memory" | "error"
    candidates = [b for b in tp.batches if fitted is None or b <= fitted]
    for batch_size in candidates:
      what = {"dispatch": dispatch, "batch": batch_size}
      if not budget.fits(piece_s):
        _skip(sec, what, f"time budget: {budget.remaining():.0f} s left, a train-step attempt needs ~{piece_s:.0f} s")
        break
      t0 = time.perf_counter()
      try:
        rec = _train_attempt(tp, dispatch, batch_size, budget, peak_tflops)
        sec["results"].append(rec)
        outcomes.append("ok")
        sec["attempts"].append({**what, "outcome": "ok", "wall_s": time.perf_counter() - t0})
        fitted = batch_size if fitted is None else fitted
        mfu = f", MFU {rec['mfu']:.1%}" if rec["mfu"] is not None else ""
        print(f"  train step {dispatch} batch {batch_size}: {rec['step_s'] * 1e3:.1f} ms, "
              f"{rec['tokens_per_s']:.0f} tokens/s{mfu} (compile {rec['compile_s']:.0f} s)", flush=True)
      except Exception as e:  # noqa: BLE001 -- recorded; out of memory moves on to the next smaller batch
        outcome = "out_of_memory" if _is_oom(e) else "error"
        outcomes.append(outcome)
        sec["attempts"].append({**what, "outcome": outcome, "error": f"{type(e).__name__}: {str(e)[:500]}",
                                "wall_s": time.perf_counter() - t0})
        if outcome == "error":
          sec["errors"].append(error_record(e, **what))
        print(f"  train step {dispatch} batch {batch_size}: {outcome.upper()} {type(e).__name__}: "
              f"{str(e)[:300]}", flush=True)
      piece_s = max(piece_s, (time.perf_counter() - t0) * 1.1)
      _release()
      save()
      if outcomes[-1] != "out_of_memory":
        break
    if outcomes and all(o == "out_of_memory" for o in outcomes):
      _skip(sec, {"dispatch": dispatch}, f"none of the batches {candidates} fits the device")
  if sec["results"]:
    head = sec["results"][0]
    sec["headline"] = {k: head[k] for k in ("dispatch", "batch", "step_s", "tokens_per_s", "model_tflops", "mfu")}


# ----------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------


def _summary(result: dict[str, Any]) -> str:
  lines = [f"accelerator benchmark on {result['env']['device_kind']} ({result['env']['backend']}, "
           f"jax {result['env']['versions']['jax']}, size {result['env']['size']}): {result['wall_s']:.0f} s"]
  mm = result.get("matmul", {})
  if mm.get("peak_tflops"):
    lines.append(f"  bf16 matmul peak: {mm['peak_tflops']:.1f} TFLOP/s at {'x'.join(map(str, mm['peak_shape']))}")
  ml = result.get("moe_layer", {})
  if ml.get("dense"):
    lines.append(f"  dense MLP fwd+bwd: {ml['dense']['ms']:.3f} ms")
  for r in ml.get("results", []):
    ratio = f"{r['ratio_to_dense']:.2f}x dense" if r["ratio_to_dense"] else "-"
    lines.append(f"  {r['dispatch']:>8} @ group {r['group_size']}: {r['ms']:.3f} ms ({ratio}), "
                 f"dropped {r['fraction_dropped']:.3f}")
  for r in result.get("train_step", {}).get("results", []):
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
    lines.append(f"  train step ({r['dispatch']}, batch {r['batch']}): {r['step_s'] * 1e3:.1f} ms, "
                 f"{r['tokens_per_s']:.0f} tokens/s, MFU {mfu}")
  for name in SECTIONS:
    s = result.get(name, {})
    lines.append(f"  [{name}] {s.get('status')}: {len(s.get('errors', []))} errors, "
                 f"{len(s.get('skipped', []))} skipped")
  return "\n".join(lines)


def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(t) for t in text.split(",") if t.strip())


def _names(text: str) -> tuple[str, ...]:
  return tuple(t.strip() for t in text.split(",") if t.strip())


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog="benchmark.py accelerator", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--json", default=None, help="write the results here (rewritten after every measured piece)")
  p.add_argument("--size", default="auto", choices=["auto", "tiny", "full"],
                 help="auto: tiny on the CPU backend, full elsewhere")
  p.add_argument("--tiny", action="store_true", help="same as --size tiny (a seconds-long smoke run)")
  p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
  p.add_argument("--time_budget_s", type=float, default=None, help="whole-run budget (default: the size's)")
  p.add_argument("--layer_group_sizes", default=None, help="comma-separated routing group sizes for (b)")
  p.add_argument("--layer_dispatches", default=None, help="comma-separated dispatches for (b)")
  p.add_argument("--train_batches", default=None, help="comma-separated batch sizes to try for (c), largest first")
  p.add_argument("--train_dispatches", default=None, help="comma-separated dispatches for (c); the first is the "
                                                          "headline")
  args = p.parse_args(argv)

  size = "tiny" if args.tiny else args.size
  if size == "auto":
    size = "tiny" if jax.default_backend() == "cpu" else "full"
  plan = TINY if size == "tiny" else FULL
  changes: dict[str, Any] = {}
  if args.time_budget_s is not None:
    changes["time_budget_s"] = args.time_budget_s
  if args.layer_group_sizes:
    changes["layer_group_sizes"] = _ints(args.layer_group_sizes)
  if args.layer_dispatches:
    changes["layer_dispatches"] = _names(args.layer_dispatches)
  train_changes: dict[str, Any] = {}
  if args.train_batches:
    train_changes["batches"] = tuple(sorted(_ints(args.train_batches), reverse=True))
  if args.train_dispatches:
    train_changes["dispatches"] = _names(args.train_dispatches)
  if train_changes:
    changes["train"] = dataclasses.replace(plan.train, **train_changes)
  plan = dataclasses.replace(plan, **changes)
  sections = _names(args.sections)
  unknown = [s for s in sections if s not in SECTIONS]
  if unknown:
    p.error(f"unknown sections {unknown}; choose from {SECTIONS}")

  budget = Budget(plan.time_budget_s)
  result: dict[str, Any] = {"benchmark": "accelerator", "schema_version": SCHEMA_VERSION, "complete": False,
                            "env": _env(plan), "plan": _plan_record(plan), "wall_s": 0.0}
  for name in SECTIONS:
    result[name] = _new_section()

  def save() -> None:
    result["wall_s"] = budget.elapsed()
    if args.json:
      write_json_atomic(args.json, result)

  print(f"accelerator benchmark: {result['env']['device_kind']} ({result['env']['backend']}), size {size}, "
        f"budget {plan.time_budget_s:.0f} s", flush=True)
  save()
  runners = {
      "matmul": lambda b, s: run_matmul(plan, b, s, save),
      "moe_layer": lambda b, s: run_moe_layer(plan, b, s, save, result["matmul"].get("peak_tflops")),
      "train_step": lambda b, s: run_train_step(plan, b, s, save, result["matmul"].get("peak_tflops")),
  }
  for name in SECTIONS:
    sec = result[name]
    if name not in sections:
      sec["status"] = "skipped"
      sec["skipped"].append({"what": name, "reason": "not in --sections"})
      continue
    print(f"[{name}] {budget.remaining():.0f} s left", flush=True)
    t0 = time.perf_counter()
    sec["status"] = "running"
    try:
      runners[name](budget.section(plan.share[name] * plan.time_budget_s, plan.reserve[name] * plan.time_budget_s),
                    sec)
    except Exception as e:  # noqa: BLE001 -- a section's own failure must not end the run
      sec["errors"].append(error_record(e, what=name))
      print(f"[{name}] ERROR {type(e).__name__}: {str(e)[:500]}", flush=True)
    _finish_section(sec, t0)
    _release()
    save()

  # The GPU machines have no TensorFlow/seqio (and maybe no gin): record what this run pulled in.
  result["env"]["imported"] = {m: m in sys.modules for m in ("gin", "seqio", "tensorflow", "orbax", "torch")}
  result["env"]["versions"]["gin"] = _versions()["gin"]
  result["complete"] = True
  result["ok"] = not any(result[n]["errors"] for n in SECTIONS)  # skips (time, --sections) are not errors
  save()
  print(_summary(result), flush=True)
  return 0
