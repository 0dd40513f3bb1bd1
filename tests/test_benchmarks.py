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
