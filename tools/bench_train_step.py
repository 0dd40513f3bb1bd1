"""Training-step throughput and model FLOPs utilisation, against HF SwitchTransformers (torch) as a peer.

`python tools/benchmark.py train_step --json OUT.json`

Model (both sides): Switch encoder-decoder, vocab 8000, d_model 256, 8 heads x 32, d_ff 1024, 4+4 layers,
8 ReLU experts (d_ff 1024) on every other layer (HF placement: layer i sparse iff i % 2 == 1), top-1,
no dropout, no router jitter. Batch 16 x (256 inputs + 64 targets), AdamW (lr 1e-4).
Capacity: HF Switch gives each expert 64 slots per sequence; ours uses groups of 256 tokens with capacity
factor 2.0, i.e. 64 slots per expert per group (identical for the 256-token encoder sequences).

* ours: stmoe's jitted train step (stmoe.training.step.make_train_step, the trainer's step) on one CPU
  device (all cores), float32 parameters, once per activation dtype in --dtypes (default: bfloat16 and
  float32; bfloat16 activations multiply in bf16 with float32 accumulation, see stmoe/layers/matmul.py);
* peer: transformers.SwitchTransformersForConditionalGeneration, torch eager, float32, loss.backward() +
  torch.optim.AdamW.step(), in the same process after ours;
* peak: median time of a jitted 2048^3 matmul (2 * 2048^3 FLOPs), float32 and bf16-in/f32-accumulate.

tokens/s counts input + target tokens (16 * 320 = 5120 per step). Model FLOPs are counted exactly from the
matmuls of the architecture (see `model_flops`): 3x the forward matmul FLOPs (forward + two backward
matmuls per forward matmul), including attention scores and values, the router, the experts at one expert
per token (padding slots in capacity buffers are NOT counted, as MFU conventions require) and the output
projection. MFU = model FLOPs per step / step time / peak of the dtype the step multiplies in (the bf16
peak for bfloat16 activations: about twice the float32 one on CPUs with AVX512-BF16), so a bf16 step
cannot look better than it is; `mfu_vs_float32_peak` is given beside it.

Wall-clock medians are reported with the process CPU time beside them, because the benchmark machine may
be shared with other jobs (CPU time is not inflated by them, wall time is).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

import bench_common
from bench_common import median_times

CONFIG = dict(vocab_size=8000, d_model=256, num_heads=8, d_kv=32, d_ff=1024, num_encoder_layers=4,
              num_decoder_layers=4, num_experts=8, expert_d_ff=1024, sparse_every=2, top_k=1, batch=16,
              inputs_length=256, targets_length=64, optimizer="adamw", learning_rate=1e-4)

# A seconds-long smoke configuration (tests/test_benchmarks.py): same code paths, tiny sizes.
TINY_CONFIG = dict(CONFIG, vocab_size=256, d_model=32, num_heads=2, d_kv=8, d_ff=64, num_encoder_layers=2,
                   num_decoder_layers=2, num_experts=4, expert_d_ff=64, batch=2, inputs_length=32,
                   targets_length=16)


def model_config(c: dict, dispatch: str = "sort", dtype: str = "float32"):
  """The stmoe ModelConfig of the benchmark model described by `c` (CONFIG or TINY_CONFIG)."""
  from stmoe.config import ModelConfig, MoeConfig, SparseLayout

  moe = MoeConfig(num_experts=c["num_experts"], num_selected_experts=c["top_k"], d_ff=c["expert_d_ff"],
                  group_size=c["inputs_length"], train_capacity_factor=2.0, eval_capacity_factor=2.0,
                  activations=("relu",), dispatch=dispatch, aux_loss_coef=1e-3, router_z_loss_coef=1e-3)
  layout = SparseLayout(kind="hf_switch", every=c["sparse_every"])
  return ModelConfig(vocab_size=c["vocab_size"], d_model=c["d_model"], num_heads=c["num_heads"], d_kv=c["d_kv"],
                     d_ff=c["d_ff"], num_encoder_layers=c["num_encoder_layers"],
                     num_decoder_layers=c["num_decoder_layers"], activations=("relu",), moe=moe,
                     encoder_sparse=layout, decoder_sparse=layout, z_loss=0.0, dtype=dtype)


def model_flops(c: dict) -> dict[str, float]:
  """Exact matmul FLOPs of one training step (3 x forward) of the benchmark model (see bench_common)."""
  return bench_common.model_flops(model_config(c), c["batch"], c["inputs_length"], c["targets_length"])


def peak_gflops(dtype: str = "float32", iters: int = 10, n: int = 2048) -> tuple[float, float]:
  """(wall GFLOP/s, GFLOP per process-CPU-second) of a jitted n^3 matmul in `dtype` (f32 accumulation)."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype)
  f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  wall, cpu = median_times(lambda: f(a, b).block_until_ready(), 3, iters)
  return 2 * n ** 3 / wall / 1e9, 2 * n ** 3 / cpu / 1e9


def _batch(c: dict, seed: int = 0) -> dict[str, np.ndarray]:
  return bench_common.synthetic_batch(c["batch"], c["inputs_length"], c["targets_length"], c["vocab_size"], seed)


def ours(c: dict, warmup: int, iters: int, dispatch: str, dtype: str = "float32") -> dict:
  import jax

  from stmoe.models.api import make_model
  from stmoe.training import optimizers, step as step_lib
  from stmoe.training.trainer import input_shapes_for

  cfg = model_config(c, dispatch, dtype)
  model = make_model(cfg)
  shapes = input_shapes_for("encoder_decoder", c["batch"], {"inputs": c["inputs_length"],
                                                              "targets": c["targets_length"]})
  params = model.get_initial_variables(jax.random.PRNGKey(0), shapes)["params"]
  opt = optimizers.adamw(c["learning_rate"])
  tx = optimizers.make_optimizer(opt, model.params_logical_axes(shapes), params)
  state = {"step": jax.numpy.int32(0), "params": params, "opt_state": tx.init(params), "rng": jax.random.PRNGKey(1)}
  step = jax.jit(step_lib.make_train_step(model.loss_fn, tx, opt.schedule), donate_argnums=(0,))
  batch = {k: jax.numpy.asarray(v) for k, v in _batch(c).items()}
  holder = {"state": state}

  def run():
    holder["state"], metrics = step(holder["state"], batch)
    jax.block_until_ready(metrics["loss"])

  t0 = time.perf_counter()
  run()
  compile_s = time.perf_counter() - t0
  wall, cpu = median_times(run, warmup, iters)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  return {"step_s": wall, "step_cpu_s": cpu, "compile_s": compile_s, "params": n_params}


def peer(c: dict, warmup: int, iters: int) -> dict:
  os.environ.setdefault("USE_TF", "0")  # transformers must not import TensorFlow here
  import torch
  from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  hf = SwitchTransformersConfig(
      vocab_size=c["vocab_size"], d_model=c["d_model"], d_kv=c["d_kv"], d_ff=c["d_ff"],
      expert_capacity=int(2.0 * c["inputs_length"] / c["num_experts"]),  # = ours: cf 2.0 x group of inputs_length
      num_layers=c["num_encoder_layers"], num_sparse_encoder_layers=c["num_encoder_layers"] // c["sparse_every"],
      num_decoder_layers=c["num_decoder_layers"],
      num_sparse_decoder_layers=c["num_decoder_layers"] // c["sparse_every"], num_heads=c["num_heads"],
      num_experts=c["num_experts"], router_jitter_noise=0.0, dropout_rate=0.0, router_z_loss_coef=1e-3,
      router_aux_loss_coef=1e-3, dense_act_fn="relu", use_cache=False, decoder_start_token_id=0,
      tie_word_embeddings=False)  # ours has a separate logits projection too (same parameter count)
  model = SwitchTransformersForConditionalGeneration(hf)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=c["learning_rate"])
  b = _batch(c)
  input_ids = torch.as_tensor(b["encoder_input_tokens"], dtype=torch.long)
  labels = torch.as_tensor(b["decoder_target_tokens"], dtype=torch.long)

  def run():
    opt.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, labels=labels, output_router_logits=True)
    out.loss.backward()
    opt.step()

  wall, cpu = median_times(run, warmup, iters)
  return {"step_s": wall, "step_cpu_s": cpu, "params": sum(p.numel() for p in model.parameters())}


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog="benchmark.py train_step", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--json", default=None, help="write the results here")
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--dispatch", default="sort", help="MoE dispatch of our model: sort | einsum | dropless")
  p.add_argument("--dtypes", default="bfloat16,float32",
                 help="our activation dtypes, comma-separated; the first is the headline (ours_*, mfu)")
  p.add_argument("--no_peer", action="store_true", help="skip the torch peer")
  p.add_argument("--tiny", action="store_true", help="a seconds-long smoke configuration, not a benchmark")
  args = p.parse_args(argv)

  c = dict(TINY_CONFIG if args.tiny else CONFIG)
  tokens = c["batch"] * (c["inputs_length"] + c["targets_length"])
  flops = model_flops(c)
  dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
  peak_args = {"n": 512, "iters": 3} if args.tiny else {}  # --tiny: a smoke run, not a measurement
  peaks = {d: peak_gflops(d, **peak_args) for d in sorted(set(dtypes) | {"float32"})}
  runs = {}
  for d in dtypes:
    r = ours(c, args.warmup, args.iters, args.dispatch, d)
    r["tokens_per_s"] = tokens / r["step_s"]
    runs[d] = r
    print(f"ours ({d}): {r['tokens_per_s']:.0f} tokens/s (step {r['step_s']:.3f} s, cpu {r['step_cpu_s']:.3f} s)",
          flush=True)
  peer_r = None if args.no_peer else peer(c, args.warmup, args.iters)
  for d in peaks:  # the peak again after the runs: the larger one is the machine's, less any load
    again = peak_gflops(d, **peak_args)
    peaks[d] = (max(peaks[d][0], again[0]), max(peaks[d][1], again[1]))
  mfu = lambda step_s, d: flops["train_flops"] / step_s / (peaks[d][0] * 1e9)
  head = dtypes[0]
  result = {
      "config": {**c, "dispatch": args.dispatch, "dtype": head, "tokens_per_step": tokens, "device": "cpu",
                 "cpu_count": os.cpu_count(), "iters": args.iters},
      "peak_gflops": peaks[head][0],
      "peak_gflops_float32": peaks["float32"][0],
      "model_flops": flops,
      "ours_step_s": runs[head]["step_s"],
      "ours_step_cpu_s": runs[head]["step_cpu_s"],
      "ours_compile_s": runs[head]["compile_s"],
      "ours_params": runs[head]["params"],
      "ours_tokens_per_s": runs[head]["tokens_per_s"],
      "mfu": mfu(runs[head]["step_s"], head),
      "mfu_vs_float32_peak": mfu(runs[head]["step_s"], "float32"),
      # Load-independent view for a shared machine: FLOPs per CPU-second of the step vs of the matmul.
      "mfu_cpu_time": flops["train_flops"] / runs[head]["step_cpu_s"] / (peaks[head][1] * 1e9),
      "ours_by_dtype": {d: {"tokens_per_s": r["tokens_per_s"], "step_s": r["step_s"], "step_cpu_s": r["step_cpu_s"],
                            "mfu": mfu(r["step_s"], d), "peak_gflops": peaks[d][0]} for d, r in runs.items()},
  }
  if peer_r is not None:
    result.update({
        "peer": "transformers.SwitchTransformersForConditionalGeneration (torch eager, float32, AdamW)",
        "peer_step_s": peer_r["step_s"], "peer_step_cpu_s": peer_r["step_cpu_s"], "peer_params": peer_r["params"],
        "peer_tokens_per_s": tokens / peer_r["step_s"],
        "peer_mfu": mfu(peer_r["step_s"], "float32"),
        "speedup_vs_peer": peer_r["step_s"] / runs[head]["step_s"],
        "speedup_vs_peer_cpu_time": peer_r["step_cpu_s"] / runs[head]["step_cpu_s"],
    })
    for d, r in runs.items():
      result["ours_by_dtype"][d]["speedup_vs_peer"] = peer_r["step_s"] / r["step_s"]
  text = json.dumps(result, indent=1)
  print(text)
  if args.json:
    with open(args.json, "w") as f:
      f.write(text + "\n")
  return 0


if __name__ == "__main__":
  import sys

  sys.exit(main(sys.argv[1:]))
