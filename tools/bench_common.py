"""Helpers shared by the benchmark subcommands of tools/benchmark.py.

Timing (wall and process-CPU medians, per-call device times), synthetic token batches, the exact matmul
FLOP count of a model's training step, a wall-clock budget for long runs, and JSON written atomically.
Nothing here imports gin, seqio or TensorFlow; jax is imported only where it is needed.
"""

from __future__ import annotations

import json
import os
import statistics
import time
import traceback
from typing import Any, Callable

import numpy as np


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------


def median_times(run: Callable[[], Any], warmup: int, iters: int) -> tuple[float, float]:
  """(median wall seconds, median process-CPU seconds) of `run()` over `iters` calls after `warmup` calls.

  `run` must block until its work is done (e.g. end in `jax.block_until_ready`). CPU time (all threads
  of this process) is reported beside wall time because benchmark machines may be shared: other
  processes inflate wall time but not the CPU time this computation consumed.
  """
  for _ in range(warmup):
    run()
  wall, cpu = [], []
  for _ in range(iters):
    t0, c0 = time.perf_counter(), time.process_time()
    run()
    wall.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return statistics.median(wall), statistics.median(cpu)


def time_call_ms(fn: Callable, args: tuple, warmup: int, iters: int) -> tuple[float, float]:
  """(median wall ms, median process-CPU ms) of the blocking call `fn(*args)` (see :func:`median_times`)."""
  import jax

  wall, cpu = median_times(lambda: jax.block_until_ready(fn(*args)), warmup, iters)
  return wall * 1e3, cpu * 1e3


def time_per_call(fn: Callable, args: tuple, *, warmup: int, repeats: int, calls: int) -> list[float]:
  """Seconds per call of `fn(*args)`, one entry per repeat, each repeat `calls` calls back to back.

  The calls of one repeat are dispatched without waiting for each other and only the last result is
  waited for, so on an accelerator the device runs them back to back and host dispatch and
  synchronisation overheads stay out of the number (they would be a sizeable share of a sub-millisecond
  kernel). Each call's inputs are the same arrays; results are dropped as soon as the next call starts.
  """
  import jax

  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    result = None
    for _ in range(calls):
      result = fn(*args)
    jax.block_until_ready(result)
    out.append((time.perf_counter() - t0) / calls)
  return out


# ----------------------------------------------------------------------------------------------------
# Budget and results
# ----------------------------------------------------------------------------------------------------


class Budget:
  """A wall-clock deadline for a whole run, from which sections draw their own shorter deadlines.

  Work that has started cannot be interrupted (an XLA compile, say), so the guard is checked *before*
  each piece of work: `fits(estimate_s)` says whether that much time is left before the deadline.
  """

  def __init__(self, total_s: float):
    self.start = time.monotonic()
    self.total_s = float(total_s)
    self.deadline = self.start + self.total_s

  def elapsed(self) -> float:
    return time.monotonic() - self.start

  def remaining(self) -> float:
    return self.deadline - time.monotonic()

  def section(self, share_s: float, reserve_s: float = 0.0) -> "Budget":
    """A sub-budget of at most `share_s` seconds that leaves `reserve_s` seconds for later sections."""
    sub = Budget(0.0)
    sub.deadline = min(time.monotonic() + share_s, self.deadline - reserve_s)
    sub.total_s = max(0.0, sub.deadline - sub.start)
    return sub

  def fits(self, estimate_s: float) -> bool:
    return self.remaining() >= estimate_s


def error_record(exc: BaseException, **context: Any) -> dict[str, Any]:
  """A JSON-able description of a failure: type, message, the last lines of the traceback, context."""
  tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
  return {**context, "error": f"{type(exc).__name__}: {str(exc)[:2000]}", "traceback_tail": tb[-3000:]}


def write_json_atomic(path: str, data: Any) -> None:
  """Write `data` as indented JSON to `path` via a temporary file and a rename.

  A reader (or a run killed by `timeout` mid-write) never sees a half-written file: long benchmarks
  call this after every finished piece so that what was measured survives a later crash or kill.
  """
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=1, default=_json_default)
    f.write("\n")
  os.replace(tmp, path)


def _json_default(x: Any) -> Any:
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


# ----------------------------------------------------------------------------------------------------
# Synthetic data and FLOP counts
# ----------------------------------------------------------------------------------------------------


def synthetic_batch(batch: int, inputs_length: int, targets_length: int, vocab_size: int,
                    seed: int = 0) -> dict[str, np.ndarray]:
  """Uniformly random encoder-decoder batch in the t5x feature convention (no padding, ids >= 2).

  Decoder inputs are the targets shifted right behind the start token 0, as the data pipeline makes them.
  """
  rng = np.random.default_rng(seed)
  inputs = rng.integers(2, vocab_size, size=(batch, inputs_length)).astype(np.int32)  # [batch, inputs]
  targets = rng.integers(2, vocab_size, size=(batch, targets_length)).astype(np.int32)  # [batch, targets]
  dec_in = np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1)  # [batch, targets]
  return {"encoder_input_tokens": inputs, "decoder_input_tokens": dec_in, "decoder_target_tokens": targets,
          "decoder_loss_weights": np.ones_like(targets)}


def mlp_flops_per_token(d_model: int, d_ff: int, activations: tuple[str, ...]) -> int:
  """Forward matmul FLOPs of one (gated) MLP per token: one input projection per activation, one output."""
  return 2 * d_model * d_ff * (len(activations) + 1)


def model_flops(cfg: Any, batch: int, inputs_length: int, targets_length: int) -> dict[str, float]:
  """Exact matmul FLOPs of one training step (3 x forward) of an encoder-decoder stmoe ModelConfig.

  Forward FLOPs per token: q, k, v, o projections, attention scores and values over every key position
  (masked positions are computed too), cross-attention (k, v of the encoder output once per decoder
  layer), dense MLPs, and in sparse layers the router plus k expert MLPs per token (token-choice
  routing without drops: capacity padding is NOT counted, as MFU conventions require) and the
  optional extra dense MLP; then the output projection. Backward = 2 x forward (two products per
  forward product). Layer placement comes from the config's sparse layouts.
  """
  if getattr(cfg, "decoder_only", False):
    raise ValueError("model_flops counts encoder-decoder models only.")
  d = cfg.d_model
  hd = cfg.num_heads * cfg.d_kv
  enc_tokens, dec_tokens = batch * inputs_length, batch * targets_length
  dense_mlp = mlp_flops_per_token(d, cfg.d_ff, tuple(cfg.activations))
  moe = cfg.moe
  if moe is not None:
    sparse_mlp = (2 * d * moe.num_experts
                  + moe.num_selected_experts * mlp_flops_per_token(d, moe.d_ff, tuple(moe.activations))
                  + (dense_mlp if moe.extra_dense_mlp else 0))
  else:
    sparse_mlp = 0
  n_enc, n_dec = cfg.num_encoder_layers, cfg.num_decoder_layers
  sp_enc = len(cfg.encoder_sparse.sparse_indices(n_enc)) if moe is not None else 0
  sp_dec = len(cfg.decoder_sparse.sparse_indices(n_dec)) if moe is not None else 0

  enc_attn = 4 * 2 * d * hd + 2 * 2 * inputs_length * hd  # q, k, v, o projections + scores + values
  fwd = enc_tokens * (n_enc * enc_attn + (n_enc - sp_enc) * dense_mlp + sp_enc * sparse_mlp)
  dec_self = 4 * 2 * d * hd + 2 * 2 * targets_length * hd
  dec_cross = 2 * 2 * d * hd + 2 * 2 * inputs_length * hd  # q and o projections + scores + values
  fwd += dec_tokens * (n_dec * (dec_self + dec_cross) + (n_dec - sp_dec) * dense_mlp + sp_dec * sparse_mlp)
  fwd += n_dec * enc_tokens * 2 * 2 * d * hd  # cross-attention k, v of the encoder output, per decoder layer
  fwd += dec_tokens * 2 * d * cfg.vocab_size  # output projection
  return {"forward_flops": float(fwd), "train_flops": float(3 * fwd),
          "train_flops_per_token": float(3 * fwd) / (enc_tokens + dec_tokens)}
