"""MoeLayer: the three dispatch paths agree, a per-token loop reference matches, padding, jitter, dtypes."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_reference as ref
from stmoe.config import MoeConfig
from stmoe.moe import MoeAux, MoeLayer
from stmoe.moe import dispatch as dispatch_lib

D = 8


def _cfg(**kw) -> MoeConfig:
  base = dict(num_experts=4, num_selected_experts=2, d_ff=16, group_size=8, train_capacity_factor=1.0,
              eval_capacity_factor=1.0, min_expert_capacity=1)
  base.update(kw)
  return MoeConfig(**base)


def _x(b=2, l=8, seed=0, dtype=jnp.float32):
  return jax.random.normal(jax.random.PRNGKey(seed), (b, l, D)).astype(dtype)


def _init(cfg, x, dtype=jnp.float32, causal=False):
  layer = MoeLayer(cfg, dtype=dtype, causal=causal)
  return layer, nn.unbox(layer.init({"params": jax.random.PRNGKey(1)}, x, deterministic=True))


def _run(layer, params, x, mask=None, deterministic=True, rng=0):
  """(y, aux, router output) of one call."""
  (y, aux), state = layer.apply(params, x, mask, deterministic=deterministic, rngs={"dropout": jax.random.PRNGKey(rng)},
                                capture_intermediates=lambda m, name: m.name == "router")
  return y, aux, state["intermediates"]["router"]["__call__"][0]


def _np_params(params):
  return {k: np.asarray(v, np.float64) for k, v in params["params"]["experts"].items()}


def _reference(cfg, x, mask, params, route_out, cap):
  """Per-token loop reference of the whole layer from the layer's router logits."""
  logits = np.asarray(route_out.router_logits, np.float64)
  g, t = logits.shape[:2]
  xg = np.asarray(x, np.float64).reshape(-1, D)
  mg = np.ones(xg.shape[0]) if mask is None else np.asarray(mask, np.float64).reshape(-1)
  extra = g * t - xg.shape[0]
  xg = np.pad(xg, ((0, extra), (0, 0))).reshape(g, t, D)
  mg = np.pad(mg, (0, extra)).reshape(g, t)
  if cfg.router_type == "expert_choice":
    route = ref.expert_choice(logits, mg, cap=cap)
  else:
    route = ref.tokens_choose(logits, mg, k=cfg.num_selected_experts, cap=cap, renormalize=cfg.renormalize,
                              bpr=cfg.batch_prioritized_routing)
  y = ref.moe_layer(xg, mg, _np_params(params), route, cfg.activations)
  return y.reshape(-1, D)[:x.shape[0] * x.shape[1]].reshape(x.shape), route, mg


@pytest.mark.parametrize("activations", [("relu",), ("gelu", "linear")])
def test_dispatch_paths_agree_when_nothing_drops(activations):
  x = _x()
  mask = np.ones((2, 8), np.float32)
  mask[1, 5:] = 0
  outs, grads = {}, {}
  for name in ("einsum", "sort", "grouped", "dropless", "ragged"):
    disp = "dropless" if name == "ragged" else name
    cfg = _cfg(dispatch=disp, activations=activations, train_capacity_factor=4.0, eval_capacity_factor=4.0,
               dropless_impl="ragged" if name == "ragged" else "blocked", dropless_block_size=4)
    layer, params = _init(cfg, x)
    y, aux, _ = _run(layer, params, x, mask)
    assert float(aux.fraction_tokens_left_behind) == 0.0
    outs[name] = np.asarray(y)
    loss = lambda p, inp: jnp.sum(layer.apply(p, inp, mask, deterministic=True)[0] ** 2)
    grads[name] = jax.grad(loss, argnums=(0, 1))(params, x)
  for name in ("sort", "grouped", "dropless", "ragged"):
    np.testing.assert_allclose(outs[name], outs["einsum"], atol=1e-6, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grads[name], grads["einsum"])
  np.testing.assert_array_equal(outs["sort"][1, 5:], 0.0)  # padding outputs exactly zero


@pytest.mark.parametrize("renormalize", ["none", "after_drop"])
@pytest.mark.parametrize("dispatch", ["einsum", "sort", "grouped"])
def test_layer_matches_per_token_loop_reference_with_drops(dispatch, renormalize):
  cfg = _cfg(dispatch=dispatch, renormalize=renormalize, activations=("gelu", "linear"), train_capacity_factor=0.5)
  x = _x(seed=3)
  mask = np.ones((2, 8), np.float32)
  mask[0, 6:] = 0
  layer, params = _init(cfg, x)
  y, aux, route = _run(layer, params, x, mask, deterministic=False)
  assert route.capacity == 1  # round(0.5 * 8 / 4)
  want, r, mg = _reference(cfg, x, mask, params, route, 1)
  np.testing.assert_allclose(np.asarray(y), want, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(route.kept), r["kept"])
  left = (mg > 0) & ~r["kept"].any(-1)
  assert left.any()  # some real tokens got no expert ...
  np.testing.assert_array_equal(np.asarray(y).reshape(-1, D)[left.reshape(-1)], 0.0)  # ... and output zero
  np.testing.assert_allclose(float(aux.fraction_tokens_left_behind), left.sum() / mg.sum(), rtol=1e-6)
  kept_real = r["kept"] & (mg[..., None] > 0)
  np.testing.assert_allclose(float(aux.expert_usage), kept_real.sum() / (4 * 1 * 2), rtol=1e-6)
  np.testing.assert_allclose(float(aux.router_confidence), (r["gate"] * kept_real).sum() / mg.sum(), rtol=1e-5)
  fr = np.array([((r["expert"] == e) & kept_real).sum() for e in range(4)]) / mg.sum()
  np.testing.assert_allclose(np.asarray(aux.expert_fractions), fr, rtol=1e-6)


def test_einsum_sort_grouped_agree_with_drops_and_bpr():
  x = _x(b=4, l=8, seed=5)
  outs = []
  for dispatch in ("einsum", "sort", "grouped"):
    cfg = _cfg(dispatch=dispatch, batch_prioritized_routing=True, num_selected_experts=1, train_capacity_factor=1.0)
    layer, params = _init(cfg, x)
    y, aux, route = _run(layer, params, x, deterministic=False)
    assert 0 < float(aux.fraction_tokens_left_behind) < 1
    outs.append(np.asarray(y))
  np.testing.assert_allclose(outs[0], outs[1], atol=1e-6)
  np.testing.assert_allclose(outs[2], outs[1], atol=1e-6)
  want, _, _ = _reference(cfg, x, None, params, route, route.capacity)
  np.testing.assert_allclose(outs[1], want, atol=1e-5)


def test_uneven_token_count_pads_last_group_and_expert_choice_reference():
  cfg = _cfg(dispatch="sort", router_type="expert_choice", group_size=8, train_capacity_factor=2.0)
  x = _x(b=3, l=5, seed=7)  # 15 tokens -> 2 groups of 8, the last with one masked padding token
  layer, params = _init(cfg, x)
  y, aux, route = _run(layer, params, x, deterministic=False)
  assert np.asarray(route.kept).shape == (2, 8, 4)
  want, _, _ = _reference(cfg, x, None, params, route, route.capacity)
  np.testing.assert_allclose(np.asarray(y), want, atol=1e-5)
  assert float(aux.auxiliary_loss) == 0.0


def test_single_token_decoding_uses_one_group():
  cfg = _cfg(dispatch="sort", group_size=512)
  x = _x(b=2, l=1)
  layer, params = _init(cfg, x, causal=True)
  y, aux, route = _run(layer, params, x)
  assert route.kept.shape[:2] == (1, 2) and y.shape == x.shape
  want, _, _ = _reference(cfg, x, None, params, route, route.capacity)
  np.testing.assert_allclose(np.asarray(y), want, atol=1e-5)


def test_padding_tokens_not_routed_and_not_counted():
  cfg = _cfg(dispatch="sort", group_size=16, train_capacity_factor=8.0, eval_capacity_factor=8.0)
  x = _x(b=1, l=8, seed=9)
  mask = np.array([[1, 1, 1, 1, 1, 0, 0, 0]], np.float32)
  layer, params = _init(cfg, x)
  y, aux, route = _run(layer, params, x, mask)
  y_trim, aux_trim, _ = _run(layer, params, x[:, :5])
  np.testing.assert_array_equal(np.asarray(y)[:, 5:], 0.0)
  np.testing.assert_allclose(np.asarray(y)[:, :5], np.asarray(y_trim), atol=1e-6)
  # expert_usage is per buffer slot, and the slot count depends on the group size; the rest must agree.
  for field in ("auxiliary_loss", "router_z_loss", "fraction_tokens_left_behind", "router_confidence",
                "expert_fractions"):
    np.testing.assert_allclose(getattr(aux, field), getattr(aux_trim, field), rtol=1e-5, atol=1e-7)
  assert float(aux.auxiliary_loss) > 0 and float(aux.router_z_loss) > 0
  assert not np.asarray(route.kept)[0, 5:].any()


def test_jitter_changes_only_router_logits():
  cfg = _cfg(dispatch="sort", jitter_noise=0.5, train_capacity_factor=4.0, eval_capacity_factor=4.0)
  x = _x(seed=2)
  layer, params = _init(cfg, x)
  _, _, r_det = _run(layer, params, x, deterministic=True)
  _, _, r_train = _run(layer, params, x, deterministic=False)
  assert not np.allclose(np.asarray(r_det.router_logits), np.asarray(r_train.router_logits))
  # With a zero router the logits are 0 with or without jitter, so routing is identical; outputs can then
  # only differ if the jitter had reached the expert inputs.
  zero = jax.tree_util.tree_map_with_path(
      lambda p, v: jnp.zeros_like(v) if "router" in jax.tree_util.keystr(p) else v, params)
  y_det, _, _ = _run(layer, zero, x, deterministic=True)
  y_train, _, _ = _run(layer, zero, x, deterministic=False)
  np.testing.assert_array_equal(np.asarray(y_det), np.asarray(y_train))


@pytest.mark.parametrize("dispatch", ["einsum", "sort", "grouped", "dropless"])
def test_bfloat16_activations_float32_router(dispatch):
  cfg = _cfg(dispatch=dispatch, train_capacity_factor=4.0, eval_capacity_factor=4.0)
  x32 = _x(seed=4)
  layer, params = _init(cfg, x32.astype(jnp.bfloat16), dtype=jnp.bfloat16)
  y, aux, route = _run(layer, params, x32.astype(jnp.bfloat16))
  assert y.dtype == jnp.bfloat16 and route.router_logits.dtype == jnp.float32
  assert route.combine_weights.dtype == jnp.float32 and aux.router_z_loss.dtype == jnp.float32
  y32, _, _ = _run(MoeLayer(cfg), params, x32)
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y32), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("dispatch", ["einsum", "sort", "grouped", "dropless"])
def test_router_gets_gradient_from_output_alone(dispatch):
  cfg = _cfg(dispatch=dispatch, aux_loss_coef=0.0, router_z_loss_coef=0.0)
  x = _x(seed=6)
  layer, params = _init(cfg, x)
  g = jax.grad(lambda p: jnp.sum(layer.apply(p, x, deterministic=True)[0] ** 2))(params)
  assert float(jnp.abs(g["params"]["router"]["w"]).max()) > 1e-6


def test_params_names_axes_and_init():
  cfg = _cfg(activations=("gelu", "linear"), num_experts=4, d_ff=64)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 32))
  boxed = MoeLayer(cfg).init({"params": jax.random.PRNGKey(1)}, x, deterministic=True)["params"]
  assert set(boxed) == {"router", "experts"} and set(boxed["experts"]) == {"wi_0", "wi_1", "wo"}
  assert boxed["experts"]["wi_0"].names == ("expert", "embed", "mlp")
  assert boxed["experts"]["wo"].names == ("expert", "mlp", "embed")
  assert boxed["experts"]["wo"].value.shape == (4, 64, 32)
  np.testing.assert_allclose(float(jnp.std(boxed["experts"]["wi_0"].value)), 32**-0.5, rtol=0.15)


def test_expert_dropout_only_in_training():
  cfg = _cfg(dispatch="sort", expert_dropout=0.5, train_capacity_factor=4.0, eval_capacity_factor=4.0)
  x = _x()
  layer, params = _init(cfg, x)
  a, _, _ = _run(layer, params, x, deterministic=True, rng=0)
  b, _, _ = _run(layer, params, x, deterministic=True, rng=1)
  c, _, _ = _run(layer, params, x, deterministic=False, rng=0)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c))


def test_decoder_rejects_encoder_only_routing():
  x = _x()
  with pytest.raises(ValueError, match="encoder-only"):
    _init(_cfg(router_type="expert_choice"), x, causal=True)
  with pytest.raises(ValueError, match="leaks the"):
    _init(_cfg(batch_prioritized_routing=True), x, causal=True)
  with pytest.raises(ValueError, match="dropless"):
    _init(_cfg(router_type="expert_choice", dispatch="dropless"), x)


def test_noisy_top_k_layer_drops_nothing():
  cfg = _cfg(router_type="noisy_top_k", dispatch="sort", num_selected_experts=2)
  x = _x(b=4, seed=8)
  layer, params = _init(cfg, x)
  y, aux, route = _run(layer, params, x, deterministic=False)
  assert float(aux.fraction_tokens_left_behind) == 0.0 and bool(np.asarray(route.kept).all())
  assert float(aux.auxiliary_loss) > 0
  assert isinstance(aux, MoeAux) and aux.expert_fractions.shape == (4,)


_SHARDED_SCRIPT = r"""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from stmoe.config import MoeConfig
from stmoe.moe import MoeLayer
rules = (("batch", ("data", "expert")), ("expert", "expert"), ("expert_group", "data"), ("mlp", None),
         ("embed", None), ("unmodeled", None), ("capacity", None), ("length", None))
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "expert"), axis_types=(AxisType.Auto,) * 2)
x = jax.random.normal(jax.random.PRNGKey(0), (8, 16, 8))
for dispatch in ("einsum", "sort", "grouped", "dropless"):
  cfg = MoeConfig(num_experts=4, d_ff=16, group_size=16, dispatch=dispatch, train_capacity_factor=1.0)
  layer = MoeLayer(cfg)
  boxed = layer.init({"params": jax.random.PRNGKey(1)}, x, deterministic=True)
  params = nn.unbox(boxed)
  want = layer.apply(params, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(2)})[0]
  specs = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
  # jax.set_mesh: flax applies the logical constraints, and the layer splits its groups over data x expert
  # (8 devices x 16 tokens = 8 groups of 16, the same groups as unsharded).
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    sharded = jax.device_put(params, specs)
    assert sharded["params"]["experts"]["wi"].sharding.spec == P("expert", None, None)
    xs = jax.device_put(x, NamedSharding(mesh, P(("data", "expert"))))
    fn = jax.jit(lambda p, x: layer.apply(p, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(2)})[0])
    got = fn(sharded, xs)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  print("OK", dispatch)
"""


def test_sharded_over_data_and_expert_mesh_matches_unsharded(tmp_path):
  """8 simulated CPU devices, mesh data=2 x expert=4, expert params sharded by their logical axes."""
  import os
  import subprocess
  import sys
  script = tmp_path / "sharded.py"
  script.write_text(_SHARDED_SCRIPT)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  res = subprocess.run([sys.executable, "-P", str(script)], capture_output=True, text=True, env=env,
                       cwd=str(tmp_path), timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  assert res.stdout.count("OK") == 4


def test_block_grouped_matmul_with_empty_experts_and_slack():
  rs = np.random.RandomState(0)
  x = rs.randn(6, 4, 3).astype(np.float32)  # 6 blocks of 4 rows; blocks 4-5 are slack
  w = rs.randn(3, 3, 5).astype(np.float32)
  start, end = np.array([0, 2, 2], np.int32), np.array([2, 2, 4], np.int32)  # expert 1 has no rows
  owner = {0: 0, 1: 0, 2: 2, 3: 2}
  want = np.stack([x[b] @ w[owner[b]] if b in owner else np.zeros((4, 5)) for b in range(6)])
  fn = lambda x, w: dispatch_lib.block_grouped_matmul(x, w, jnp.asarray(start), jnp.asarray(end))
  np.testing.assert_allclose(np.asarray(fn(x, w)), want, atol=1e-5)
  dy = rs.randn(6, 4, 5).astype(np.float32)
  dx, dw = jax.vjp(fn, x, w)[1](jnp.asarray(dy))
  want_dx = np.stack([dy[b] @ w[owner[b]].T if b in owner else np.zeros((4, 3)) for b in range(6)])
  want_dw = np.zeros_like(w)
  for b, e in owner.items():
    want_dw[e] += x[b].T @ dy[b]
  np.testing.assert_allclose(np.asarray(dx), want_dx, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dw), want_dw, atol=1e-5)
