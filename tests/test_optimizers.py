"""Optimizers and schedules on toy pytrees, against NumPy re-implementations of the formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from stmoe.training import optimizers, schedules

E, A, B = 8, 6, 5  # expert is the LARGEST dimension: optax alone would factor across it


def _toy():
  rng = np.random.default_rng(0)
  params = {
      "moe": {"experts": {"wi": jnp.asarray(rng.normal(size=(E, A, B)), jnp.float32)}},
      "dense": {"kernel": jnp.asarray(rng.normal(size=(A, B)), jnp.float32)},
      "norm": {"scale": jnp.ones((A,), jnp.float32)},
  }
  axes = {
      "moe": {"experts": {"wi": P("expert", "embed", "mlp")}},
      "dense": {"kernel": P("embed", "mlp")},
      "norm": {"scale": P("embed")},
  }
  grads = [jax.tree.map(lambda p, i=i: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
           for i in range(3)]
  return params, axes, grads


def _numpy_factored_rms(grads, decay=0.8, eps=1e-30):
  """Adafactor's factored second-moment scaling (Shazeer & Stern 2018, Alg. 4) of a 2-D gradient sequence."""
  r = c = None
  outs = []
  for t, g in enumerate(grads):
    beta = 1.0 - (t + 1.0) ** (-decay)  # beta_2 hat at step t+1
    g2 = g.astype(np.float64) ** 2 + eps
    r_new = g2.mean(axis=1)  # [rows]
    c_new = g2.mean(axis=0)  # [cols]
    r = r_new if r is None else beta * r + (1 - beta) * r_new
    c = c_new if c is None else beta * c + (1 - beta) * c_new
    v = np.outer(r, c) / r.mean()
    outs.append(g / np.sqrt(v))
  return outs


def test_expert_params_factored_per_expert_never_across_experts():
  params, axes, grads = _toy()
  tx = optimizers.scale_by_expert_factored_rms(axes, min_dim_size_to_factor=4)
  state = tx.init(params)
  outs = []
  for g in grads:
    u, state = tx.update(g, state, params)
    outs.append(u)
  for e in range(E):
    ref = _numpy_factored_rms([np.asarray(g["moe"]["experts"]["wi"][e]) for g in grads])
    for t in range(3):
      np.testing.assert_allclose(np.asarray(outs[t]["moe"]["experts"]["wi"][e]), ref[t], rtol=2e-5)
  ref = _numpy_factored_rms([np.asarray(g["dense"]["kernel"]) for g in grads])
  for t in range(3):
    np.testing.assert_allclose(np.asarray(outs[t]["dense"]["kernel"]), ref[t], rtol=2e-5)
  # Statistics are per expert over the last two dims: v_row [E, A], v_col [E, B], nothing of size E alone.
  shapes = sorted(tuple(x.shape) for x in jax.tree.leaves(state) if x.ndim >= 2)
  assert (E, A) in shapes and (E, B) in shapes
  # And plain optax would have factored over (expert, A): the test distinguishes the two.
  plain = optax.scale_by_factored_rms(min_dim_size_to_factor=4)
  u_plain, _ = plain.update(grads[0], plain.init(params), params)
  assert not np.allclose(np.asarray(u_plain["moe"]["experts"]["wi"]), np.asarray(outs[0]["moe"]["experts"]["wi"]))


def test_adafactor_t5_defaults_match_optax_on_ordinary_params():
  params, axes, grads = _toy()
  params = {k: v for k, v in params.items() if k != "moe"}
  axes = {k: v for k, v in axes.items() if k != "moe"}
  opt = optimizers.adafactor(learning_rate=schedules.rsqrt_with_warmup(1.0, 3), min_dim_size_to_factor=4)
  assert (opt.decay_rate, opt.clipping_threshold, opt.multiply_by_parameter_scale) == (0.8, 1.0, True)
  ours = optimizers.make_optimizer(opt, axes, params)
  ref = optax.adafactor(schedules.rsqrt_with_warmup(1.0, 3), min_dim_size_to_factor=4, decay_rate=0.8,
                        clipping_threshold=1.0, multiply_by_parameter_scale=True)
  s1, s2 = ours.init(params), ref.init(params)
  for g in grads:
    u1, s1 = ours.update({k: g[k] for k in params}, s1, params)
    u2, s2 = ref.update({k: g[k] for k in params}, s2, params)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_schedules_match_formulas():
  f = schedules.rsqrt_with_warmup(2.0, 100)
  for step in (0, 50, 100, 400):
    assert float(f(step)) == pytest.approx(2.0 / np.sqrt(max(step, 100)), rel=1e-6)
  assert float(schedules.constant(1e-3)(123)) == pytest.approx(1e-3)
  lin = schedules.linear(1.0, decay_steps=10, end_learning_rate=0.0)
  assert [round(float(lin(s)), 6) for s in (0, 5, 10, 20)] == [1.0, 0.5, 0.0, 0.0]
  cos = schedules.cosine(1.0, decay_steps=10, warmup_steps=4)
  assert float(cos(0)) == pytest.approx(0.25)  # warm-up ramp (step+1)/4
  assert float(cos(4)) == pytest.approx(1.0)
  assert float(cos(9)) == pytest.approx(0.5 * (1 + np.cos(np.pi * 0.5)), rel=1e-6)
  assert float(cos(14)) == pytest.approx(0.0, abs=1e-7)


def test_freezing_by_regex_keeps_params_bit_identical_and_allocates_no_state():
  params, axes, grads = _toy()
  for kind in ("adafactor", "adamw"):
    opt = optimizers.OptimizerDef(kind=kind, learning_rate=0.1, frozen_patterns=(r"^moe/",),
                                  min_dim_size_to_factor=4)
    tx = optimizers.make_optimizer(opt, axes, params)
    state = tx.init(params)
    # No optimizer state of the expert shape exists: nothing was allocated for the frozen parameter.
    assert not any(x.shape[:1] == (E,) for x in jax.tree.leaves(state)), kind
    p = params
    for g in grads:
      u, state = tx.update(g, state, p)
      p = optax.apply_updates(p, u)
    assert np.array_equal(np.asarray(p["moe"]["experts"]["wi"]), np.asarray(params["moe"]["experts"]["wi"]))
    assert not np.allclose(np.asarray(p["dense"]["kernel"]), np.asarray(params["dense"]["kernel"]))
  with pytest.raises(ValueError, match="match no parameter"):
    optimizers.make_optimizer(optimizers.OptimizerDef(frozen_patterns=("nothing_here",)), axes, params)


def test_global_norm_clipping_and_adamw_against_numpy():
  params, axes, grads = _toy()
  opt = optimizers.adamw(learning_rate=0.01, max_grad_norm=0.5, weight_decay=0.1)
  tx = optimizers.make_optimizer(opt, axes, params)
  u, _ = tx.update(grads[0], tx.init(params), params)
  norm = np.sqrt(sum(float(np.sum(np.asarray(g, np.float64) ** 2)) for g in jax.tree.leaves(grads[0])))
  for (path, g), (_, p), (_, upd) in zip(jax.tree_util.tree_flatten_with_path(grads[0])[0],
                                         jax.tree_util.tree_flatten_with_path(params)[0],
                                         jax.tree_util.tree_flatten_with_path(u)[0]):
    g = np.asarray(g, np.float64) * min(1.0, 0.5 / norm)
    m, v = 0.1 * g, 0.001 * g * g  # first Adam step, then bias correction
    mhat, vhat = m / 0.1, v / 0.001
    step = mhat / (np.sqrt(vhat) + 1e-8)
    if np.ndim(p) >= 2:
      step = step + 0.1 * np.asarray(p)  # decoupled weight decay on matrices only
    np.testing.assert_allclose(np.asarray(upd), -0.01 * step, rtol=1e-5, atol=1e-7)
