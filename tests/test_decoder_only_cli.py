"""The decoder-only MoE LM through the command line, with no extra flag: the feature layout follows the model.

`stmoe train` on a causal LM task (`shakespeare_lm`, targets only) and on a prefix-LM task
(`shakespeare_prefix_lm`, inputs + targets), `stmoe eval` (loss metrics), `stmoe export` and
`stmoe infer --task` (real inputs and targets written) on the bundled Shakespeare text.
"""

from __future__ import annotations

import json
import os

import pytest

from stmoe import cli

LM = ["--gin_file", "models/moe_lm_tiny.gin", "--gin.ModelConfig.num_decoder_layers=2",
      "--gin.ModelConfig.d_model=32", "--gin.ModelConfig.d_ff=64", "--gin.EXPERT_D_FF=32", "--gin.NUM_EXPERTS=4",
      "--gin.GROUP_SIZE=32", "--gin.VOCAB_SIZE=8192", "--gin.BATCH_SIZE=4"]


@pytest.fixture(autouse=True)
def _clean_gin():
  yield
  import gin

  gin.clear_config()


def _rows(path):
  return [json.loads(line) for line in open(path)]


@pytest.mark.slow
def test_decoder_only_lm_trains_evaluates_exports_and_decodes(tmp_path, capsys):
  lm_dir, prefix_dir = tmp_path / "lm", tmp_path / "prefix_lm"
  common = ["--gin_file", "runs/pretrain.gin", "--gin.TRAIN_STEPS=3", "--gin.LOG_PERIOD=1",
            "--gin.CHECKPOINT_PERIOD=3", "--gin.rsqrt_with_warmup.warmup_steps=1", "--no_progress"]
  # Causal LM: targets only.
  rc = cli.main(["train"] + LM + common + ["--gin.MIXTURE_OR_TASK_NAME='shakespeare_lm'",
                                           "--gin.TASK_FEATURE_LENGTHS={'targets': 32}", "--model_dir", str(lm_dir)])
  out, err = capsys.readouterr()
  assert rc == 0, err[-3000:]
  assert "finished at step 3" in out
  losses = [r["loss"] for r in _rows(lm_dir / "metrics.jsonl") if "loss" in r]
  assert len(losses) == 3 and all(l == l for l in losses)
  assert "ModelConfig.decoder_only = True" in (lm_dir / "checkpoints" / "3" / "config.gin").read_text()

  # Prefix LM on inputs + targets: the same model, trained on both (decoder_causal_attention marks inputs).
  rc = cli.main(["train"] + LM + common + ["--gin.MIXTURE_OR_TASK_NAME='shakespeare_prefix_lm'",
                                           "--gin.TASK_FEATURE_LENGTHS={'inputs': 24, 'targets': 8}",
                                           "--model_dir", str(prefix_dir)])
  out, err = capsys.readouterr()
  assert rc == 0, err[-3000:]
  # 24 + 8 tokens per row, 4 rows: the loss counts only targets, but the packed stream holds the inputs too.
  row = [r for r in _rows(prefix_dir / "metrics.jsonl") if "loss" in r][-1]
  assert 0 < row["num_tokens"] <= 4 * 32

  # Loss evaluation from gin (runs/eval.gin), no model_type flag.
  rc = cli.main(["eval"] + LM + ["--gin_file", "runs/eval.gin", "--gin.MIXTURE_OR_TASK_NAME='shakespeare_lm'",
                                 "--gin.TASK_FEATURE_LENGTHS={'targets': 32}", "--gin.EVAL_STEPS=2",
                                 "--model_dir", str(lm_dir)])
  out, err = capsys.readouterr()
  assert rc == 0, err[-3000:]
  assert "eval/loss = " in out and "eval/num_batches = 2" in out

  # Export, then decode a prefix-LM task split: inputs and targets are the real texts.
  rc = cli.main(["export", "--checkpoint", str(prefix_dir), "--output", str(tmp_path / "export")])
  out, err = capsys.readouterr()
  assert rc == 0, err[-3000:]
  preds = tmp_path / "preds.jsonl"
  rc = cli.main(["infer", "--checkpoint", str(tmp_path / "export"), "--task", "shakespeare_prefix_lm",
                 "--max_examples", "3", "--batch_size", "4", "--inputs_length", "24", "--targets_length", "8",
                 "--output", str(preds), "--no_progress"])
  out, err = capsys.readouterr()
  assert rc == 0, err[-3000:]
  rows = _rows(preds)
  assert len(rows) == 3
  assert all(r["input"].strip() and r["target"].strip() for r in rows), rows
  assert all(isinstance(r["prediction"], str) for r in rows)
