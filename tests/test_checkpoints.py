"""Checkpoint manager on toy train states: keep-N, atomic finalisation, fallback, params-only restore."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stmoe import checkpoints, partitioning


def _state(step: int):
  rng = np.random.default_rng(step)
  params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)},
            "moe": {"wi": jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float32)}}
  return {"step": jnp.int32(step), "params": params,
          "opt_state": {"mu": jax.tree.map(lambda p: p * 0.5, params), "count": jnp.int32(step)},
          "rng": jax.random.PRNGKey(step)}


def _abstract(state):
  sharding = partitioning.replicated(partitioning.make_mesh())
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def _equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_keep_last_n_atomic_saves_and_restore(tmp_path):
  mgr = checkpoints.CheckpointManager(str(tmp_path), keep=2, async_save=True)
  for step in (1, 2, 3):
    mgr.save(step, _state(step), {"train": {"index": step * 10}})
  mgr.wait()
  assert mgr.all_steps() == [2, 3]
  names = os.listdir(tmp_path / "checkpoints")
  assert sorted(names) == ["2", "3"], names  # no tmp dirs left behind; old ones deleted
  step, state, data = mgr.restore_latest(_abstract(_state(0)))
  assert step == 3 and data == {"train": {"index": 30}} and _equal(state, _state(3))
  mgr.close()


def test_save_writes_to_a_temporary_directory_first(tmp_path):
  mgr = checkpoints.CheckpointManager(str(tmp_path), keep=3, async_save=True)
  seen = set()
  mgr.save(7, _state(7), {})
  seen.update(os.listdir(tmp_path / "checkpoints"))
  mgr.wait()
  seen.update(os.listdir(tmp_path / "checkpoints"))
  mgr.close()
  # Either we caught the in-flight tmp dir or the save had already been renamed; the final name must never
  # be an incomplete directory: every finalised dir has orbax's commit marker.
  assert "7" in seen
  assert os.path.exists(tmp_path / "checkpoints" / "7" / "state" / "_METADATA")
  tmp_names = [n for n in seen if n.startswith("7.")]
  assert all("tmp" in n for n in tmp_names)


def test_corrupt_latest_falls_back_with_a_warning(tmp_path):
  mgr = checkpoints.CheckpointManager(str(tmp_path), keep=3, async_save=False)
  mgr.save(1, _state(1), {"train": {"index": 1}})
  mgr.save(2, _state(2), {"train": {"index": 2}})
  mgr.wait()
  for root, _, files in os.walk(tmp_path / "checkpoints" / "2" / "state"):
    for name in files:
      if "ocdbt.process" in root or name == "manifest.ocdbt":
        with open(os.path.join(root, name), "r+b") as f:
          f.truncate(3)
  with pytest.warns(checkpoints.CheckpointWarning, match="step 2"):
    step, state, data = mgr.restore_latest(_abstract(_state(0)))
  assert step == 1 and data == {"train": {"index": 1}} and _equal(state, _state(1))
  assert os.path.isdir(tmp_path / "corrupt_checkpoints" / "2")
  mgr.save(2, _state(2), {})  # the step can be saved again after quarantine
  mgr.close()
  assert mgr.all_steps() == [1, 2]


def test_restore_params_only_and_path_resolution(tmp_path):
  mgr = checkpoints.CheckpointManager(str(tmp_path), keep=3, async_save=False)
  mgr.save(5, _state(5), {})
  mgr.close()
  abstract_params = _abstract(_state(0))["params"]
  for path in (tmp_path, tmp_path / "checkpoints", tmp_path / "checkpoints" / "5"):
    params = checkpoints.restore_params(str(path), abstract_params)
    assert set(params) == {"dense", "moe"} and _equal(params, _state(5)["params"])
  state, data = checkpoints.restore_train_state(str(tmp_path), _abstract(_state(0)))
  assert _equal(state, _state(5)) and data == {}
  with pytest.raises(FileNotFoundError, match="No checkpoint found"):
    checkpoints.restore_params(str(tmp_path / "nothing"), abstract_params)
