"""Preemption: a run SIGKILLed between checkpoints resumes exactly; corrupt/partial checkpoints are skipped."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from helpers_train import run_train

HELPER = os.path.join(os.path.dirname(__file__), "helpers_train.py")
STEPS = 6


def _adamw():
  from stmoe.training import optimizers

  return optimizers.adamw(1e-2)


@pytest.mark.slow
def test_sigkill_resume_is_exact_and_corrupt_latest_falls_back(tmp_path):
  from stmoe import checkpoints

  reference = run_train(str(tmp_path / "ref"), steps=STEPS, checkpoint_period=2, optimizer=_adamw())
  ref = reference.losses
  assert sorted(ref) == list(range(1, STEPS + 1))

  # A run killed with SIGKILL after step 5 (checkpoints at 2 and 4; step 5 never saved).
  run_dir = str(tmp_path / "killed")
  proc = subprocess.run([sys.executable, HELPER, "killed_run", run_dir, str(STEPS), "5"], capture_output=True,
                        text=True, timeout=600, cwd=os.path.dirname(HELPER))
  assert proc.returncode == -9, proc.stderr[-3000:]
  ckpt_dir = os.path.join(run_dir, "checkpoints")
  assert sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit()) == [2, 4]

  # A partial save left behind by a crash (orbax's tmp dir) must be ignored.
  partial = os.path.join(ckpt_dir, "6.orbax-checkpoint-tmp-1234")
  os.makedirs(os.path.join(partial, "state"))
  resumed = run_train(run_dir, steps=STEPS, checkpoint_period=2, optimizer=_adamw())
  assert resumed.start_step == 4
  assert sorted(resumed.losses) == [5, 6]
  for s in (5, 6):
    assert resumed.losses[s] == ref[s], (s, resumed.losses[s], ref[s])  # bit-exact
  np.testing.assert_array_equal(
      np.asarray(resumed.state["params"]["encoder"]["layer_1"]["moe"]["experts"]["wi"]),
      np.asarray(reference.state["params"]["encoder"]["layer_1"]["moe"]["experts"]["wi"]))

  # Corrupt the newest checkpoint (step 6): truncate its array data files. Resume must warn, move it
  # aside and continue from step 4, again reproducing the reference losses.
  state_dir = os.path.join(ckpt_dir, "6", "state")
  truncated = 0
  for root, _, files in os.walk(state_dir):
    for name in files:
      if "ocdbt.process" in root or name == "manifest.ocdbt":
        with open(os.path.join(root, name), "r+b") as f:
          f.truncate(7)
        truncated += 1
  assert truncated
  with pytest.warns(checkpoints.CheckpointWarning, match="step 6.*corrupt or incomplete"):
    again = run_train(run_dir, steps=STEPS, checkpoint_period=2, optimizer=_adamw())
  assert again.start_step == 4
  assert [again.losses[s] for s in (5, 6)] == [ref[5], ref[6]]
  assert os.path.isdir(os.path.join(run_dir, "corrupt_checkpoints", "6"))
  assert 6 in [int(n) for n in os.listdir(ckpt_dir) if n.isdigit()]  # re-saved cleanly

