"""Time MoeLayer forward+backward per dispatch implementation against a FLOP-matched dense MLP.

`python tools/benchmark.py moe_layer --json OUT.json`. For each of einsum / sort / grouped / dropless and for
a dense MLP with d_ff_dense = k * d_ff_expert (same FLOPs per token as top-k routing without drops),
jit `jax.value_and_grad` of sum(y^2) w.r.t. the input and all parameters, warm up, then report the
median over `--iters` runs (block_until_ready). Writes config, times (ms), ratios to dense and the
fraction of (token, choice) assignments dropped per dispatch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from stmoe.config import MoeConfig
from stmoe.layers.matmul import linear
from stmoe.moe import MoeLayer
from stmoe.moe.experts import ACTIVATIONS


class DenseMlp(nn.Module):
  """x @ wi -> act -> @ wo, the dense baseline (no biases, like the experts)."""

  d_ff: int
  activation: str
  dtype: jnp.dtype
  flatten: bool = False  # [batch*length, embed] 2-D matmuls instead of the model's [batch, length, embed]

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    if self.flatten:
      return self.__class__(self.d_ff, self.activation, self.dtype, name="flat")(x.reshape(-1, d)).reshape(x.shape)
    wi = self.param("wi", nn.initializers.lecun_normal(), (d, self.d_ff), jnp.float32)
    wo = self.param("wo", nn.initializers.lecun_normal(), (self.d_ff, d), jnp.float32)
    # The model's products (stmoe.layers.matmul): the same bf16 fast path as the experts get.
    h = ACTIVATIONS[self.activation](linear(x.astype(self.dtype), wi.astype(self.dtype)))
    return linear(h, wo.astype(self.dtype))


def _time(fn, args, warmup: int, iters: int) -> tuple[float, float]:
  """(median wall ms, median process-CPU ms) over `iters` runs after `warmup` runs.

  CPU time (all threads of this process) is reported beside wall time because the benchmark machine
  may be shared: other processes inflate wall time but not the CPU time this computation consumed.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  wall, cpu = [], []
  for _ in range(iters):
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    wall.append((time.perf_counter() - t0) * 1e3)
    cpu.append((time.process_time() - c0) * 1e3)
  return statistics.median(wall), statistics.median(cpu)


def _fwd_bwd(apply):
  def loss(params, x):
    y = apply(params, x)
    return jnp.sum(jnp.square(y.astype(jnp.float32)))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog="benchmark.py moe_layer", description=__doc__)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--length", type=int, default=512)
  p.add_argument("--d_model", type=int, default=512)
  p.add_argument("--d_ff", type=int, default=1024, help="expert hidden size")
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--k", type=int, default=2)
  p.add_argument("--group_size", type=int, default=512)
  p.add_argument("--capacity_factor", type=float, default=1.25)
  p.add_argument("--capacity_convention", default="stmoe", choices=["stmoe", "gshard"])
  p.add_argument("--activation", default="relu")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--dispatch", default="einsum,sort,grouped,dropless", help="comma-separated subset")
  p.add_argument("--dropless_impl", default=None, choices=[None, "blocked", "ragged"],
                 help="default: blocked on CPU, ragged elsewhere")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--json", default=None, help="write results here")
  args = p.parse_args(argv)

  dtype = jnp.dtype(args.dtype)
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (args.batch, args.length, args.d_model), jnp.float32).astype(dtype)
  results: dict = {"config": {**vars(args), "backend": jax.default_backend(),
                              "devices": len(jax.devices()), "jax": jax.__version__}}

  dense = DenseMlp(args.k * args.d_ff, args.activation, dtype)
  dparams = dense.init(jax.random.PRNGKey(1), x)
  results["dense_ms"], results["dense_cpu_ms"] = _time(_fwd_bwd(dense.apply), (dparams, x), args.warmup, args.iters)
  print(f"dense (d_ff={args.k * args.d_ff}): {results['dense_ms']:.2f} ms wall, "
        f"{results['dense_cpu_ms']:.2f} ms cpu", flush=True)

  flat = DenseMlp(args.k * args.d_ff, args.activation, dtype, flatten=True)
  fparams = flat.init(jax.random.PRNGKey(1), x)
  results["dense_flat_ms"], results["dense_flat_cpu_ms"] = _time(_fwd_bwd(flat.apply), (fparams, x), args.warmup,
                                                                 args.iters)
  print(f"dense flattened to 2-D: {results['dense_flat_ms']:.2f} ms wall, "
        f"{results['dense_flat_cpu_ms']:.2f} ms cpu", flush=True)

  for name in ("moe_ms", "moe_cpu_ms", "ratio_to_dense", "cpu_ratio_to_dense", "fraction_dropped"):
    results[name] = {}
  for disp in [d for d in args.dispatch.split(",") if d]:
    cfg = MoeConfig(num_experts=args.experts, num_selected_experts=args.k, d_ff=args.d_ff,
                    activations=(args.activation,), group_size=args.group_size,
                    train_capacity_factor=args.capacity_factor, eval_capacity_factor=args.capacity_factor,
                    capacity_convention=args.capacity_convention,
                    dispatch=disp, dropless_impl=args.dropless_impl or "auto")
    layer = MoeLayer(cfg, dtype=dtype)
    params = layer.init({"params": jax.random.PRNGKey(2)}, x, deterministic=True)

    # Training mode (train capacity factor); no jitter / expert dropout / sampling is configured, so the
    # "dropout" rng is drawn from by nothing and the run is deterministic.
    rngs = {"dropout": jax.random.PRNGKey(3)}

    def apply(p, inp, layer=layer, rngs=rngs):
      return layer.apply(p, inp, deterministic=False, rngs=rngs)[0]

    ms, cpu_ms = _time(_fwd_bwd(apply), (params, x), args.warmup, args.iters)
    _, aux = jax.jit(lambda p, inp, layer=layer: layer.apply(p, inp, deterministic=False, rngs=rngs))(params, x)
    # Dropped assignments: 1 - kept / (k * tokens) == 1 - sum(expert_fractions) / k.
    dropped = float(1.0 - jnp.sum(aux.expert_fractions) / args.k)
    results["moe_ms"][disp] = ms
    results["ratio_to_dense"][disp] = ms / results["dense_ms"]
    results["fraction_dropped"][disp] = dropped
    results["moe_cpu_ms"][disp] = cpu_ms
    results["cpu_ratio_to_dense"][disp] = cpu_ms / results["dense_cpu_ms"]
    print(f"{disp}: {ms:.2f} ms wall ({ms / results['dense_ms']:.2f}x dense), {cpu_ms:.2f} ms cpu "
          f"({cpu_ms / results['dense_cpu_ms']:.2f}x), dropped {dropped:.4f}", flush=True)

  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)
  return 0
