"""Two processes on localhost (gloo): same losses as one process; a dead peer ends the other quickly."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from helpers_train import run_train

HELPER = os.path.join(os.path.dirname(__file__), "helpers_train.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(tmp_path, die_after: int):
  port = _free_port()
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device per process
  procs = [subprocess.Popen([sys.executable, HELPER, "multihost", str(port), "2", str(i), str(tmp_path / "run"),
                             str(tmp_path / "out.json"), str(die_after)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=os.path.dirname(HELPER))
           for i in range(2)]
  return procs


@pytest.mark.slow
def test_two_processes_train_the_same_losses_as_one(tmp_path):
  from stmoe.training import optimizers

  procs = _launch(tmp_path, die_after=0)
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
  two = json.loads((tmp_path / "out.json").read_text())["losses"]
  one = run_train(str(tmp_path / "single"), steps=3, optimizer=optimizers.adamw(1e-2))
  ref = [one.losses[s] for s in (1, 2, 3)]
  for a, b in zip(two, ref):
    assert abs(a - b) <= 1e-5 * abs(b), (two, ref)
  # Only process 0 wrote metrics; both wrote their part of the (collective) checkpoint.
  rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert os.listdir(tmp_path / "run" / "checkpoints") == ["3"]


@pytest.mark.slow
def test_a_dead_peer_makes_the_survivor_exit_nonzero_in_bounded_time(tmp_path):
  procs = _launch(tmp_path, die_after=2)  # process 1 SIGKILLs itself after step 2
  out1 = procs[1].communicate(timeout=600)[0]
  assert procs[1].returncode == -9, out1[-3000:]
  died = time.time()
  out0 = procs[0].communicate(timeout=180)[0]  # would raise TimeoutExpired if it hung
  waited = time.time() - died
  assert procs[0].returncode != 0, out0[-3000:]
  assert waited < 120, waited
