"""Parameter and optimizer-state sharding over `data` (FSDP, gin/partitioning/fsdp.gin).

The rule itself is tested in-process on abstract meshes (only their axis sizes matter). The end-to-end
checks run once, in one subprocess with 8 simulated CPU devices (`python tests/test_fsdp.py child OUT`),
and several tests read its report: the shipped gin file switched on, the tiny top-2 model on
(data 4, expert 2) trains to the same float32 losses as on one device without FSDP, its live parameters
and optimizer state are split over `data`, checkpoints cross between FSDP and non-FSDP meshes, and the
compiled step's per-device arguments shrink.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import jax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from stmoe import partitioning

HERE = os.path.dirname(os.path.abspath(__file__))
FSDP_GIN = os.path.join(HERE, os.pardir, "gin", "partitioning", "fsdp.gin")
MIN_SIZE = 1024  # the tiny model's attention kernels [32, 4, 8] qualify; norm scales, routers, relpos do not


def _mesh(data: int, expert: int = 1, model: int = 1) -> AbstractMesh:
  return AbstractMesh((data, expert, model), partitioning.MESH_AXES)


def test_fsdp_spec_splits_the_largest_free_divisible_dimension():
  spec = lambda s, shape, logical, mesh, **kw: partitioning.fsdp_spec(P(*s), shape, P(*logical), mesh, **kw)
  m8 = _mesh(8)
  # Dense kernel [embed, mlp], model axis of size 1: `model` splits nothing, so d_ff (the larger) is free.
  assert spec((None, "model"), (768, 2048), ("embed", "mlp"), m8) == P(None, "data")
  # With 2 model partitions d_ff is taken; embed goes over data (t5x's 2-D parameter partitioning).
  assert spec((None, "model"), (768, 2048), ("embed", "mlp"), _mesh(4, 1, 2)) == P("data", "model")
  # Experts keep `expert` on their expert dimension; the largest other dimension goes over data.
  assert spec(("expert", None, None), (16, 768, 2048), ("expert", "embed", "mlp"), _mesh(4, 2)) == \
      P("expert", None, "data")
  # Equal sizes: the first. Not divisible by data: the next largest that is.
  assert spec((None, None), (512, 512), ("embed", "embed"), m8) == P("data", None)
  assert spec((None, None), (1002, 512), ("vocab", "embed"), m8) == P(None, "data")
  # A scanned stack's `layers` dimension is never split, however large.
  assert spec((None, None, None), (4096, 64, 128), ("layers", "embed", "mlp"), m8) == P(None, None, "data")
  # Unchanged: below the size threshold, data of size 1, nothing divisible.
  assert spec((None,), (768,), ("embed",), m8) == P(None)
  assert spec((None, None), (64, 64), ("embed", "mlp"), m8, min_size=2 ** 14) == P(None, None)
  assert spec((None, "model"), (768, 2048), ("embed", "mlp"), _mesh(1, 1, 8)) == P(None, "model")
  assert spec((None, None), (1001, 999), ("embed", "mlp"), m8) == P(None, None)


def test_param_shardings_switch_and_factored_optimizer_state_follow():
  """fsdp=False is the plain rules table; with fsdp=True Adafactor's factored statistics keep `data` on the
  dimension they still have and drop it with the one they reduce."""
  from stmoe.training import optimizers

  mesh = _mesh(4, 2)
  params = {"moe": {"wi": jax.ShapeDtypeStruct((4, 256, 512), "float32")},
            "mlp": {"wo": jax.ShapeDtypeStruct((512, 256), "float32")},
            "norm": {"scale": jax.ShapeDtypeStruct((256,), "float32")}}
  axes = {"moe": {"wi": P("expert", "embed", "mlp")}, "mlp": {"wo": P("mlp", "embed")}, "norm": {"scale": P("embed")}}
  plain = partitioning.param_shardings(axes, mesh, params)
  assert plain == partitioning.logical_to_sharding(axes, mesh, params)
  sh = partitioning.param_shardings(axes, mesh, params, fsdp=True, fsdp_min_size=1024)
  assert sh["moe"]["wi"].spec == P("expert", None, "data")
  assert sh["mlp"]["wo"].spec == P("data", None)
  assert sh["norm"]["scale"].spec == P(None)
  tx = optimizers.make_optimizer(optimizers.adafactor(learning_rate=0.1), axes, params)
  state = jax.eval_shape(tx.init, params)
  shardings = jax.tree.leaves(partitioning.derived_shardings(state, params, sh, mesh))
  got = {"/".join(partitioning.path_str(p).split("/")[-3:]): (tuple(x.shape), s.spec)
         for (p, x), s in zip(jax.tree_util.tree_flatten_with_path(state)[0], shardings)}
  assert got["v_row/moe/wi"] == ((4, 256), P("expert", None))  # wi's mlp (data) dimension is reduced away
  assert got["v_col/moe/wi"] == ((4, 512), P("expert", "data"))
  assert got["v_col/mlp/wo"] == ((512,), P("data"))  # wo [mlp, embed]: the mlp statistic keeps data
  assert got["v_row/mlp/wo"] == ((256,), P(None))
  assert got["v/norm/scale"] == ((256,), P(None))  # below the threshold: replicated like its parameter


def test_shipped_gin_files_switch_fsdp_on_and_compose_with_a_mesh_file():
  import gin

  from stmoe import gin_utils

  try:
    for files, experts in ((["partitioning/fsdp.gin"], 1), (["partitioning/expert_parallel_fsdp.gin"], 8),
                           (["partitioning/expert_model_parallel.gin", "partitioning/fsdp.gin"], 4)):
      gin_utils.parse_gin(["models/st_moe_tiny.gin", "runs/pretrain.gin"] + files, [])
      assert gin.query_parameter("param_shardings.fsdp") is True, files
      assert gin.query_parameter("%FSDP_MIN_SIZE") == partitioning.FSDP_MIN_SIZE, files
      assert gin.query_parameter("%NUM_EXPERT_PARTITIONS") == experts, files
    gin_utils.parse_gin(["models/st_moe_tiny.gin", "runs/pretrain.gin", "partitioning/expert_parallel.gin"], [])
    with pytest.raises(ValueError):  # off unless a file switches it on
      gin.query_parameter("param_shardings.fsdp")
  finally:
    gin.clear_config()


# ---------------------------------------------------------------------------------------------------------
# 8 simulated devices, one subprocess, shared by the tests below.


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("fsdp")
  out = tmp / "report.json"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, __file__, "child", str(out), str(tmp)], env=env, capture_output=True,
                        text=True, timeout=900, cwd=HERE)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(out.read_text())


@pytest.mark.slow
def test_fsdp_losses_match_one_device(report):
  base, fsdp = report["losses"]["one_device"], report["losses"]["fsdp_data4_expert2"]
  assert len(base) == 3 and base[-1] < base[0]
  for a, b in zip(fsdp, base):
    assert abs(a - b) <= 1e-5 * abs(b), (fsdp, base)


@pytest.mark.slow
def test_fsdp_really_shards_parameters_and_optimizer_state(report):
  specs = report["param_specs"]
  # Dense kernels, attention and expert weights are split over data (experts keep `expert` too) ...
  assert specs["encoder/layer_0/mlp/wi/kernel"] == ["P(None, 'data')", [32, 16]]
  assert specs["encoder/layer_0/self_attention/query/kernel"] == ["P('data', 'model', None)", [8, 4, 8]]
  assert specs["encoder/layer_1/moe/experts/wi"] == ["P('expert', 'data', 'model')", [2, 8, 32]]
  assert specs["token_embedder/embedding"] == ["P('data', None)", [16, 32]]
  # ... small parameters stay replicated.
  assert specs["encoder/layer_1/moe/router/w"][0] == "P(None, None)"
  assert specs["encoder/final_norm/scale"][0] == "P(None,)"
  # Every parameter of >= MIN_SIZE elements is split, and the optimizer's second moments follow.
  assert report["large_params"] and all("'data'" in specs[k][0] for k in report["large_params"])
  assert report["opt_specs"]["encoder/layer_1/moe/experts/wi"] == ["P('expert', 'data', 'model')", [2, 8, 32]]
  assert report["opt_specs"]["encoder/layer_0/mlp/wi/kernel"] == ["P(None, 'data')", [32, 16]]


@pytest.mark.slow
def test_fsdp_checkpoints_cross_meshes(report):
  """An FSDP checkpoint restores onto one device without FSDP, and a one-device one into FSDP shardings."""
  assert report["restore"]["fsdp_to_one_device"] == {"equal": True, "step": 3}
  assert report["restore"]["one_device_to_fsdp"] == {"equal": True, "step": 3,
                                                     "wi_spec": "P('expert', 'data', 'model')"}


@pytest.mark.slow
def test_fsdp_lowers_per_device_argument_memory_and_gathers_weights(report):
  mem = report["compiled"]
  plain, fsdp = mem["plain"], mem["fsdp"]
  # Parameters + optimizer state are most of the arguments (the batch is the rest): 4x data -> well under half.
  assert fsdp["arguments"] < 0.5 * plain["arguments"], mem
  assert fsdp["parameters"] + fsdp["optimizer_state"] < 0.4 * (plain["parameters"] + plain["optimizer_state"]), mem
  # Weights are now gathered where they are used.
  assert fsdp["collectives"]["all-gather"]["bytes"] > plain["collectives"]["all-gather"]["bytes"], mem


# ---------------------------------------------------------------------------------------------------------
# The child process.


def _child(out_path: str, work: str) -> None:
  import gin
  import numpy as np

  from helpers_train import FEATURE_LENGTHS, _flat_params, run_train, tiny_model
  from stmoe import checkpoints
  from stmoe.training import aot, optimizers, state as state_lib, trainer

  assert jax.device_count() == 8, jax.devices()
  opt = optimizers.adafactor(learning_rate=0.05)
  # Clears gin (FSDP off). Token groups of 8: each device's rows hold whole groups, so every mesh routes the
  # same groups as one device (stmoe/moe/grouping.py; capacity is per group).
  model = tiny_model(group_size=8)
  one = partitioning.make_mesh(devices=jax.devices()[:1])
  mesh = partitioning.make_mesh(2)  # data 4 x expert 2
  shapes = trainer.input_shapes_for("encoder_decoder", 8, FEATURE_LENGTHS)
  tx = optimizers.make_optimizer(opt, model.params_logical_axes(shapes), jax.eval_shape(
      lambda: model.get_initial_variables(jax.random.PRNGKey(0), shapes)["params"]))
  report: dict = {"losses": {}}

  def use_fsdp(on: bool) -> None:
    gin.clear_config()
    if on:  # the shipped switch, with the threshold lowered to the tiny model's sizes
      gin.parse_config_files_and_bindings([FSDP_GIN], [f"FSDP_MIN_SIZE = {MIN_SIZE}"])

  def compiled_report(on: bool) -> dict:
    use_fsdp(on)
    step = aot.compile_train_step(model, mesh, batch_size=8, task_feature_lengths=FEATURE_LENGTHS, optimizer=opt)
    r = aot.analyse(step, hbm_gib=None)
    return {**r["memory_per_chip_bytes"], "collectives": r["collectives"], "compile_seconds": r["compile_seconds"]}

  report["compiled"] = {"plain": compiled_report(False)}
  use_fsdp(False)
  ref = run_train(os.path.join(work, "one"), steps=3, mesh=one, optimizer=opt, model=model)
  report["losses"]["one_device"] = [ref.losses[s] for s in sorted(ref.losses)]
  report["compiled"]["fsdp"] = compiled_report(True)
  fsdp = run_train(os.path.join(work, "fsdp"), steps=3, mesh=mesh, optimizer=opt, model=model)
  report["losses"]["fsdp_data4_expert2"] = [fsdp.losses[s] for s in sorted(fsdp.losses)]

  def specs(tree) -> dict:
    return {partitioning.path_str(p): [str(x.sharding.spec), list(x.addressable_shards[0].data.shape)]
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

  params = fsdp.state["params"]
  report["param_specs"] = specs(params)
  report["large_params"] = [partitioning.path_str(p) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
                            if x.size >= MIN_SIZE]
  # Adafactor's second moments of the tiny model are not factored (dims < 128): same shape as the parameter.
  report["opt_specs"] = {k.split("/inner_state/v/", 1)[1]: v for k, v in specs(fsdp.state["opt_state"]).items()
                         if "/inner_state/v/" in k}

  def restore(run: str, target_mesh: Any, on: bool) -> Any:
    use_fsdp(on)
    spec = state_lib.state_spec(model, tx, shapes, target_mesh)
    state, _ = checkpoints.restore_train_state(os.path.join(work, run), spec.abstract)
    return state

  def equal(restored: Any, trained: Any) -> bool:
    got, want = _flat_params(restored), _flat_params(trained)
    return set(got) == set(want) and all(np.array_equal(v, want[k]) for k, v in got.items())

  got = restore("fsdp", one, False)
  report["restore"] = {"fsdp_to_one_device": {"equal": equal(got["params"], fsdp.state["params"]),
                                              "step": int(got["step"])}}
  got = restore("one", mesh, True)
  report["restore"]["one_device_to_fsdp"] = {
      "equal": equal(got["params"], ref.state["params"]),
      "step": int(got["step"]),
      "wi_spec": str(got["params"]["encoder"]["layer_1"]["moe"]["experts"]["wi"].sharding.spec)}
  with open(out_path, "w") as f:
    json.dump(report, f, indent=1)


if __name__ == "__main__":
  mode, *rest = sys.argv[1:]
  {"child": _child}[mode](*rest)
