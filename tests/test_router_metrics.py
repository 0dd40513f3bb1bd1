"""Router balance and logit-scale metrics (MoeAux) and the importance / load loss weights, against NumPy.

The references (tests/moe_reference.py) route one token at a time *without* capacity, so they give the
router's decision before dropping; the routers under test run with a capacity that drops, so a metric
computed after dropping would not match.
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_reference as ref
from stmoe.config import MoeConfig
from stmoe.models.losses import moe_losses_and_metrics
from stmoe.moe import MoeAux, MoeLayer, routing
from stmoe.moe.metrics import aux_from_route

G, T, E = 2, 12, 4
PAD = 3  # the last PAD tokens of each group are padding
PAD_LOGIT = 40.0  # padding tokens' logits: they would dominate max |logit| and the load if they were counted


def _mask(g=G, t=T):
  m = np.ones((g, t), np.float32)
  m[:, t - PAD:] = 0
  return m


def _logits(seed, shape=(G, T, E), scale=2.0):
  v = np.random.RandomState(seed).randn(*shape).astype(np.float32) * scale
  v[:, T - PAD:] = PAD_LOGIT * np.sign(np.random.RandomState(seed + 1).randn(*v[:, T - PAD:].shape))
  return v


def _check(aux: MoeAux, want: dict) -> None:
  for key, value in want.items():
    np.testing.assert_allclose(float(getattr(aux, key)), value, rtol=2e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("renormalize,policy", [("none", "all"), ("before_drop", "all"), ("none", "random")])
def test_tokens_choose_top2_metrics(renormalize, policy):
  logits, mask = _logits(1), _mask()
  uniform = np.random.RandomState(2).uniform(size=(G, T)).astype(np.float32) if policy != "all" else None
  out = routing.tokens_choose_top_k(jnp.asarray(logits), jnp.asarray(mask), num_selected=2, capacity=3,
                                    renormalize=renormalize, second_expert_policy=policy,
                                    second_expert_threshold=0.6,
                                    uniform=None if uniform is None else jnp.asarray(uniform))
  aux = aux_from_route(out, jnp.asarray(mask), E, 3)
  assert not np.asarray(out.kept)[mask > 0].all()  # capacity drops, so "before dropping" matters
  before = ref.tokens_choose(logits, mask, k=2, cap=T, renormalize=renormalize, policy=policy, threshold=0.6,
                             uniform=uniform)  # capacity T drops nothing: kept = what the router chose
  if policy == "random":
    assert not before["kept"][mask > 0].all()  # some second choices not routed at all
  _check(aux, ref.balance_metrics(before["expert"], before["gate"], before["kept"], mask, E))
  _check(aux, ref.logit_scale(logits, mask))
  assert float(aux.router_max_abs_logit) < PAD_LOGIT
  assert aux.smooth_load_cv is None


def test_expert_choice_metrics():
  logits, mask = _logits(3), _mask()
  out = routing.expert_choice(jnp.asarray(logits), jnp.asarray(mask), capacity=4)
  want = ref.expert_choice(logits, mask, cap=4)
  aux = aux_from_route(out, jnp.asarray(mask), E, 4)
  _check(aux, ref.balance_metrics(want["expert"], want["gate"], want["kept"], mask, E))
  assert float(aux.load_cv) == 0.0 and float(aux.max_mean_load) == 1.0  # 4 real tokens per expert per group
  _check(aux, ref.logit_scale(logits, mask))


def _noisy_inputs(seed, noise):
  rs = np.random.RandomState(seed)
  clean = _logits(seed, scale=1.0)
  std = np.log1p(np.exp(rs.randn(G, T, E))).astype(np.float32)  # softplus
  normal = rs.randn(G, T, E).astype(np.float32) if noise else None
  return clean, std, normal


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("noise", [False, True])
def test_noisy_top_k_metrics(k, noise):
  clean, std, normal = _noisy_inputs(5, noise)
  mask = _mask()
  out = routing.noisy_top_k(jnp.asarray(clean), jnp.asarray(std), jnp.asarray(mask), num_selected=k,
                            normal=None if normal is None else jnp.asarray(normal))
  aux = aux_from_route(out, jnp.asarray(mask), E, T)
  dense, _ = ref.noisy_top_k(clean, std, mask, k=k, normal=normal)  # [G, T, E], 0 for padding
  importance, load = dense.sum((0, 1)), (dense > 0).sum((0, 1))
  _check(aux, dict(importance_cv=ref.cv(importance), load_cv=ref.cv(load), max_mean_load=load.max() / load.mean()))
  _check(aux, ref.logit_scale(clean, mask))
  smooth = ref.noisy_smooth_load(clean, std, mask, k=k, normal=normal)
  np.testing.assert_allclose(float(aux.smooth_load_cv), ref.cv(smooth), rtol=1e-4)
  if noise:
    assert abs(float(aux.smooth_load_cv) - float(aux.load_cv)) > 1e-3  # the smooth estimate is not the count
  else:
    np.testing.assert_allclose(float(aux.smooth_load_cv), float(aux.load_cv), rtol=1e-6)


A, B = 3, 4  # expert groups, experts per group


@partial(jax.jit, static_argnames=("kp", "ks", "cap"))
def _hierarchical_aux(primary, primary_std, clean, std, mask, primary_normal, normal, *, kp, ks, cap):
  out = routing.hierarchical_noisy_top_k(primary, primary_std, clean, std, mask, num_selected_groups=kp,
                                         num_selected=ks, capacity=cap, primary_normal=primary_normal,
                                         normal=normal)
  return out, aux_from_route(out, mask, A * B, cap)


@pytest.mark.parametrize("noise", [False, True])
def test_hierarchical_metrics(noise):
  rs = np.random.RandomState(7)
  primary = _logits(8, (G, T, A), scale=1.0)
  clean = _logits(9, (G, T, A, B), scale=1.5)
  primary_std = np.log1p(np.exp(rs.randn(G, T, A))).astype(np.float32)
  std = np.log1p(np.exp(rs.randn(G, T, A, B))).astype(np.float32)
  primary_normal = rs.randn(G, T, A).astype(np.float32) if noise else None
  normal = rs.randn(G, T, A, B).astype(np.float32) if noise else None
  mask = _mask()
  out, aux = _hierarchical_aux(primary, primary_std, clean, std, mask, primary_normal, normal, kp=2, ks=2, cap=3)
  assert not np.asarray(out.kept)[mask > 0].all()  # capacity drops
  before, _ = ref.hierarchical(primary, primary_std, clean, std, mask, kp=2, ks=2, cap=T,
                               primary_normal=primary_normal, normal=normal)
  _check(aux, ref.balance_metrics(before["expert"], before["gate"], before["kept"], mask, A * B))
  # Logit scale over the token's 1 + A gating networks.
  lse = (ref.logsumexp(primary) + ref.logsumexp(clean).sum(-1)) / (1 + A)  # [G, T]
  max_abs = np.maximum(np.abs(primary).max(-1), np.abs(clean).max((-2, -1)))  # [G, T]
  _check(aux, dict(router_logsumexp=lse[mask > 0].mean(), router_max_abs_logit=max_abs[mask > 0].max()))
  assert float(aux.router_max_abs_logit) < PAD_LOGIT
  # Smooth load: Load_H (eq. 14) with X = every real token of the batch, i.e. the batch as one group.
  one = lambda v: None if v is None else v.reshape((1, G * T) + v.shape[2:])
  _, whole = ref.hierarchical(one(primary), one(primary_std), one(clean), one(std), one(mask), kp=2, ks=2, cap=G * T,
                              primary_normal=one(primary_normal), normal=one(normal))
  np.testing.assert_allclose(float(aux.smooth_load_cv), ref.cv(whole["load"].reshape(-1)), rtol=1e-4)


# ----------------------------------------------------------------------------------------------------
# Importance / load loss weights.
# ----------------------------------------------------------------------------------------------------

WEIGHTS = [(1.0, 1.0), (0.2, 0.0), (0.0, 0.2), (0.1, 0.1), (0.01, 0.01), (1.0, 1.0)]


@pytest.mark.parametrize("w_imp,w_load", sorted(set(WEIGHTS)))
def test_noisy_top_k_loss_weights(w_imp, w_load):
  clean, std, normal = _noisy_inputs(11, noise=True)
  mask = _mask()
  args = (jnp.asarray(clean), jnp.asarray(std), jnp.asarray(mask))
  out = routing.noisy_top_k(*args, num_selected=2, normal=jnp.asarray(normal), importance_weight=w_imp,
                            load_weight=w_load)
  _, want = ref.noisy_top_k(clean, std, mask, k=2, normal=normal, w_importance=w_imp, w_load=w_load)
  np.testing.assert_allclose(float(out.auxiliary_loss), want, rtol=1e-4)
  _, imp_only = ref.noisy_top_k(clean, std, mask, k=2, normal=normal, w_importance=1.0, w_load=0.0)
  _, load_only = ref.noisy_top_k(clean, std, mask, k=2, normal=normal, w_importance=0.0, w_load=1.0)
  assert imp_only > 1e-3 and load_only > 1e-3  # both terms matter here
  np.testing.assert_allclose(float(out.auxiliary_loss), w_imp * imp_only + w_load * load_only, rtol=1e-4)
  if (w_imp, w_load) == (1.0, 1.0):  # the defaults are today's loss, bit for bit
    default = routing.noisy_top_k(*args, num_selected=2, normal=jnp.asarray(normal))
    assert float(out.auxiliary_loss) == float(default.auxiliary_loss)


@pytest.mark.parametrize("w_imp,w_load", [(1.0, 1.0), (0.2, 0.0), (0.0, 0.2)])
def test_hierarchical_loss_weights(w_imp, w_load):
  rs = np.random.RandomState(13)
  primary, clean = rs.randn(G, T, A).astype(np.float32), rs.randn(G, T, A, B).astype(np.float32)
  primary_std = np.log1p(np.exp(rs.randn(G, T, A))).astype(np.float32)
  std = np.log1p(np.exp(rs.randn(G, T, A, B))).astype(np.float32)
  primary_normal, normal = rs.randn(G, T, A).astype(np.float32), rs.randn(G, T, A, B).astype(np.float32)
  mask = _mask()
  out = routing.hierarchical_noisy_top_k(primary, primary_std, clean, std, mask, num_selected_groups=2,
                                         num_selected=1, capacity=T, primary_normal=primary_normal, normal=normal,
                                         importance_weight=w_imp, load_weight=w_load)
  _, extras = ref.hierarchical(primary, primary_std, clean, std, mask, kp=2, ks=1, cap=T,
                               primary_normal=primary_normal, normal=normal)
  want = w_imp * extras["importance_loss"].mean() + w_load * extras["load_loss"].mean()
  np.testing.assert_allclose(float(out.auxiliary_loss), want, rtol=1e-4)
  if (w_imp, w_load) == (1.0, 1.0):
    np.testing.assert_allclose(float(out.auxiliary_loss), extras["aux"], rtol=1e-4)


def test_router_module_takes_weights_from_config():
  x = jax.random.normal(jax.random.PRNGKey(0), (G, T, 8))
  mask = jnp.asarray(_mask())
  base = MoeConfig(num_experts=E, router_type="noisy_top_k")
  params = routing.Router(base).init({"params": jax.random.PRNGKey(1)}, x, mask, capacity=T, deterministic=True)
  out = {}
  for w in ((1.0, 1.0), (0.2, 0.0)):
    cfg = MoeConfig(num_experts=E, router_type="noisy_top_k", importance_loss_weight=w[0], load_loss_weight=w[1])
    out[w] = routing.Router(cfg).apply(params, x, mask, capacity=T, deterministic=True)
  _, want = ref.noisy_top_k(np.asarray(out[(1.0, 1.0)].router_logits), None, _mask(), k=2, w_importance=0.2,
                            w_load=0.0)
  np.testing.assert_allclose(float(out[(0.2, 0.0)].auxiliary_loss), want, rtol=1e-4)
  assert float(out[(1.0, 1.0)].auxiliary_loss) > float(out[(0.2, 0.0)].auxiliary_loss) > 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(router_type="noisy_top_k", importance_loss_weight=-0.1), "must be >= 0"),
    (dict(router_type="hierarchical", num_expert_groups=2, num_selected_experts=1, load_loss_weight=-1.0),
     "must be >= 0"),
    (dict(router_type="tokens_choose", importance_loss_weight=0.2), "only apply to router_type='noisy_top_k'"),
    (dict(router_type="expert_choice", load_loss_weight=0.0), "only apply to router_type='noisy_top_k'"),
])
def test_loss_weight_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    MoeConfig(num_experts=8, **kwargs)


def test_loss_weights_bind_through_gin():
  gin.clear_config()
  try:
    gin.parse_config("MoeConfig.router_type = 'noisy_top_k'\nMoeConfig.importance_loss_weight = 0.0\n"
                     "MoeConfig.load_loss_weight = 0.2")
    cfg = MoeConfig()
  finally:
    gin.clear_config()
  assert (cfg.importance_loss_weight, cfg.load_loss_weight) == (0.0, 0.2)


# ----------------------------------------------------------------------------------------------------
# Through the layer and the model's metric names.
# ----------------------------------------------------------------------------------------------------


def test_layer_metrics_with_padding_and_a_padded_group():
  """MoeLayer: 3 x 5 real+padding tokens in groups of 8 (the last group padded): metrics over real tokens only."""
  cfg = MoeConfig(num_experts=E, d_ff=16, group_size=8, train_capacity_factor=1.0, min_expert_capacity=1)
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 8))
  mask = np.ones((3, 5), np.float32)
  mask[0, 3:] = 0
  layer = MoeLayer(cfg)
  params = nn.unbox(layer.init({"params": jax.random.PRNGKey(1)}, x, deterministic=True))
  (_, aux), state = layer.apply(params, x, jnp.asarray(mask), deterministic=False,
                                rngs={"dropout": jax.random.PRNGKey(2)},
                                capture_intermediates=lambda m, name: m.name == "router")
  route = state["intermediates"]["router"]["__call__"][0]
  logits = np.asarray(route.router_logits)  # [2, 8, E]
  mg = np.pad(mask.reshape(-1), (0, 1)).reshape(2, 8)
  assert not np.asarray(route.kept)[mg > 0].all()  # capacity 2 drops
  before = ref.tokens_choose(logits, mg, k=2, cap=8)
  _check(aux, ref.balance_metrics(before["expert"], before["gate"], before["kept"], mg, E))
  _check(aux, ref.logit_scale(logits, mg))


def _aux(seed, smooth: bool) -> MoeAux:
  v = np.random.RandomState(seed).uniform(0.5, 2.0, size=12).astype(np.float32)
  return MoeAux(*[jnp.asarray(f) for f in v[:5]], expert_fractions=jnp.asarray(v[5:9]),
                importance_cv=jnp.asarray(v[9]), load_cv=jnp.asarray(v[10]), max_mean_load=jnp.asarray(v[11]),
                router_logsumexp=jnp.asarray(v[0] + 1), router_max_abs_logit=jnp.asarray(v[1] + 3),
                smooth_load_cv=jnp.asarray(v[2] * 0.5) if smooth else None)


@pytest.mark.parametrize("smooth", [False, True])
def test_metric_names_mean_over_layers_and_per_layer(smooth):
  auxes = {"encoder": {"layer_1": _aux(0, smooth), "layer_3": _aux(1, smooth)}, "decoder": {"layer_1": _aux(2, smooth)}}
  layers = [auxes["encoder"]["layer_1"], auxes["encoder"]["layer_3"], auxes["decoder"]["layer_1"]]
  _, metrics = moe_losses_and_metrics(auxes, aux_loss_coef=0.01, router_z_loss_coef=0.001)
  names = ["importance_cv", "load_cv", "max_mean_load", "router_logsumexp", "router_max_abs_logit"]
  for name in names + (["smooth_load_cv"] if smooth else []):
    want = np.mean([float(getattr(a, name)) for a in layers])
    np.testing.assert_allclose(float(metrics[f"experts/{name}"]), want, rtol=1e-6)
    assert float(metrics[f"experts/encoder/layer_3/{name}"]) == float(getattr(layers[1], name))
  assert ("experts/smooth_load_cv" in metrics) == smooth
