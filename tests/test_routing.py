"""Routers and router losses against the NumPy loop references in tests/moe_reference.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_reference as ref
from stmoe.config import MoeConfig
from stmoe.moe import routing

G, T, E = 2, 12, 4


def _logits(seed=0, g=G, t=T, e=E, scale=2.0):
  return np.random.RandomState(seed).randn(g, t, e).astype(np.float32) * scale


def _mask(g=G, t=T, pad=3):
  m = np.ones((g, t), np.float32)
  m[:, t - pad:] = 0
  return m


_check_route = ref.check_route  # shared with the other router tests


@pytest.mark.parametrize("k,cap", [(1, 2), (1, 4), (2, 3), (2, 12), (3, 4)])
def test_tokens_choose_top_k_matches_reference(k, cap):
  logits, mask = _logits(k), _mask()
  out = routing.tokens_choose_top_k(jnp.asarray(logits), jnp.asarray(mask), num_selected=k, capacity=cap)
  want = ref.tokens_choose(logits, mask, k=k, cap=cap)
  _check_route(out, want)
  if cap < T:
    assert not want["kept"].all() and want["kept"][..., 0].any()  # the case really drops tokens


def test_first_choices_get_slots_before_second_choices():
  # Every token prefers expert 0 first and expert 1 second; capacity 3 fills expert 0 with tokens 0-2,
  # then expert 1 gets the *first* choices of nobody and the second choices of tokens 0-2.
  logits = np.tile(np.array([5.0, 4.0, 0.0, -1.0], np.float32), (1, 6, 1))
  logits[0, 5] = [0.0, 5.0, 4.0, -1.0]  # token 5 picks expert 1 first: it must beat earlier second choices
  out = routing.tokens_choose_top_k(jnp.asarray(logits), None, num_selected=2, capacity=3)
  kept, pos = np.asarray(out.kept)[0], np.asarray(out.position)[0]
  assert kept[5, 0] and pos[5, 0] == 0  # first choice of token 5 is slot 0 of expert 1
  assert kept[:3, 0].all() and not kept[3:5, 0].any()
  np.testing.assert_array_equal(pos[:2, 1], [1, 2])  # second choices of tokens 0, 1 after it
  assert not kept[2:5, 1].any()


@pytest.mark.parametrize("renormalize", ["none", "before_drop", "after_drop"])
@pytest.mark.parametrize("bpr", [False, True])
def test_top2_renormalisation_and_bpr(renormalize, bpr):
  logits, mask = _logits(7), _mask()
  out = routing.tokens_choose_top_k(jnp.asarray(logits), jnp.asarray(mask), num_selected=2, capacity=3,
                                    renormalize=renormalize, batch_prioritized=bpr)
  _check_route(out, ref.tokens_choose(logits, mask, k=2, cap=3, renormalize=renormalize, bpr=bpr))


def test_bpr_admits_confident_tokens_first():
  logits = _logits(3)
  plain = routing.tokens_choose_top_k(jnp.asarray(logits), None, num_selected=1, capacity=2)
  bpr = routing.tokens_choose_top_k(jnp.asarray(logits), None, num_selected=1, capacity=2, batch_prioritized=True)
  assert not np.array_equal(np.asarray(plain.kept), np.asarray(bpr.kept))
  probs = ref.softmax(logits)
  for g in range(G):  # every kept token is at least as confident as every dropped token of its expert
    for e in range(E):
      sel = np.asarray(bpr.expert_index)[g, :, 0] == e
      k_ = np.asarray(bpr.kept)[g, :, 0] & sel
      d_ = ~np.asarray(bpr.kept)[g, :, 0] & sel
      if k_.any() and d_.any():
        assert probs[g, k_].max(-1).min() >= probs[g, d_].max(-1).max()


@pytest.mark.parametrize("policy", ["sampling", "random"])
@pytest.mark.parametrize("renormalize", ["none", "before_drop", "after_drop"])
def test_second_expert_policies_with_fixed_draws(policy, renormalize):
  logits, mask = _logits(11, scale=1.0), _mask()
  uniform = np.random.RandomState(5).uniform(size=(G, T)).astype(np.float32)
  out = routing.tokens_choose_top_k(jnp.asarray(logits), jnp.asarray(mask), num_selected=2, capacity=6,
                                    renormalize=renormalize, second_expert_policy=policy,
                                    second_expert_threshold=0.6, uniform=jnp.asarray(uniform))
  want = ref.tokens_choose(logits, mask, k=2, cap=6, renormalize=renormalize, policy=policy, threshold=0.6,
                           uniform=uniform)
  _check_route(out, want)
  top2 = ref.tokens_choose(logits, mask, k=2, cap=6, renormalize=renormalize)
  if policy == "sampling":  # some second experts differ from the plain top-2 choice
    assert (want["expert"][..., 1] != top2["expert"][..., 1]).any()
  else:  # some second experts are not kept
    assert (top2["kept"][..., 1] & ~want["kept"][..., 1]).any()


def test_router_module_draws_policy_uniforms_from_dropout_rng():
  cfg = MoeConfig(num_experts=E, second_expert_policy="random")
  x = jax.random.normal(jax.random.PRNGKey(0), (G, T, 8))
  router = routing.Router(cfg)
  params = router.init({"params": jax.random.PRNGKey(1)}, x, None, capacity=T, deterministic=True)
  out = router.apply(params, x, None, capacity=T, deterministic=False, rngs={"dropout": jax.random.PRNGKey(7)})
  # Reproduce the draw: the router's first (and only) use of the "dropout" stream.
  uniform = router.apply(params, x, None, capacity=T, deterministic=False, rngs={"dropout": jax.random.PRNGKey(7)},
                         method=lambda m, *a, **k: m.make_rng("dropout"))
  u = np.asarray(jax.random.uniform(uniform, (G, T)))
  logits = np.asarray(out.router_logits)
  _check_route(out, ref.tokens_choose(logits, None, k=2, cap=T, policy="random", uniform=u))
  det = router.apply(params, x, None, capacity=T, deterministic=True)
  assert np.asarray(det.kept).all()  # deterministic: policy off, both experts kept


def test_second_policy_needs_top2():
  with pytest.raises(ValueError, match="top-2"):
    routing.tokens_choose_top_k(jnp.zeros((1, 4, 4)), None, num_selected=3, capacity=4,
                                second_expert_policy="random", uniform=jnp.zeros((1, 4)))


@pytest.mark.parametrize("cap", [2, 5, 12])
def test_expert_choice_matches_reference(cap):
  logits, mask = _logits(13), _mask()
  out = routing.expert_choice(jnp.asarray(logits), jnp.asarray(mask), capacity=cap)
  _check_route(out, ref.expert_choice(logits, mask, cap=cap))
  assert float(out.auxiliary_loss) == 0.0
  np.testing.assert_allclose(float(out.router_z_loss), ref.z_loss(logits, mask), rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("noise", [False, True])
def test_noisy_top_k_matches_reference(k, noise):
  rs = np.random.RandomState(17)
  clean = rs.randn(G, T, E).astype(np.float32)
  std = np.log1p(np.exp(rs.randn(G, T, E))).astype(np.float32)  # softplus
  normal = rs.randn(G, T, E).astype(np.float32) if noise else None
  mask = _mask()
  out = routing.noisy_top_k(jnp.asarray(clean), jnp.asarray(std), jnp.asarray(mask), num_selected=k,
                            normal=None if normal is None else jnp.asarray(normal))
  dense, aux = ref.noisy_top_k(clean, std, mask, k=k, normal=normal)
  got = np.zeros((G, T, E))
  for j in range(k):
    np.put_along_axis(got, np.asarray(out.expert_index)[..., j:j + 1],
                      np.asarray(out.combine_weights)[..., j:j + 1], axis=-1)
  np.testing.assert_allclose(got, dense, atol=1e-6)
  np.testing.assert_allclose(float(out.auxiliary_loss), aux, rtol=1e-4)
  assert np.asarray(out.kept)[:, :T - 3].all() and not np.asarray(out.kept)[:, T - 3:].any()


def test_noisy_router_zero_noise_weights_and_deterministic():
  cfg = MoeConfig(num_experts=E, router_type="noisy_top_k")
  x = jax.random.normal(jax.random.PRNGKey(0), (G, T, 8))
  router = routing.Router(cfg)
  params = router.init({"params": jax.random.PRNGKey(1)}, x, None, capacity=T, deterministic=True)
  assert set(params["params"]) == {"w", "w_noise"}
  det = router.apply(params, x, None, capacity=T, deterministic=True)
  dense, aux = ref.noisy_top_k(np.asarray(det.router_logits), None, None, k=2, normal=None)
  np.testing.assert_allclose(float(det.auxiliary_loss), aux, rtol=1e-5)
  train = router.apply(params, x, None, capacity=T, deterministic=False, rngs={"dropout": jax.random.PRNGKey(2)})
  assert not np.allclose(np.asarray(train.combine_weights), np.asarray(det.combine_weights))


@pytest.mark.parametrize("count", ["top1", "all"])
def test_losses_match_formulas(count):
  logits, mask = _logits(21), _mask()
  out = routing.tokens_choose_top_k(jnp.asarray(logits), jnp.asarray(mask), num_selected=2, capacity=2,
                                    load_balance_count=count)
  want = ref.load_balance(logits, np.asarray(out.expert_index), mask, count)
  np.testing.assert_allclose(float(out.auxiliary_loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(out.router_z_loss), ref.z_loss(logits, mask), rtol=1e-5)
  # Padding tokens are excluded: changing their logits changes nothing.
  logits2 = logits.copy()
  logits2[:, -3:] = 50.0
  out2 = routing.tokens_choose_top_k(jnp.asarray(logits2), jnp.asarray(mask), num_selected=2, capacity=2,
                                     load_balance_count=count)
  np.testing.assert_allclose(float(out2.auxiliary_loss), float(out.auxiliary_loss), rtol=1e-6)
  np.testing.assert_allclose(float(out2.router_z_loss), float(out.router_z_loss), rtol=1e-6)
  assert not np.asarray(out2.kept)[:, -3:].any()


def test_load_balance_uniform_router_values():
  logits = np.zeros((1, 8, 4), np.float32)  # uniform probs: P_i = 1/4
  expert = np.tile(np.array([[0, 1], [1, 2], [2, 3], [3, 0]]), (2, 1))[None]
  for count, want in (("top1", 1.0), ("all", 2.0)):
    got = routing.load_balancing_loss(jax.nn.softmax(jnp.asarray(logits)), jnp.asarray(expert), None, count)
    np.testing.assert_allclose(float(got), want, rtol=1e-6)


@pytest.mark.parametrize("convention,cf,absolute", [("stmoe", 1.25, None), ("stmoe", 2.0, None), ("stmoe", 0.1, None),
                                                     ("gshard", 1.0, None), ("absolute", 1.0, 7)])
@pytest.mark.parametrize("group", [3, 512, 1000])
def test_capacity_conventions(convention, cf, absolute, group):
  cfg = MoeConfig(num_experts=8, capacity_convention=convention, train_capacity_factor=cf, eval_capacity_factor=cf,
                  expert_capacity=absolute)
  want = ref.capacity(convention, group, 8, cf, 4, absolute)
  assert routing.expert_capacity(cfg, group, deterministic=False) == want
  if (convention, cf, group) == ("stmoe", 1.25, 512):
    assert want == 80
  if (convention, group) == ("gshard", 1000):
    assert want == 250


def test_router_param_and_float32_under_bfloat16():
  cfg = MoeConfig(num_experts=E, jitter_noise=0.1)
  x = jax.random.normal(jax.random.PRNGKey(0), (G, T, 8)).astype(jnp.bfloat16)
  router = routing.Router(cfg)
  params = router.init({"params": jax.random.PRNGKey(1)}, x, None, capacity=T, deterministic=True)
  w = params["params"]["w"]
  assert w.names == ("embed", "unmodeled") and w.value.dtype == jnp.float32
  assert 0.01 < float(jnp.std(w.value)) < 0.04
  out = router.apply(params, x, None, capacity=T, deterministic=False, rngs={"dropout": jax.random.PRNGKey(3)})
  assert out.router_logits.dtype == jnp.float32 and out.combine_weights.dtype == jnp.float32
  det = router.apply(params, x, None, capacity=T, deterministic=True)
  want = np.asarray(x, np.float32) @ np.asarray(w.value)
  np.testing.assert_allclose(np.asarray(det.router_logits), want, atol=1e-5)
  assert not np.allclose(np.asarray(out.router_logits), want, atol=1e-5)  # jitter applied in training
