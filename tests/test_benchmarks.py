"""tools/benchmark.py's JSON contract, on the seconds-long --tiny configuration (not a performance test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_train_step_benchmark_json(tmp_path):
  out = tmp_path / "train_step.json"
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "train_step", "--tiny",
                         "--iters", "1", "--warmup", "1", "--json", str(out)],
                        capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(out.read_text())
  for key in ("ours_tokens_per_s", "peer_tokens_per_s", "mfu", "peak_gflops", "config", "speedup_vs_peer"):
    assert key in r, key
  assert r["config"]["dtype"] == "bfloat16" and set(r["ours_by_dtype"]) == {"bfloat16", "float32"}
  assert r["ours_tokens_per_s"] > 0 and r["peer_tokens_per_s"] > 0 and 0 < r["mfu"] < 1.5
  # The same model on both sides: identical parameter counts (both untie the output projection).
  assert r["ours_params"] == r["peer_params"]


def test_accelerator_benchmark_json_tiny_without_gin(tmp_path):
  """`accelerator --tiny` on CPU, as the GPU machine would run it: gin-config hidden behind tools/gin_shim.

  Checks the JSON contract a GPU run's consumers rely on: environment, every section's status, positive
  rates and times, ratio fields consistent with the times, and no TensorFlow/seqio imported.
  """
  out = tmp_path / "accelerator.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         # Halves XLA:CPU compile time, which is most of a tiny run; the numbers are not looked at here.
         "XLA_FLAGS": "--xla_backend_optimization_level=0",
         "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "tools", "gin_shim"), ROOT])}
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "accelerator", "--tiny",
                         "--json", str(out)], capture_output=True, text=True, timeout=300, env=env)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  r = json.loads(out.read_text())
  assert r["benchmark"] == "accelerator" and r["complete"] and r["ok"], proc.stdout[-3000:]
  e = r["env"]
  assert e["backend"] == "cpu" and e["device_kind"] and e["size"] == "tiny" and e["versions"]["jax"]
  assert e["versions"]["gin"].startswith("shim")
  assert not e["imported"]["seqio"] and not e["imported"]["tensorflow"]
  for name in ("matmul", "moe_layer", "train_step"):
    assert r[name]["status"] == "ok" and r[name]["errors"] == [] and r[name]["wall_s"] > 0, (name, r[name])

  mm = r["matmul"]
  assert len(mm["results"]) == len(r["plan"]["matmul_shapes"])
  assert all(x["tflops"] > 0 and x["best_s"] > 0 and x["accumulation"] == "float32" for x in mm["results"])
  assert mm["peak_tflops"] == max(x["tflops"] for x in mm["results"])

  ml = r["moe_layer"]
  dense_ms = ml["dense"]["ms"]
  assert dense_ms > 0 and ml["dense"]["d_ff"] == 2 * ml["config"]["d_ff"]
  assert {x["dispatch"] for x in ml["results"]} == {"einsum", "sort", "grouped", "dropless"}
  for x in ml["results"]:
    assert x["ms"] > 0 and x["model_tflops"] > 0 and 0 <= x["fraction_dropped"] < 1
    assert abs(x["ratio_to_dense"] - x["ms"] / dense_ms) < 1e-9
    assert ml["ratio_to_dense"][f"{x['dispatch']}@{x['group_size']}"] == x["ratio_to_dense"]
  assert next(x for x in ml["results"] if x["dispatch"] == "dropless")["fraction_dropped"] == 0

  ts = r["train_step"]
  head = ts["headline"]
  assert head["step_s"] > 0 and head["tokens_per_s"] > 0 and 0 < head["mfu"] < 1.5
  step = ts["results"][0]
  assert step["loss_finite"] and step["params"] > 0 and step["model_flops"]["train_flops"] > 0
  assert abs(step["tokens_per_s"] - step["tokens_per_step"] / step["step_s"]) < 1e-6 * step["tokens_per_s"]


def test_accelerator_train_model_is_st_moe_base():
  """The benchmark's Python-built model (no gin on the GPU machine) is gin/models/st_moe_base.gin's."""
  sys.path.insert(0, os.path.join(ROOT, "tools"))
  try:
    import bench_accelerator
  finally:
    sys.path.remove(os.path.join(ROOT, "tools"))
  from stmoe import gin_utils

  gin_utils.parse_gin(["models/st_moe_base.gin"], [])
  from_gin = gin_utils.configured_model().config
  ours = bench_accelerator.FULL.train.model_config(from_gin.moe.dispatch)
  assert ours.replace(dtype=from_gin.dtype) == from_gin
