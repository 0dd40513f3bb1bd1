"""`stmoe train` end to end (subprocess) and fail-fast errors for bad configurations (in-process)."""

import json
import os
import subprocess
import sys

import pytest

from stmoe.training import commands

BASE = ["--gin_file", "models/st_moe_tiny.gin", "--gin_file", "runs/pretrain.gin"]
SMALL = ["--gin.ModelConfig.num_encoder_layers=2", "--gin.ModelConfig.num_decoder_layers=2",
         "--gin.ModelConfig.d_model=32", "--gin.EXPERT_D_FF=32", "--gin.ModelConfig.d_ff=64",
         "--gin.VOCAB_SIZE=64", "--gin.NUM_EXPERTS=4", "--gin.GROUP_SIZE=32", "--gin.BATCH_SIZE=8",
         "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 8}", "--gin.train.input_fn=@synthetic_input",
         "--gin.synthetic_input.vocab_size=64"]


@pytest.mark.slow
def test_stmoe_train_pretrain_gin_tiny_sparse_model(tmp_path):
  model_dir = tmp_path / "run"
  cmd = [os.path.join(os.path.dirname(sys.executable), "stmoe"), "train", *BASE, *SMALL,
         "--gin.TRAIN_STEPS=24", "--gin.LOG_PERIOD=4", "--gin.CHECKPOINT_PERIOD=12", "--gin.EVAL_PERIOD=12",
         "--gin.EVAL_STEPS=1", "--gin.rsqrt_with_warmup.warmup_steps=4",
         "--gin.rsqrt_with_warmup.base_learning_rate=0.1", "--model_dir", str(model_dir)]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "finished at step 24" in proc.stdout
  assert "train.train_steps = %TRAIN_STEPS" in proc.stdout  # the config is printed
  rows = [json.loads(l) for l in open(model_dir / "metrics.jsonl")]
  train_rows = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train_rows] == [4, 8, 12, 16, 20, 24]
  assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.2, [r["loss"] for r in train_rows]
  assert train_rows[-1]["learning_rate"] == pytest.approx(0.1 / 23 ** 0.5, rel=1e-5)  # rsqrt at step 23
  assert any("eval/loss" in r for r in rows)
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(model_dir / "tensorboard"))
  assert sorted(os.listdir(model_dir / "checkpoints")) == ["12", "24"]
  config = (model_dir / "config.gin").read_text()
  assert "train.train_steps = 24" in config or "TRAIN_STEPS = 24" in config
  assert "ModelConfig.d_model = 32" in config

  # `stmoe eval` with runs/eval.gin on the same checkpoint (in-process).
  eval_args = ["--gin_file", "models/st_moe_tiny.gin", "--gin_file", "runs/eval.gin", *SMALL[:-2],
               "--gin.evaluate.input_fn=@synthetic_input", "--gin.synthetic_input.vocab_size=64",
               "--gin.EVAL_STEPS=2", "--model_dir", str(model_dir)]
  assert commands.eval_main(eval_args) == 0
  rows = [json.loads(l) for l in open(model_dir / "metrics.jsonl")]
  last = rows[-1]
  assert last["step"] == 24 and last["eval/num_batches"] == 2.0 and "eval/experts/router_z_loss" in last


@pytest.fixture(autouse=True)
def _clean_gin():
  """train_main/eval_main parse gin into the global config; leave nothing behind for other tests."""
  yield
  import gin

  gin.clear_config()


def _run(argv, capsys):
  rc = commands.train_main(argv)
  return rc, capsys.readouterr().err


def test_unknown_gin_binding_fails_fast_with_a_hint(capsys):
  rc, err = _run(BASE + ["--gin.train.train_stepz=3"], capsys)
  assert rc == 2
  assert "train_stepz" in err and "gin configuration error" in err


def test_impossible_mesh_is_refused_before_compiling(tmp_path, capsys):
  rc, err = _run(BASE + SMALL + ["--gin.NUM_EXPERT_PARTITIONS=3", "--model_dir", str(tmp_path)], capsys)
  assert rc == 2
  assert "NUM_EXPERT_PARTITIONS (3)" in err and "does not divide" in err


def test_missing_task_fails_with_a_clear_message(tmp_path, capsys):
  rc, err = _run(BASE + ["--model_dir", str(tmp_path)], capsys)  # MIXTURE_OR_TASK_NAME left unset
  assert rc == 2
  assert "MIXTURE_OR_TASK_NAME is not set" in err


def test_unregistered_task_name_fails_with_a_clear_message(tmp_path, capsys):
  rc, err = _run(BASE + SMALL[:-2] + ["--gin.MIXTURE_OR_TASK_NAME='no_such_task_xyz'", "--model_dir", str(tmp_path)],
                 capsys)
  assert rc == 2
  assert "no_such_task_xyz" in err and "not a registered seqio task or mixture" in err
