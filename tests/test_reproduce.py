"""The reproduction harness (`stmoe reproduce`): its output contract on --fast, resuming, refusing a foreign
output directory, the FLOP match of the paired LMs, and the speedup arithmetic against hand computation."""

import hashlib
import json
import math
import os

import pytest

from stmoe import cli
from stmoe.reproduce import speedup


# --- the speedup arithmetic (Artetxe et al.'s compute-to-target ratio) -------------------------------------

def test_compute_to_reach_interpolates_the_first_crossing():
  x, y = [100, 200, 300, 400], [5.0, 4.0, 3.0, 2.5]
  assert speedup.compute_to_reach(x, y, 3.5) == pytest.approx(250.0)  # halfway between 4.0 and 3.0
  assert speedup.compute_to_reach(x, y, 4.0) == pytest.approx(200.0)
  assert speedup.compute_to_reach(x, y, 6.0) == 100.0  # already there at the first point
  assert speedup.compute_to_reach(x, y, 2.0) is None  # never


def test_speedup_matches_hand_computation_and_reports_bounds():
  sparse = ([100, 200, 300, 400], [4.0, 3.0, 2.5, 2.2])
  dense = ([100, 200, 300, 400], [5.0, 4.0, 3.5, 3.0])
  # At budget 200 the sparse loss is 3.0; the dense curve gets there at 400: 2x.
  s = speedup.speedup(*sparse, *dense, budget=200)
  assert (s.value, s.bound, s.target) == (pytest.approx(2.0), "", pytest.approx(3.0))
  # At budget 150 the sparse loss is 3.5 (interpolated); dense reaches 3.5 at 300: 2x.
  assert speedup.speedup(*sparse, *dense, budget=150).value == pytest.approx(2.0)
  # At budget 300 the sparse loss 2.5 is never reached by dense: at least 400/300.
  s = speedup.speedup(*sparse, *dense, budget=300)
  assert s.bound == "lower" and s.value == pytest.approx(400 / 300) and s.text() == ">1.33"
  # A dense model already better at its first point: an upper bound.
  s = speedup.speedup(*sparse, [100, 200], [1.0, 0.9], budget=200)
  assert s.bound == "upper" and s.text().startswith("<")


# --- the harness through the CLI -----------------------------------------------------------------------------

def _tree_digest(path):
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for name in sorted(files):
      p = os.path.join(root, name)
      h.update(p.encode())
      with open(p, "rb") as f:
        h.update(f.read())
  return h.hexdigest()


@pytest.fixture(scope="module")
def fast_lm_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("repro") / "moe_vs_dense")
  assert cli.main(["reproduce", "moe_vs_dense_lm", "--fast", "--output_dir", out, "--no_progress"]) == 0
  return out


@pytest.mark.slow
def test_fast_moe_vs_dense_writes_the_contract(fast_lm_dir):
  with open(os.path.join(fast_lm_dir, "results.json")) as f:
    results = json.load(f)
  for key in ("experiment", "config", "seeds", "hardware", "wall_time_s", "summary", "runs", "paper", "findings",
              "tables", "plots"):
    assert key in results, key
  assert results["experiment"] == "moe_vs_dense_lm" and results["fast"] and results["seeds"] == [0]
  assert "LmExperiment.train_steps = 12" in results["config"]
  assert {(r["arm"], r["seed"]) for r in results["runs"]} == {("moe", 0), ("dense", 0)}
  for r in results["runs"]:
    for domain in ("plays", "wikipedia", "news"):
      curve = r["curves"][domain]
      assert curve["step"] == [6, 12] and all(math.isfinite(v) and v > 1 for v in curve["perplexity"])
      assert curve["perplexity"] == pytest.approx([math.exp(v) for v in curve["cross_entropy"]])
  assert set(results["summary"]["speedup"]) == {"plays", "wikipedia", "news"}
  assert all(f["verdict"] == "inconclusive" for f in results["findings"])  # --fast never claims a verdict
  for plot in results["plots"]:
    with open(os.path.join(fast_lm_dir, plot), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(os.path.join(fast_lm_dir, "results.md")) as f:
    md = f.read()
  assert "| moe |" in md and "### Findings" in md and "perplexity_curves.png" in md


@pytest.mark.slow
def test_rerun_resumes_and_foreign_configs_are_refused(fast_lm_dir, tmp_path, capsys):
  runs_before = _tree_digest(os.path.join(fast_lm_dir, "runs"))
  # The same command again: the finished runs are read back, nothing is retrained or rewritten.
  assert cli.main(["reproduce", "moe_vs_dense_lm", "--fast", "--output_dir", fast_lm_dir, "--no_progress"]) == 0
  assert _tree_digest(os.path.join(fast_lm_dir, "runs")) == runs_before
  with open(os.path.join(fast_lm_dir, "experiment.json")) as f:
    invocations = json.load(f)["invocations"]
  with open(os.path.join(fast_lm_dir, "results.json")) as f:
    results = json.load(f)
  assert len(invocations) == 2  # the wall time of a resumed experiment is the sum of its sessions
  assert results["total_wall_time_s"] == pytest.approx(sum(i["wall_time_s"] for i in invocations))
  assert results["total_wall_time_s"] > results["wall_time_s"]
  before = _tree_digest(fast_lm_dir)
  # Another config (or the default budget) in the same directory: refused, nothing touched.
  assert cli.main(["reproduce", "moe_vs_dense_lm", "--fast", "--output_dir", fast_lm_dir,
                   "--gin.LmExperiment.learning_rate=0.5"]) == 2
  assert "another gin config" in capsys.readouterr().err
  assert cli.main(["reproduce", "moe_vs_dense_lm", "--output_dir", fast_lm_dir]) == 2
  assert "--fast" in capsys.readouterr().err
  assert _tree_digest(fast_lm_dir) == before
  # A non-empty directory that is not an experiment's.
  (tmp_path / "mine.txt").write_text("precious")
  assert cli.main(["reproduce", "moe_vs_dense_lm", "--fast", "--output_dir", str(tmp_path)]) == 2
  assert "not an stmoe reproduce output directory" in capsys.readouterr().err
  assert os.listdir(tmp_path) == ["mine.txt"]


@pytest.mark.slow
def test_fast_few_shot_priming_reuses_the_lms(fast_lm_dir, tmp_path):
  out = str(tmp_path / "priming")
  runs_before = _tree_digest(os.path.join(fast_lm_dir, "runs"))
  assert cli.main(["reproduce", "few_shot_priming", "--fast", "--output_dir", out, "--no_progress",
                   f"--gin.FewShotPriming.lm_dir='{fast_lm_dir}'"]) == 0
  assert _tree_digest(os.path.join(fast_lm_dir, "runs")) == runs_before  # read, never retrained
  assert not os.path.exists(os.path.join(out, "runs"))
  with open(os.path.join(out, "results.json")) as f:
    results = json.load(f)
  rows = results["runs"]
  assert {(r["arm"], r["k"]) for r in rows} == {(a, k) for a in ("moe", "dense") for k in (0, 1)}
  for r in rows:
    assert r["task"] == "shakespeare_cloze" and r["num_examples"] == 8 and 0.0 <= r["accuracy"] <= 1.0
    assert r["chance"] == pytest.approx(0.25) and r["checkpoint"].endswith("/checkpoints/12")
  assert "priming_accuracy.png" in results["plots"]
  # An lm_dir without the runs: a clear error naming the command that makes them.
  assert cli.main(["reproduce", "few_shot_priming", "--fast", "--output_dir", str(tmp_path / "p2"),
                   f"--gin.FewShotPriming.lm_dir='{tmp_path}'"]) == 2


def test_list_and_bad_names(capsys):
  assert cli.main(["reproduce", "--list"]) == 0
  listed = capsys.readouterr().out
  for name in ("moe_vs_dense_lm", "few_shot_priming"):
    assert name in listed
  assert cli.main(["reproduce", "moe_vs_dens_lm", "--output_dir", "/tmp/x"]) == 2
  assert "Did you mean 'moe_vs_dense_lm'" in capsys.readouterr().err
  assert cli.main(["reproduce", "moe_vs_dense_lm"]) == 2
  assert "--output_dir is required" in capsys.readouterr().err


def test_the_paired_lms_are_flop_matched():
  """`stmoe info`'s training FLOPs per token of the MoE and dense arms agree to the router's share."""
  from stmoe.reproduce import harness, lm_runs, runs

  harness.configure("moe_vs_dense_lm", fast=False)
  exp = lm_runs.LmExperiment()
  flops = {arm: runs.model_flops(spec, exp.settings.feature_lengths) for arm, spec in exp.arms.items()}
  moe, dense = flops[exp.sparse_arm], flops[exp.dense_arm]
  assert moe["flops_per_token"] == pytest.approx(dense["flops_per_token"], rel=2e-3)
  assert moe["flops_per_token"] >= dense["flops_per_token"]  # the router's matmul is the only extra
  assert moe["total_params"] > dense["total_params"]  # the experts: more parameters, same compute
