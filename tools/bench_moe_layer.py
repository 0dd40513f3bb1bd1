"""Time MoeLayer forward+backward per dispatch implementation against a FLOP-matched dense MLP.

`python tools/benchmark.py moe_layer --json OUT.json`. For each of einsum / sort / grouped / dropless and for
a dense MLP with d_ff_dense = k * d_ff_expert (same FLOPs per token as top-k routing without drops),
jit `jax.value_and_grad` of sum(y^2) w.r.t. the input and all parameters, warm up, then report the
median over `--iters` runs (block_until_ready). Writes config, times (ms), ratios to dense and the
fraction of (token, choice) assignments dropped per dispatch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp

from bench_common import mlp_flops_per_token, time_call_ms
from stmoe.config import MoeConfig
from stmoe.layers.matmul import linear
from stmoe.moe import MoeLayer
from stmoe.moe.dispatch import default_dropless_impl
from stmoe.moe.experts import ACTIVATIONS


class DenseMlp(nn.Module):
  """x @ wi_i -> act_i, multiplied together (GEGLU for ("gelu", "linear")) -> @ wo: the dense baseline.

  No biases, the same gated form as the experts (stmoe.moe.experts), so a dense MLP of d_ff = k x the
  expert d_ff does the same matmul FLOPs per token as top-k routing without drops.
  """

  d_ff: int
  activations: tuple[str, ...]
  dtype: jnp.dtype
  flatten: bool = False  # [batch*length, embed] 2-D matmuls instead of the model's [batch, length, embed]

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    if self.flatten:
      flat = self.__class__(self.d_ff, self.activations, self.dtype, name="flat")
      return flat(x.reshape(-1, d)).reshape(x.shape)
    names = ("wi",) if len(self.activations) == 1 else tuple(f"wi_{i}" for i in range(len(self.activations)))
    xc = x.astype(self.dtype)
    hidden = None
    for name, act in zip(names, self.activations):
      wi = self.param(name, nn.initializers.lecun_normal(), (d, self.d_ff), jnp.float32)
      # The model's products (stmoe.layers.matmul): the same bf16 fast path as the experts get.
      h = ACTIVATIONS[act](linear(xc, wi.astype(self.dtype)))  # [..., d_ff]
      hidden = h if hidden is None else hidden * h
    wo = self.param("wo", nn.initializers.lecun_normal(), (self.d_ff, d), jnp.float32)
    return linear(hidden, wo.astype(self.dtype))  # [..., d]


def fwd_bwd(apply, has_aux: bool = False):
  """jit of value_and_grad of sum(y^2) w.r.t. (params, x): one training-style forward + backward.

  With has_aux, `apply` returns (y, aux) and the jitted function returns ((loss, aux), grads).
  """
  def loss(params, x):
    y, aux = apply(params, x) if has_aux else (apply(params, x), None)
    value = jnp.sum(jnp.square(y.astype(jnp.float32)))
    return (value, aux) if has_aux else value
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=has_aux))


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """One MoE-layer benchmark setting: the input x [batch, length, d_model] and the layer's MoeConfig."""

  batch: int = 8
  length: int = 512
  d_model: int = 512
  d_ff: int = 1024  # expert hidden size; the dense baseline has k * d_ff
  experts: int = 8
  k: int = 2
  group_size: int = 512
  capacity_factor: float = 1.25
  capacity_convention: str = "stmoe"
  activations: tuple[str, ...] = ("relu",)
  dtype: str = "float32"
  dropless_impl: str | None = None  # None: MoeConfig's "auto" (blocked on CPU, ragged elsewhere)

  @property
  def tokens(self) -> int:
    return self.batch * self.length

  def moe_config(self, dispatch: str) -> MoeConfig:
    return MoeConfig(num_experts=self.experts, num_selected_experts=self.k, d_ff=self.d_ff,
                     activations=self.activations, group_size=self.group_size,
                     train_capacity_factor=self.capacity_factor, eval_capacity_factor=self.capacity_factor,
                     capacity_convention=self.capacity_convention, dispatch=dispatch,
                     dropless_impl=self.dropless_impl or "auto")

  def resolved_dropless_impl(self) -> str:
    return self.dropless_impl or default_dropless_impl()

  def input(self) -> jax.Array:
    """x [batch, length, d_model] ~ N(0, 1) in the activation dtype."""
    x = jax.random.normal(jax.random.PRNGKey(0), (self.batch, self.length, self.d_model), jnp.float32)
    return x.astype(self.dtype)

  def fwd_bwd_flops(self) -> float:
    """Matmul FLOPs of forward + backward of the dense baseline, = the experts' at k per token, no drops."""
    return 3.0 * self.tokens * mlp_flops_per_token(self.d_model, self.k * self.d_ff, self.activations)


def time_dense(spec: LayerSpec, warmup: int, iters: int, flatten: bool = False,
               x: jax.Array | None = None) -> tuple[float, float]:
  """(median wall ms, median CPU ms) of the FLOP-matched dense MLP's forward + backward."""
  x = spec.input() if x is None else x
  dense = DenseMlp(spec.k * spec.d_ff, spec.activations, jnp.dtype(spec.dtype), flatten=flatten)
  params = jax.jit(dense.init)(jax.random.PRNGKey(1), x)  # jitted: eager init compiles op by op
  return time_call_ms(fwd_bwd(dense.apply), (params, x), warmup, iters)


def time_dispatch(spec: LayerSpec, dispatch: str, warmup: int, iters: int,
                  x: jax.Array | None = None) -> dict[str, float]:
  """Forward + backward of MoeLayer with `dispatch`: {"ms", "cpu_ms", "fraction_dropped"}.

  Training mode (train capacity factor); no jitter / expert dropout / sampling is configured, so the
  "dropout" rng is drawn from by nothing and the run is deterministic.
  """
  x = spec.input() if x is None else x
  layer = MoeLayer(spec.moe_config(dispatch), dtype=jnp.dtype(spec.dtype))
  # Jitted: eager init would compile each of the router's and dispatch's ops separately (seconds on CPU).
  params = jax.jit(lambda rng, inp: layer.init({"params": rng}, inp, deterministic=True))(jax.random.PRNGKey(2), x)
  rngs = {"dropout": jax.random.PRNGKey(3)}

  def apply(p, inp):
    y, aux = layer.apply(p, inp, deterministic=False, rngs=rngs)
    return y, aux.expert_fractions  # [batch, length, embed], [experts]

  step = fwd_bwd(apply, has_aux=True)
  ms, cpu_ms = time_call_ms(step, (params, x), warmup, iters)
  (_, expert_fractions), _ = step(params, x)
  # Dropped assignments: 1 - kept / (k * tokens) == 1 - sum(expert_fractions) / k.
  dropped = float(1.0 - jnp.sum(expert_fractions) / spec.k)
  return {"ms": ms, "cpu_ms": cpu_ms, "fraction_dropped": dropped}


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
  p.add_argument("--activation", default="relu", help="comma-separated for gated MLPs: gelu,linear = GEGLU")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--dispatch", default="einsum,sort,grouped,dropless", help="comma-separated subset")
  p.add_argument("--dropless_impl", default=None, choices=[None, "blocked", "ragged"],
                 help="default: blocked on CPU, ragged elsewhere")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--json", default=None, help="write results here")
  args = p.parse_args(argv)

  spec = LayerSpec(batch=args.batch, length=args.length, d_model=args.d_model, d_ff=args.d_ff,
                   experts=args.experts, k=args.k, group_size=args.group_size,
                   capacity_factor=args.capacity_factor, capacity_convention=args.capacity_convention,
                   activations=tuple(a for a in args.activation.split(",") if a), dtype=args.dtype,
                   dropless_impl=args.dropless_impl)
  x = spec.input()
  results: dict = {"config": {**vars(args), "backend": jax.default_backend(),
                              "devices": len(jax.devices()), "jax": jax.__version__}}

  results["dense_ms"], results["dense_cpu_ms"] = time_dense(spec, args.warmup, args.iters, x=x)
  print(f"dense (d_ff={args.k * args.d_ff}): {results['dense_ms']:.2f} ms wall, "
        f"{results['dense_cpu_ms']:.2f} ms cpu", flush=True)
  results["dense_flat_ms"], results["dense_flat_cpu_ms"] = time_dense(spec, args.warmup, args.iters, flatten=True,
                                                                      x=x)
  print(f"dense flattened to 2-D: {results['dense_flat_ms']:.2f} ms wall, "
        f"{results['dense_flat_cpu_ms']:.2f} ms cpu", flush=True)

  for name in ("moe_ms", "moe_cpu_ms", "ratio_to_dense", "cpu_ratio_to_dense", "fraction_dropped"):
    results[name] = {}
  for disp in [d for d in args.dispatch.split(",") if d]:
    r = time_dispatch(spec, disp, args.warmup, args.iters, x=x)
    ms, cpu_ms, dropped = r["ms"], r["cpu_ms"], r["fraction_dropped"]
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
