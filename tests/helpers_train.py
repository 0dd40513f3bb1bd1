"""Shared helpers for the training tests: a tiny top-2 sparse model and a synthetic train run.

Run as `python -m tests.helpers_train ...`? No: the subprocess tests run scripts through
`python tests/helpers_train.py MODE ...` with XLA_FLAGS set in the child's environment only.
"""

from __future__ import annotations

import json
import os
import sys  # noqa: F401


FEATURE_LENGTHS = {"inputs": 16, "targets": 8}
VOCAB = 64


def tiny_config(num_experts: int = 4, dtype: str = "float32", **moe_overrides):
  """2+2 layers, d_model 32, 4 heads, 4 experts top-2 on every other layer (layers 1 of each stack).

  gin is cleared first: ModelConfig/MoeConfig are gin-configurable, so bindings left behind by an
  in-process CLI test would otherwise silently change this model.
  """
  import gin

  from stmoe.config import ModelConfig, MoeConfig, SparseLayout

  gin.clear_config()

  settings = dict(num_experts=num_experts, num_selected_experts=2, d_ff=32, group_size=32,
                  train_capacity_factor=2.0, eval_capacity_factor=2.0)
  moe = MoeConfig(**{**settings, **moe_overrides})
  return ModelConfig(vocab_size=VOCAB, d_model=32, num_heads=4, d_kv=8, d_ff=64, num_encoder_layers=2,
                     num_decoder_layers=2, activations=("relu",), moe=moe, dtype=dtype,
                     encoder_sparse=SparseLayout(kind="every", every=2),
                     decoder_sparse=SparseLayout(kind="every", every=2))


def tiny_model(**kw):
  from stmoe.models.api import make_model

  return make_model(tiny_config(**kw))


def run_train(model_dir: str, *, steps: int, mesh=None, batch_size: int = 8, log_period: int = 1,
              checkpoint_period: int = 1000, optimizer=None, **kw):
  """trainer.train on the synthetic copy task with the tiny sparse model (no progress bar)."""
  from stmoe.training import inputs, trainer

  return trainer.train(kw.pop("model", None) or tiny_model(), model_dir=model_dir, train_steps=steps,
                       batch_size=batch_size, task_feature_lengths=FEATURE_LENGTHS,
                       input_fn=kw.pop("input_fn", inputs.synthetic_input), mesh=mesh, log_period=log_period,
                       checkpoint_period=checkpoint_period, optimizer=optimizer, progress=False, **kw)


def _flat_params(tree):
  import jax
  import numpy as np

  return {jax.tree_util.keystr(p): np.asarray(jax.device_get(x))
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def mode_meshes(out_path: str) -> None:
  """8 simulated devices: losses per mesh, expert-param shardings, all-to-all presence, reshard restore."""
  import jax
  import numpy as np

  from stmoe import checkpoints, partitioning
  from stmoe.training import optimizers, state as state_lib, trainer

  assert jax.device_count() == 8, jax.devices()
  work = os.environ.get("STMOE_TEST_TMP", "/tmp/stmoe_meshes")
  meshes = {"1": (jax.devices()[:1], 1, 1), "data8": (None, 1, 1), "data2_expert4": (None, 4, 1),
            "data2_expert2_model2": (None, 2, 2)}
  report = {"losses": {}, "specs": {}}
  finals = {}
  opt = optimizers.adafactor(learning_rate=0.05)
  # Token groups of 8: each device's rows (16 encoder / 8 decoder tokens on 8 devices) hold whole groups, so
  # every mesh routes the same groups as one device (stmoe/moe/grouping.py derives smaller groups from a
  # larger bound on 8 devices, and capacity is per group).
  for name, (devices, e, m) in meshes.items():
    mesh = partitioning.make_mesh(e, m, devices=devices)
    result = run_train(os.path.join(work, name), steps=4, mesh=mesh, optimizer=opt, model=tiny_model(group_size=8))
    report["losses"][name] = [result.losses[s] for s in sorted(result.losses)]
    wi = result.state["params"]["encoder"]["layer_1"]["moe"]["experts"]["wi"]
    q = result.state["params"]["encoder"]["layer_1"]["self_attention"]["query"]["kernel"]
    report["specs"][name] = {"wi": str(wi.sharding.spec), "query": str(q.sharding.spec),
                             "wi_shard_shape": list(wi.addressable_shards[0].data.shape)}
    finals[name] = (mesh, _flat_params(result.state["params"]))
  # bfloat16 activations (the custom-VJP products of stmoe.layers.matmul) under SPMD: 1 device vs (2, 2, 2).
  report["losses_bf16"] = {}
  for name in ("1", "data2_expert2_model2"):
    devices, e, m = meshes[name]
    mesh = partitioning.make_mesh(e, m, devices=devices)
    result = run_train(os.path.join(work, name + "_bf16"), steps=4, mesh=mesh, optimizer=opt,
                       model=tiny_model(dtype="bfloat16", group_size=8))
    report["losses_bf16"][name] = [result.losses[s] for s in sorted(result.losses)]
  # Restore the (data=2, expert=4) checkpoint onto the (data=2, expert=2, model=2) mesh and onto 1 device.
  model = tiny_model()
  shapes = trainer.input_shapes_for("encoder_decoder", 8, FEATURE_LENGTHS)
  report["reshard"] = {}
  for target in ("data2_expert2_model2", "1"):
    mesh = finals[target][0]
    params_abs = jax.eval_shape(lambda: model.get_initial_variables(jax.random.PRNGKey(0), shapes)["params"])
    tx = optimizers.make_optimizer(opt, model.params_logical_axes(shapes), params_abs)
    spec = state_lib.state_spec(model, tx, shapes, mesh)
    restored, data_state = checkpoints.restore_train_state(os.path.join(work, "data2_expert4"), spec.abstract)
    got = _flat_params(restored["params"])
    want = finals["data2_expert4"][1]
    wi = restored["params"]["encoder"]["layer_1"]["moe"]["experts"]["wi"]
    report["reshard"][target] = {
        "equal": all(np.array_equal(got[k], want[k]) for k in want) and set(got) == set(want),
        "wi_spec": str(wi.sharding.spec), "step": int(restored["step"]), "data_state": data_state,
        "only_params_equal": all(np.array_equal(v, want[k]) for k, v in _flat_params(
            checkpoints.restore_params(os.path.join(work, "data2_expert4"), spec.abstract["params"])).items()),
    }
  # Is there an all-to-all in the compiled expert-parallel step?
  # Groups of 8 tokens give 16 encoder / 8 decoder groups, so the "batch" axis divides over data x expert;
  # sort dispatch (the default): XLA turns the group-major -> expert-major buffer transpose into all-to-alls.
  mesh = finals["data2_expert4"][0]
  model = tiny_model(group_size=8, dispatch="sort")
  params_abs = jax.eval_shape(lambda: model.get_initial_variables(jax.random.PRNGKey(0), shapes)["params"])
  batch_abs = {k: jax.ShapeDtypeStruct(v, np.int32) for k, v in shapes.items()}
  param_sh = partitioning.logical_to_sharding(model.params_logical_axes(shapes), mesh, params_abs)
  with partitioning.mesh_context(mesh):
    lowered = jax.jit(lambda p, b: jax.grad(lambda p: model.loss_fn(p, b, None)[0])(p),
                      in_shardings=(param_sh, {k: partitioning.batch_sharding(mesh, 2) for k in shapes})
                      ).lower(params_abs, batch_abs)
    hlo = lowered.compile().as_text()
  report["all_to_all"] = "all-to-all" in hlo
  with open(out_path, "w") as f:
    json.dump(report, f, indent=1)


def mode_killed_run(model_dir: str, steps: str, kill_after: str) -> None:
  """Train with checkpoints every 2 steps and SIGKILL ourselves right after step `kill_after`."""
  import signal

  from stmoe.training import optimizers, trainer

  class Kill(trainer.Callback):
    def on_step_end(self, ctx, step):
      if step == int(kill_after):
        ctx.checkpoints.wait()  # the last periodic checkpoint is complete; the step after it is not saved
        os.kill(os.getpid(), signal.SIGKILL)

  run_train(model_dir, steps=int(steps), checkpoint_period=2, optimizer=optimizers.adamw(1e-2),
            callbacks=[Kill()])


def mode_killed_save(model_dir: str) -> None:
  """Save step 1 completely, then SIGKILL ourselves while step 2 (16 MiB) is being written asynchronously."""
  import signal

  import jax.numpy as jnp

  from stmoe import checkpoints

  state = lambda s: {"step": jnp.int32(s), "params": {"w": jnp.full((4096, 1024), float(s))}}
  mgr = checkpoints.CheckpointManager(model_dir, keep=3, async_save=True)
  mgr.save(1, state(1), {})
  mgr.wait()
  mgr.save(2, state(2), {})  # returns once the arrays are off the device; the files are still being written
  os.kill(os.getpid(), signal.SIGKILL)


def mode_multihost(port: str, num_processes: str, process_id: str, model_dir: str, out_path: str,
                   die_after: str = "0") -> None:
  """One process of a localhost multi-process run (gloo); process `die_after`>0 SIGKILLs itself then."""
  import signal

  from stmoe.training import distributed, optimizers, trainer

  distributed.initialize(distributed.DistributedArgs(f"127.0.0.1:{port}", int(num_processes), int(process_id),
                                                     heartbeat_timeout_s=10))
  import jax

  assert jax.process_count() == int(num_processes) and jax.device_count() == int(num_processes)

  class Die(trainer.Callback):
    def on_step_end(self, ctx, step):
      if int(die_after) and step == int(die_after) and jax.process_index() == 1:
        os.kill(os.getpid(), signal.SIGKILL)

  result = run_train(model_dir, steps=3 if not int(die_after) else 1000, optimizer=optimizers.adamw(1e-2),
                     callbacks=[Die()], step_timeout_s=60)
  if jax.process_index() == 0:
    with open(out_path, "w") as f:
      json.dump({"losses": [result.losses[s] for s in sorted(result.losses)]}, f)


if __name__ == "__main__":
  mode, *rest = sys.argv[1:]
  {"meshes": mode_meshes, "killed_run": mode_killed_run, "killed_save": mode_killed_save,
   "multihost": mode_multihost}[mode](*rest)
