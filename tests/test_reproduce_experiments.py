"""The ST-MoE / Shazeer reproduction experiments: their measuring functions against hand computation, and the
output contract of each one's --fast run."""

import json
import math
import os

import pytest

from stmoe import cli


def test_loss_spike_definition():
  from stmoe.reproduce.router_z_loss import loss_spike

  steps = [10, 20, 30, 40, 50, 60]
  assert loss_spike(steps, [9.0, 7.0, 6.0, 6.5, 5.5, 5.0], 60, threshold=1.0, warmup=0.1) is None
  assert loss_spike(steps, [9.0, 7.0, 6.0, 7.5, 5.5, 5.0], 60, threshold=1.0, warmup=0.1) == 40  # 7.5 > 6 + 1
  assert loss_spike(steps, [9.0, 7.0, 6.0, 6.5, math.nan, 5.0], 60, threshold=1.0, warmup=0.1) == 50
  # Before the warm-up fraction a rise is not a spike (the first losses are noisy).
  assert loss_spike(steps, [5.0, 9.0, 6.0, 5.5, 5.0, 4.0], 60, threshold=1.0, warmup=0.4) is None


def test_load_over_training_normalises_each_logged_step(tmp_path):
  from stmoe.reproduce.balance_losses import load_over_training

  rows = [{"step": 10, "loss": 5.0, "experts/decoder/layer_1/expert_fraction/0": 1.5,
           "experts/decoder/layer_1/expert_fraction/1": 0.5},
          {"step": 15, "loss": 4.0},  # a row without router metrics is skipped
          {"step": 20, "experts/decoder/layer_1/expert_fraction/0": 1.0,
           "experts/decoder/layer_1/expert_fraction/1": 1.0}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  out = load_over_training(str(tmp_path))
  assert out["step"] == [10, 20]
  assert out["decoder/layer_1"] == [[0.75, 0.25], [0.5, 0.5]]


def test_trained_fraction_matches_a_count_from_the_config():
  """attention_only trains exactly the q/k/v/o kernels: 4 * d_model * heads * d_kv per attention block."""
  from stmoe.reproduce.finetune_subsets import trained_fraction
  from stmoe.training.finetune import frozen_patterns_for

  spec = ["models/st_moe_tiny.gin", "VOCAB_SIZE = 8192"]
  lengths = {"inputs": 8, "targets": 4}
  d_model, heads, d_kv, enc, dec = 64, 4, 16, 4, 4
  attention = (enc + 2 * dec) * 4 * d_model * heads * d_kv  # decoder layers: self + encoder-decoder attention
  frac_att = trained_fraction(spec, frozen_patterns_for("attention_only"), lengths)
  frac_all = trained_fraction(spec, frozen_patterns_for("all"), lengths)
  frac_moe = trained_fraction(spec, frozen_patterns_for("moe_only"), lengths)
  frac_non = trained_fraction(spec, frozen_patterns_for("non_moe"), lengths)
  assert frac_all == 1.0
  assert frac_moe + frac_non == pytest.approx(1.0)
  # MoE parameters of st_moe_tiny: 4 sparse layers x (router 64x8 + 8 GEGLU experts of 3 x 64 x 128).
  moe = 4 * (64 * 8 + 8 * 3 * 64 * 128)
  total = attention / frac_att
  assert frac_moe * total == pytest.approx(moe, rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name,plot", [("capacity_grid", "capacity_grid.png"),
                                       ("balance_losses", "expert_load_heatmap.png"),
                                       ("router_z_loss", "router_z_loss.png"),
                                       ("finetune_subsets", "finetune_subsets.png")])
def test_fast_run_writes_the_contract(name, plot, tmp_path):
  out = str(tmp_path / name)
  assert cli.main(["reproduce", name, "--fast", "--output_dir", out, "--no_progress"]) == 0
  with open(os.path.join(out, "results.json")) as f:
    results = json.load(f)
  assert results["experiment"] == name and results["fast"] and results["seeds"] == [0]
  assert results["tables"] and results["tables"][0]["rows"] and results["runs"]
  assert all(f["verdict"] == "inconclusive" for f in results["findings"])
  assert plot in results["plots"]
  with open(os.path.join(out, plot), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(os.path.join(out, "results.md")) as f:
    assert f"# {name}" in f.read()
  for r in results["runs"]:
    assert os.path.exists(os.path.join(r["model_dir"], "run_result.json"))
