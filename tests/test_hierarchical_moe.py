"""Hierarchical MoE router (Shazeer et al. 2017, Appendix B) against the NumPy reference in moe_reference.py."""

from __future__ import annotations

import pathlib
import re
from functools import partial

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_reference as ref
from stmoe.config import ModelConfig, MoeConfig, SparseLayout
from stmoe.moe import MoeLayer
from stmoe.moe import routing

G, T, A, B = 2, 10, 3, 4  # token groups, tokens per group, expert groups, experts per group
D = 8


def _inputs(seed: int, noise: bool):
  """Clean logits, noise stds and N(0, 1) draws of both levels, and a mask with padding."""
  rs = np.random.RandomState(seed)
  primary = rs.randn(G, T, A).astype(np.float32)
  clean = (rs.randn(G, T, A, B) * 1.5).astype(np.float32)
  primary_std = np.log1p(np.exp(rs.randn(G, T, A))).astype(np.float32)  # softplus
  std = np.log1p(np.exp(rs.randn(G, T, A, B))).astype(np.float32)
  primary_normal = rs.randn(G, T, A).astype(np.float32) if noise else None
  normal = rs.randn(G, T, A, B).astype(np.float32) if noise else None
  mask = np.ones((G, T), np.float32)
  mask[1, T - 3:] = 0
  return primary, primary_std, clean, std, primary_normal, normal, mask


@partial(jax.jit, static_argnames=("kp", "ks", "cap", "renormalize"))
def _route_and_balance(primary, primary_std, clean, std, mask, primary_normal, normal, *, kp, ks, cap, renormalize):
  """The router's output, and Importance_H / Load_H from the same gates (one compilation per case)."""
  out = routing.hierarchical_noisy_top_k(primary, primary_std, clean, std, mask, num_selected_groups=kp,
                                         num_selected=ks, capacity=cap, renormalize=renormalize,
                                         primary_normal=primary_normal, normal=normal)
  importance, load = routing.hierarchical_balance(routing.noisy_gating(primary, primary_std, kp, primary_normal),
                                                  routing.noisy_gating(clean, std, ks, normal), mask)
  g = mask.shape[0]
  losses = (routing.cv_squared(importance.reshape(g, -1)), routing.cv_squared(load.reshape(g, -1)))
  return out, importance, load, losses


_check_route = ref.check_route  # shared with the other router tests


@pytest.mark.parametrize("noise,cap,kp,ks,renormalize", [
    (False, T, 2, 2, "none"),  # no noise, nothing dropped
    (True, T, 2, 2, "none"),  # fixed noise at both levels
    (True, 3, 2, 2, "none"),  # capacity drops
    (True, 2, 1, 3, "after_drop"),
    (True, T, 3, 1, "none"),  # primary picks every group: Load_primary is a count
])
def test_router_matches_reference(noise, cap, kp, ks, renormalize):
  primary, primary_std, clean, std, primary_normal, normal, mask = _inputs(3, noise)
  out, importance, load, (importance_loss, load_loss) = _route_and_balance(
      primary, primary_std, clean, std, mask, primary_normal, normal, kp=kp, ks=ks, cap=cap,
      renormalize=renormalize)
  want, extras = ref.hierarchical(primary, primary_std, clean, std, mask, kp=kp, ks=ks, cap=cap,
                                  renormalize=renormalize, primary_normal=primary_normal, normal=normal)
  _check_route(out, want)
  assert not want["kept"][1, T - 3:].any()  # padding is never routed
  if cap < T:
    assert not want["kept"][mask > 0].all() and want["kept"][..., 0].any()  # the case really drops
  elif renormalize == "none":  # nothing dropped: each real token's weights sum to 1
    np.testing.assert_allclose(np.asarray(out.combine_weights).sum(-1), mask, atol=1e-6)

  # Importance_H, Load_H (eq. 13-14) and both losses.
  np.testing.assert_allclose(np.asarray(importance), extras["importance"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(load), extras["load"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(importance_loss), extras["importance_loss"], rtol=1e-4)
  np.testing.assert_allclose(np.asarray(load_loss), extras["load_loss"], rtol=1e-4)
  np.testing.assert_allclose(float(out.auxiliary_loss), extras["aux"], rtol=1e-4)
  np.testing.assert_allclose(float(out.router_z_loss), extras["z"], rtol=1e-5)
  # Flat logits: their softmax is softmax(primary)_i * softmax(secondary_i)_j.
  dense = (ref.softmax(primary)[..., None] * ref.softmax(clean)).reshape(G, T, A * B)
  np.testing.assert_allclose(np.asarray(out.router_probs), dense, atol=1e-6)


def test_one_group_is_flat_noisy_top_k():
  _, _, clean, std, _, normal, mask = _inputs(5, noise=True)
  clean, std, normal = (v[:, :, :1] for v in (clean, std, normal))  # a = 1 group of B experts

  @jax.jit
  def both(clean, std, mask, normal):
    ones = jnp.ones((G, T, 1))
    hier = routing.hierarchical_noisy_top_k(ones, ones, clean, std, mask, num_selected_groups=1, num_selected=2,
                                            capacity=T, primary_normal=ones, normal=normal)
    flat = routing.noisy_top_k(clean[:, :, 0], std[:, :, 0], mask, num_selected=2, normal=normal[:, :, 0])
    return hier, flat

  hier, flat = both(clean, std, mask, normal)
  np.testing.assert_array_equal(np.asarray(hier.expert_index), np.asarray(flat.expert_index))
  np.testing.assert_allclose(np.asarray(hier.combine_weights), np.asarray(flat.combine_weights), atol=1e-6)
  np.testing.assert_allclose(float(hier.auxiliary_loss), float(flat.auxiliary_loss), rtol=1e-5)


def test_load_loss_has_gradient_through_both_gates():
  primary, primary_std, clean, std, primary_normal, normal, mask = _inputs(7, noise=True)

  def load_loss(p, c):
    pg = routing.noisy_gating(p, jnp.asarray(primary_std), 2, jnp.asarray(primary_normal))
    sg = routing.noisy_gating(c, jnp.asarray(std), 2, jnp.asarray(normal))
    return jnp.mean(routing.cv_squared(routing.hierarchical_balance(pg, sg, jnp.asarray(mask))[1].reshape(G, -1)))

  dp, dc = jax.jit(jax.grad(load_loss, argnums=(0, 1)))(jnp.asarray(primary), jnp.asarray(clean))
  assert float(jnp.abs(dp).max()) > 1e-4 and float(jnp.abs(dc).max()) > 1e-4
  assert float(jnp.abs(dp[1, T - 3:]).max()) == 0.0  # padding tokens get no gradient


def test_router_module_noise_from_dropout_rng():
  cfg = MoeConfig(num_experts=A * B, router_type="hierarchical", num_expert_groups=A, num_selected_groups=2,
                  num_selected_experts=2)
  x = jnp.asarray(np.random.RandomState(0).randn(G, T, D), jnp.float32)
  router = routing.Router(cfg)
  init = jax.jit(lambda rng: nn.unbox(router.init({"params": rng}, x, None, capacity=T, deterministic=True)))
  p = init(jax.random.PRNGKey(1))["params"]
  assert {k: v.shape for k, v in p.items()} == {"w": (D, A * B), "w_noise": (D, A * B), "w_primary": (D, A),
                                                  "w_primary_noise": (D, A)}
  rs = np.random.RandomState(2)  # non-zero noise weights, so that softplus(x W_noise) varies
  p = dict(p, w_noise=jnp.asarray(rs.randn(D, A * B) * 0.5, jnp.float32),
           w_primary_noise=jnp.asarray(rs.randn(D, A) * 0.5, jnp.float32))

  @jax.jit
  def run(params, rng):
    rngs = {"dropout": rng}
    train = router.apply(params, x, None, capacity=T, deterministic=False, rngs=rngs)
    det = router.apply(params, x, None, capacity=T, deterministic=True)
    key = router.apply(params, x, None, capacity=T, deterministic=False, rngs=rngs,
                       method=lambda m, *a, **k: m.make_rng("dropout"))  # the router's one draw from the stream
    return train, det, key

  train, det, key = run({"params": p}, jax.random.PRNGKey(7))
  draw = np.asarray(jax.random.normal(key, (G, T, A + A * B)))  # both levels' N(0, 1) draws
  xn = np.asarray(x, np.float64)
  softplus = lambda v: np.log1p(np.exp(v))
  primary, clean = xn @ np.asarray(p["w_primary"]), (xn @ np.asarray(p["w"])).reshape(G, T, A, B)
  primary_std = softplus(xn @ np.asarray(p["w_primary_noise"]))
  std = softplus(xn @ np.asarray(p["w_noise"])).reshape(G, T, A, B)
  for out, noise in ((train, True), (det, False)):
    want, extras = ref.hierarchical(
        primary, primary_std, clean, std, None, kp=2, ks=2, cap=T,
        primary_normal=draw[..., :A] if noise else None, normal=draw[..., A:].reshape(G, T, A, B) if noise else None)
    _check_route(out, want)
    np.testing.assert_allclose(float(out.auxiliary_loss), extras["aux"], rtol=1e-4)
  assert not np.array_equal(np.asarray(train.expert_index), np.asarray(det.expert_index))


def _layer_cfg(dispatch):
  return MoeConfig(num_experts=12, router_type="hierarchical", num_expert_groups=4, num_selected_groups=2,
                   num_selected_experts=2, d_ff=16, group_size=8, dispatch=dispatch, train_capacity_factor=2.0,
                   eval_capacity_factor=2.0, min_expert_capacity=2)


def test_layer_einsum_and_sort_agree_and_match_reference():
  x = jnp.asarray(np.random.RandomState(0).randn(2, 8, D), jnp.float32)
  mask = np.ones((2, 8), np.float32)
  mask[1, 6:] = 0
  layers = {d: MoeLayer(_layer_cfg(d), causal=(d == "einsum")) for d in ("einsum", "sort")}  # decoders allowed
  params = jax.jit(lambda rng: nn.unbox(layers["sort"].init({"params": rng}, x, deterministic=True)))(
      jax.random.PRNGKey(1))

  @jax.jit
  def run(params, mask):
    outs = {}
    for d, layer in layers.items():
      (y, aux), state = layer.apply(params, x, mask, deterministic=True,
                                    capture_intermediates=lambda m, name: m.name == "router")
      outs[d] = (y, aux, state["intermediates"]["router"]["__call__"][0])
    return outs

  outs = run(params, mask)
  (y_e, aux_e, route), (y_s, aux_s, _) = outs["einsum"], outs["sort"]
  assert route.capacity == 2 and not np.asarray(route.kept)[mask > 0].all()  # drops happen
  assert float(aux_s.fraction_tokens_left_behind) < 0.5 and float(aux_s.auxiliary_loss) > 0
  print(f"einsum vs sort (with drops): max |dy| = {np.abs(np.asarray(y_e - y_s)).max():.2e}")
  np.testing.assert_allclose(np.asarray(y_e), np.asarray(y_s), atol=1e-5)
  np.testing.assert_allclose(float(aux_e.auxiliary_loss), float(aux_s.auxiliary_loss), rtol=1e-6)

  # Against the per-token NumPy layer, from the paper's equations and the parameters.
  p = params["params"]
  xg = np.asarray(x, np.float64)  # group_size 8: one group per sequence
  clean = (xg @ np.asarray(p["router"]["w"])).reshape(2, 8, 4, 3)
  route_ref, extras = ref.hierarchical(xg @ np.asarray(p["router"]["w_primary"]), None, clean, None, mask, kp=2, ks=2,
                                       cap=2)
  _check_route(route, route_ref)
  np.testing.assert_allclose(float(aux_s.auxiliary_loss), extras["aux"], rtol=1e-4)
  params_np = {k: np.asarray(v, np.float64) for k, v in p["experts"].items()}
  want = ref.moe_layer(xg, mask, params_np, route_ref, ("relu",))
  for d, (y, _, _) in outs.items():
    print(f"{d} vs NumPy reference: max |dy| = {np.abs(np.asarray(y) - want).max():.2e}")
    np.testing.assert_allclose(np.asarray(y), want, atol=1e-5)


def _docs_gin_snippet() -> str:
  text = (pathlib.Path(__file__).parents[1] / "docs" / "routing.md").read_text()
  section = text[text.index("### hierarchical"):]
  return re.search(r"```gin\n(.*?)```", section, re.S).group(1)


def test_gin_snippet_in_docs_binds():
  gin.clear_config()
  try:
    gin.parse_config(_docs_gin_snippet())
    cfg = MoeConfig()
  finally:
    gin.clear_config()
  assert cfg.router_type == "hierarchical" and cfg.num_experts % cfg.num_expert_groups == 0
  assert cfg.experts_per_token == cfg.num_selected_groups * cfg.num_selected_experts > 1
  ModelConfig(moe=cfg, encoder_sparse=SparseLayout("every", 2), decoder_sparse=SparseLayout("every", 2))  # decoders OK


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_experts=8, num_expert_groups=3), "divide num_experts=8"),
    (dict(num_experts=8, num_expert_groups=0), "must be >= 1"),
    (dict(num_experts=8, num_expert_groups=4, num_selected_groups=5), "num_selected_groups=5"),
    (dict(num_experts=8, num_expert_groups=4, num_selected_experts=3), "within"),
    (dict(num_experts=8, num_expert_groups=4, batch_prioritized_routing=True), "batch_prioritized_routing"),
    (dict(num_experts=8, num_expert_groups=4, second_expert_policy="random"), "second_expert_policy"),
    (dict(router_type="tokens_choose", num_expert_groups=2), "only apply to router_type='hierarchical'"),
])
def test_config_validation(kwargs, match):
  kwargs = dict(dict(router_type="hierarchical", num_selected_experts=1), **kwargs)
  with pytest.raises(ValueError, match=re.escape(match)):
    MoeConfig(**kwargs)


def test_gin_binding_error_names_the_fields():
  gin.clear_config()
  try:
    gin.parse_config("MoeConfig.router_type = 'hierarchical'\nMoeConfig.num_experts = 8\n"
                     "MoeConfig.num_expert_groups = 3")
    with pytest.raises(ValueError, match="num_expert_groups=3"):
      MoeConfig()
  finally:
    gin.clear_config()
