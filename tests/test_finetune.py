"""Fine-tuning: trainable-parameter selection (bit-identical frozen params) and keep-best checkpoints."""

from __future__ import annotations

import json
import os
import sys
import types

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import helpers_train  # noqa: E402

from stmoe.training import finetune  # noqa: E402


def _flat(tree):
  import jax

  from stmoe.training.optimizers import _path

  return {_path(p): np.asarray(jax.device_get(x)) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _is_moe(path: str) -> bool:
  """Independent definition: a parameter of an MoE layer lives under a module named exactly 'moe'."""
  return "moe" in path.split("/")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A 'pretrained' tiny sparse model: 2 steps of the synthetic copy task, saved as a checkpoint."""
  from stmoe import checkpoints

  model_dir = str(tmp_path_factory.mktemp("pretrain"))
  result = helpers_train.run_train(model_dir, steps=2, checkpoint_period=2)
  del result
  return model_dir, checkpoints


def _finetune(tmp_path, pretrained_dir: str, trainable: str):
  from stmoe import checkpoints

  opt = finetune.finetune_optimizer(learning_rate=1e-2, trainable_params=trainable)
  result = helpers_train.run_train(str(tmp_path / trainable), steps=3, optimizer=opt,
                                   init_checkpoint=pretrained_dir, restore_optimizer_state=False)
  before = checkpoints.restore_params(pretrained_dir, _abstract(result.state["params"]))
  return _flat(before), _flat(result.state["params"])


def _abstract(params):
  import jax

  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)


def test_patterns_select_exactly_the_moe_parameters():
  import jax

  model = helpers_train.tiny_model()
  shapes = jax.eval_shape(lambda: model.get_initial_variables(
      jax.random.PRNGKey(0), {"encoder_input_tokens": (2, 16), "decoder_input_tokens": (2, 8)})["params"])
  from stmoe.training.optimizers import frozen_mask

  paths = sorted(_flat(jax.tree.map(lambda s: np.zeros(()), shapes)))
  for trainable, frozen_if in (("non_moe", _is_moe), ("moe_only", lambda p: not _is_moe(p))):
    mask = _flat(frozen_mask(shapes, finetune.frozen_patterns_for(trainable)))
    assert {p for p in paths if bool(mask[p])} == {p for p in paths if frozen_if(p)}, trainable
  assert finetune.frozen_patterns_for("all") == ()
  assert sum(_is_moe(p) for p in paths) == 6  # router + 2 expert kernels, in 2 MoE layers
  with pytest.raises(ValueError, match="TRAINABLE_PARAMS"):
    finetune.frozen_patterns_for("experts")


@pytest.mark.parametrize("trainable", ["non_moe", "moe_only"])
def test_frozen_parameters_stay_bit_identical(tmp_path, pretrained, trainable):
  pretrained_dir, _ = pretrained
  before, after = _finetune(tmp_path, pretrained_dir, trainable)
  assert before.keys() == after.keys()
  frozen = [p for p in before if _is_moe(p) == (trainable == "non_moe")]
  trained = [p for p in before if p not in frozen]
  assert frozen and trained
  for p in frozen:
    np.testing.assert_array_equal(after[p], before[p], err_msg=p)
  changed = [p for p in trained if not np.array_equal(after[p], before[p])]
  # Every trainable parameter that receives a gradient moved (all of them here: 3 steps at lr 1e-2).
  assert len(changed) == len(trained), sorted(set(trained) - set(changed))


def test_frozen_parameters_with_restored_optimizer_state_is_a_clear_error(tmp_path, pretrained):
  opt = finetune.finetune_optimizer(learning_rate=1e-2, trainable_params="non_moe")
  with pytest.raises(ValueError, match="RESTORE_OPTIMIZER_STATE=False"):
    helpers_train.run_train(str(tmp_path / "both"), steps=3, optimizer=opt, init_checkpoint=pretrained[0],
                            restore_optimizer_state=True)


def test_all_trainable_moves_moe_parameters_too(tmp_path, pretrained):
  pretrained_dir, _ = pretrained
  before, after = _finetune(tmp_path, pretrained_dir, "all")
  assert all(not np.array_equal(after[p], before[p]) for p in before if _is_moe(p))


class _Manager:
  def __init__(self, directory):
    self.directory = directory
    self.waited = 0

  def wait(self):
    self.waited += 1


class _ScriptedEval(finetune.TaskEvalCallback):
  """The callback with decoding replaced by a script of metric values (the keep-best logic is under test)."""

  def __init__(self, values, **kw):
    super().__init__(task="t", task_feature_lengths={"inputs": 4, "targets": 2}, **kw)
    self.values = list(values)

  def evaluate(self, ctx, step):
    metrics = {"accuracy": self.values.pop(0)}
    self.history.append((step, metrics))
    return metrics


def _fake_step(ckpt_dir: str, step: int) -> None:
  d = os.path.join(ckpt_dir, str(step), "state")
  os.makedirs(d)
  with open(os.path.join(d, "marker"), "w") as f:
    f.write(str(step))


@pytest.mark.parametrize("mode,values,best_step", [("max", [0.3, 0.5, 0.4], 2), ("min", [0.3, 0.5, 0.2], 3)])
def test_keeps_best_checkpoint(tmp_path, mode, values, best_step):
  ckpt_dir = str(tmp_path / "checkpoints")
  manager = _Manager(ckpt_dir)
  ctx = types.SimpleNamespace(model_dir=str(tmp_path), checkpoints=manager, is_chief=True)
  cb = _ScriptedEval(values, mode=mode)
  cb.on_train_start(ctx)
  for step in (1, 2, 3):
    _fake_step(ckpt_dir, step)
    cb.on_checkpoint(ctx, step)
  best = finetune.read_best(str(tmp_path))
  assert best["step"] == best_step and best["value"] == values[best_step - 1] and best["mode"] == mode
  with open(tmp_path / "best" / "state" / "marker") as f:
    assert f.read() == str(best_step)
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".best-tmp-")]
  assert manager.waited >= 1
  # A restarted run knows the best so far and does not replace it with a worse one.
  cb2 = _ScriptedEval([-1.0 if mode == "max" else 9.0])
  cb2.mode = mode
  cb2.on_train_start(ctx)
  _fake_step(ckpt_dir, 4)
  cb2.on_checkpoint(ctx, 4)
  assert json.load(open(tmp_path / "best" / "best_metric.json"))["step"] == best_step


def test_unknown_metric_is_a_clear_error(tmp_path):
  ctx = types.SimpleNamespace(model_dir=str(tmp_path), checkpoints=None, is_chief=True)
  cb = _ScriptedEval([0.5], metric="f1")
  with pytest.raises(KeyError, match="accuracy"):
    cb.on_checkpoint(ctx, 1)
