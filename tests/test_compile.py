"""`stmoe compile`: the real train step compiled ahead of time for a TPU topology described by libtpu.

Needs libtpu (the `tpu` extra, which CI installs); nothing runs on a TPU: XLA compiles for TPU v5p / v5e
chips on this CPU host. One compile of a tiny sparse model with expert partitions checks the JSON contract,
the all-to-alls of expert parallelism, that no expert parameter is all-gathered, and memory numbers that
agree with the parameter count; a second, with a deliberately oversized batch, checks the does-not-fit exit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from stmoe import cli
from stmoe.training import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--gin_file", "models/st_moe_tiny.gin", "--gin.NUM_EXPERT_PARTITIONS=4", "--gin.BATCH_SIZE=32",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 32}"]


@pytest.fixture(autouse=True)
def _clean_gin():
  yield
  import gin

  gin.clear_config()


@pytest.mark.slow
def test_tiny_sparse_model_compiles_for_a_tpu_pod_slice(tmp_path, capsys):
  out = tmp_path / "report.json"
  rc = cli.main(["compile", *TINY, "--topology", "v5p:2x2x1", "--json", str(out)])
  printed = capsys.readouterr().out
  assert rc == 0, printed
  r = json.load(open(out))
  for key in ("mesh", "num_devices", "compile_seconds", "memory_per_chip_bytes", "hbm_per_chip_bytes", "fits",
              "compiler_flops_per_chip", "model_flops_per_step", "collectives", "all_gathers",
              "expert_parameter_all_gathers", "total_params", "device_kind"):
    assert key in r, key
  assert r["num_devices"] == 4 and r["mesh"] == {"data": 1, "expert": 4, "model": 1}
  assert "TPU v5" in r["device_kind"] and r["hbm_per_chip_bytes"] == 95 * 2 ** 30 and r["fits"] is True
  mem = r["memory_per_chip_bytes"]
  assert all(mem[k] > 0 for k in ("parameters", "optimizer_state", "arguments", "temporaries", "total"))
  # float32 parameters: every chip holds the replicated ones and a quarter of the experts.
  assert r["total_params"] * 4 / 4 < mem["parameters"] < r["total_params"] * 4
  assert mem["arguments"] >= mem["parameters"] + mem["optimizer_state"]
  assert r["collectives"]["all-to-all"]["count"] > 0  # expert parallelism: dispatch and combine
  assert r["expert_parameter_all_gathers"] == []
  assert 0.8 < r["compiler_vs_model_flops"] < 1.5  # the compiler counts about the model's FLOPs
  assert "all-to-all" in printed and "fits" in printed
  # Projections: 4 v5p chips at 459 TFLOP/s bf16 each, tokens = batch x (inputs + targets).
  assert r["tokens_per_step"] == 32 * (64 + 32) and r["peak_bf16_flops_per_chip"] == 459e12
  for mfu in (0.40, 0.55):
    p = r["projected"][f"mfu_{mfu:.2f}"]
    seconds = r["model_flops_per_step"] / (4 * 459e12 * mfu)
    assert p["step_seconds"] == pytest.approx(seconds, rel=1e-12)
    assert p["tokens_per_second"] == pytest.approx(32 * 96 / seconds, rel=1e-12)
  assert "at 40% MFU of 459 TFLOP/s" in printed
  # docs/scaling.md's table row is read from this JSON (tools/scaling_table.py).
  table = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "scaling_table.py"), str(out)],
                         capture_output=True, text=True, check=True).stdout.splitlines()
  cells = [c.strip() for c in table[-1].strip("|").split("|")]
  assert cells[1] == "v5p:2x2x1 (4 chips)" and cells[2] == "1, 4, 1" and cells[3] == "32 x (64 + 32)"
  assert f"{mem['total'] / 2 ** 30:.2f}" in cells[4] and "A2A" in cells[5]
  assert cells[8] == " / ".join(f"{r['projected'][k]['step_seconds']:.2f} s" for k in ("mfu_0.40", "mfu_0.55"))


def test_collective_parser_counts_async_pairs_once_and_flags_expert_gathers():
  hlo = "\n".join([
      '%ag = bf16[4,64,128]{2,1,0} all-gather(bf16[1,64,128]{2,1,0} %p), dimensions={0}, '
      'metadata={op_name="jit(train_step)/decoder/layer_1/moe/experts/wi_0"}',
      '%ar-start = (f32[8]{0}, f32[8]{0}) all-reduce-start(f32[8]{0} %x), to_apply=%add',
      '%ar-done = f32[8]{0} all-reduce-done((f32[8]{0}, f32[8]{0}) %ar-start)',
      '%a2a = bf16[2,4,16]{2,1,0} all-to-all(bf16[2,4,16]{2,1,0} %y), dimensions={0}',
  ])
  c = aot.collectives(hlo)
  assert c["all-gather"]["count"] == 1 and c["all-gather"]["bytes"] == 4 * 64 * 128 * 2
  assert c["all-gather"]["ops"][0]["expert_parameter"] is True
  assert c["all-reduce"]["count"] == 1 and c["all-reduce"]["bytes"] == 2 * 8 * 4  # the start's tuple
  assert c["all-to-all"]["count"] == 1 and c["reduce-scatter"]["count"] == 0


def test_collective_parser_reads_tpu_all_reduce_scatter_fusions_as_reduce_scatters():
  """XLA:TPU's FSDP gradients: an `all-reduce-scatter` computation (all-reduce + dynamic-slice) called by a
  fusion is one reduce-scatter of the shard's size; a plain all-reduce after it stays an all-reduce."""
  hlo = "\n".join([
      "%all-reduce-scatter.1 (input.1: f32[32,64,64]) -> f32[64,8,64] {",
      "  %input.1 = f32[32,64,64]{1,2,0} parameter(0)",
      "  %bitcast.1 = f32[256,8,64]{2,1,0} bitcast(%input.1)",
      "  %all-reduce.7 = f32[256,8,64]{2,1,0} all-reduce(%bitcast.1), replica_groups={{0,1,2,3}}, to_apply=%add",
      "  ROOT %dynamic-slice.2 = f32[64,8,64]{2,1,0} dynamic-slice(%all-reduce.7, %a, %b, %b)",
      "}",
      "",
      "ENTRY %main (p: f32[32,64,64]) -> f32[64,8,64] {",
      "  %fusion.1 = f32[64,8,64]{2,1,0} fusion(%p), kind=kCustom, calls=%all-reduce-scatter.1",
      "  %all-reduce.8 = f32[4]{0} all-reduce(f32[4]{0} %q), to_apply=%add",
      "}",
  ])
  c = aot.collectives(hlo)
  assert c["reduce-scatter"]["count"] == 1 and c["reduce-scatter"]["bytes"] == 64 * 8 * 64 * 4
  assert c["all-reduce"]["count"] == 1 and c["all-reduce"]["bytes"] == 16


def test_unknown_topology_is_a_clear_error(capsys):
  rc = cli.main(["compile", *TINY, "--topology", "v9z:2x2"])
  err = capsys.readouterr().err
  assert rc == 2 and "use a TPU topology such as" in err and "cpu:N" in err


@pytest.mark.slow
def test_oversized_batch_does_not_fit_and_says_what_to_change(capsys):
  rc = cli.main(["compile", "--gin_file", "models/st_moe_tiny.gin", "--gin.BATCH_SIZE=8192",
                 "--gin.TASK_FEATURE_LENGTHS={'inputs': 512, 'targets': 114}", "--topology", "v5e:2x2"])
  err = capsys.readouterr().err
  assert rc == 1
  line = err.strip().splitlines()[-1]
  assert line.startswith("stmoe compile: error: ") and "does not fit" in line
  assert "NUM_EXPERT_PARTITIONS" in line and "BATCH_SIZE" in line and "remat" in line
