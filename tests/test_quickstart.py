"""`stmoe quickstart --fast`: the whole pipeline end to end on the bundled data, every promised artifact."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

SUMMARY_KEYS = ("pretrain_first_loss", "pretrain_final_loss", "finetune_accuracy", "majority_baseline_accuracy",
                "seconds", "plot_path", "export_path")


@pytest.mark.slow
def test_quickstart_fast_end_to_end(tmp_path, capsys):
  from stmoe import cli

  out = tmp_path / "qs"
  assert cli.main(["quickstart", "--fast", "--output_dir", str(out), "--no_progress"]) == 0
  printed = capsys.readouterr().out
  assert "accuracy (unseen plays)" in printed and "majority baseline" in printed  # the summary table

  summary = json.load(open(out / "summary.json"))
  for key in SUMMARY_KEYS:
    assert summary[key] is not None, key
  for key in ("pretrain_first_loss", "pretrain_final_loss", "seconds"):
    assert np.isfinite(summary[key]) and summary[key] > 0, key
  assert 0.0 <= summary["finetune_accuracy"] <= 1.0
  assert 0.0 < summary["majority_baseline_accuracy"] <= 1.0

  # The plot: a real PNG of non-trivial size.
  png = open(summary["plot_path"], "rb").read()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

  # Metrics: pretraining/fine-tuning losses and router statistics, task-metric evaluations, best checkpoint.
  records = [json.loads(line) for line in open(out / "finetune" / "metrics.jsonl")]
  assert any("task_eval/accuracy" in r for r in records)
  assert any(k.startswith("experts/encoder/layer_1/expert_fraction/") for r in records for k in r)
  best = json.load(open(out / "finetune" / "best" / "best_metric.json"))
  assert best["metric"] == "accuracy" and best["step"] in {int(s) for s in summary["finetune_accuracy_history"]}
  preds = [json.loads(line) for line in open(summary["predictions_path"])]
  assert len(preds) == summary["num_eval_examples"] and {"input", "prediction", "target"} <= set(preds[0])

  # The export scores exactly like the fine-tuned checkpoint it came from.
  from stmoe import export as export_lib

  exported = export_lib.load(summary["export_path"])
  ckpt = export_lib.load(str(out / "finetune"))
  assert exported.is_export and json.load(open(os.path.join(summary["export_path"], "export.json")))["step"] == 8
  rng = np.random.default_rng(0)
  enc = rng.integers(2, 8000, size=(2, 64)).astype(np.int32)
  tgt = rng.integers(2, 8000, size=(2, 4)).astype(np.int32)
  batch = {"encoder_input_tokens": enc, "decoder_target_tokens": tgt,
           "decoder_input_tokens": np.concatenate([np.zeros((2, 1), np.int32), tgt[:, :-1]], axis=1)}
  np.testing.assert_array_equal(np.asarray(exported.model.score_batch(exported.params, batch)),
                                np.asarray(ckpt.model.score_batch(ckpt.params, batch)))

  # `stmoe eval --checkpoint EXPORT --task ...`: same batches as the quickstart's evaluation, so the same
  # predictions; its accuracy must equal the one counted independently from predictions.jsonl.
  results_path = tmp_path / "eval_results.json"
  preds_path = tmp_path / "eval_preds.jsonl"
  assert cli.main(["eval", "--checkpoint", summary["export_path"], "--task", "shakespeare_genre",
                   "--inputs_length", "64", "--targets_length", "4", "--batch_size", "32",
                   "--max_examples", str(summary["num_eval_examples"]), "--output", str(results_path),
                   "--predictions", str(preds_path), "--no_progress"]) == 0
  results = json.load(open(results_path))
  counted = 100.0 * np.mean([p["prediction"].strip() == p["target"] for p in preds])
  assert results["task_metrics"]["shakespeare_genre"]["accuracy"] == pytest.approx(counted)
  assert [json.loads(line)["prediction"] for line in open(preds_path)] == [p["prediction"] for p in preds]
