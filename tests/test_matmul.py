"""stmoe.layers.matmul and the attention core against float64 NumPy references, plus the CPU fast-path check.

The bfloat16 products must (a) give the float32-accumulated product of the bf16-rounded inputs, rounded
once, (b) have exactly the gradients of that product (da = g b^T, db = a^T g), and (c) compile on CPU to
dots whose operands are all bfloat16: XLA silently upcasts a product whose left operand contracts its
major dim, which is the regression this file guards.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stmoe.layers.attention import _attention, dot_product_attention
from stmoe.layers.matmul import linear, matmul

BF16_EPS = 2.0 ** -8


def _bf16(rng, shape):
  return jnp.asarray(rng.normal(size=shape), jnp.float32).astype(jnp.bfloat16)


def _np(x):
  return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _dot_operand_dtypes(hlo: str) -> list[tuple[str, str]]:
  """(lhs, rhs) element types of every dot in an optimised HLO module (resolved per computation)."""
  out = []
  for comp in re.split(r"\n(?=\S)", hlo):
    types = {m.group(1): m.group(2) for m in re.finditer(r"%([\w.\-]+) = (\w+)\[", comp)}
    for m in re.finditer(r"= \w+\[[^\]]*\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\)", comp):
      out.append((types.get(m.group(1), "?"), types.get(m.group(2), "?")))
  return out


@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("shape", [((), 48, 32, 40), ((3,), 16, 24, 8), ((2, 2), 8, 16, 64)])
def test_bf16_matmul_values_and_gradients(shape, transpose_b):
  lead, m, k, n = shape
  rng = np.random.default_rng(0)
  a = _bf16(rng, (*lead, m, k))
  b = _bf16(rng, (*lead, n, k) if transpose_b else (*lead, k, n))
  g = _bf16(rng, (*lead, m, n))
  bt = np.swapaxes(_np(b), -1, -2) if transpose_b else _np(b)  # [..., K, N]
  ref = _np(a) @ bt
  y = matmul(a, b, transpose_b=transpose_b)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(_np(y), ref, rtol=BF16_EPS, atol=BF16_EPS * np.abs(ref).max())

  _, vjp = jax.vjp(lambda x, w: matmul(x, w, transpose_b=transpose_b), a, b)
  da, db = vjp(g)
  assert da.dtype == db.dtype == jnp.bfloat16
  ref_da = _np(g) @ np.swapaxes(bt, -1, -2)
  ref_db = np.swapaxes(_np(a), -1, -2) @ _np(g)  # [..., K, N]
  if transpose_b:
    ref_db = np.swapaxes(ref_db, -1, -2)
  for got, want in ((da, ref_da), (db, ref_db)):
    np.testing.assert_allclose(_np(got), want, rtol=2 * BF16_EPS, atol=2 * BF16_EPS * np.abs(want).max())


def test_float32_matmul_is_plain_dot():
  rng = np.random.default_rng(1)
  a, b = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32), jnp.asarray(rng.normal(size=(2, 7, 3)), jnp.float32)
  np.testing.assert_allclose(np.asarray(matmul(a, b)), _np(a) @ _np(b), rtol=1e-5, atol=1e-5)
  ga = jax.grad(lambda x: jnp.sum(matmul(x, b) ** 2))(a)
  np.testing.assert_allclose(np.asarray(ga), 2 * (_np(a) @ _np(b)) @ np.swapaxes(_np(b), -1, -2), rtol=1e-4)


def test_matmul_rejects_mixed_dtypes_and_batch_dims():
  with pytest.raises(TypeError, match="share a dtype"):
    matmul(jnp.ones((2, 3)), jnp.ones((3, 4), jnp.bfloat16))
  with pytest.raises(ValueError, match="batch dims"):
    matmul(jnp.ones((2, 2, 3)), jnp.ones((3, 3, 4)))


def test_linear_contracts_trailing_dims():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 3, 4, 5)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(4, 5, 6)), jnp.float32)
  np.testing.assert_allclose(np.asarray(linear(x, w, 2)), np.einsum("blhd,hde->ble", _np(x), _np(w)),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="kernel's input dims"):
    linear(x, w, 1)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the layout rule is XLA:CPU's")
def test_bf16_training_products_stay_bf16_on_cpu():
  """Forward and both backward products of an MLP and of attention compile to bf16 x bf16 dots."""
  rng = np.random.default_rng(3)
  x, w1, w2 = _bf16(rng, (64, 32)), _bf16(rng, (32, 128)), _bf16(rng, (128, 32))
  q, k, v = (_bf16(rng, (2, 16, 4, 8)) for _ in range(3))  # [batch, length, heads, kv] as projected

  def loss(x, w1, w2, q, k, v):
    h = jax.nn.relu(matmul(matmul(x, w1), w2))
    heads_major = lambda t: jnp.transpose(t, (0, 2, 1, 3))  # a transposed view, as in MultiHeadAttention
    att = dot_product_attention(heads_major(q), heads_major(k), heads_major(v), None, None)
    return jnp.sum(h.astype(jnp.float32)) + jnp.sum(att.astype(jnp.float32))

  hlo = jax.jit(jax.grad(loss, argnums=tuple(range(6)))).lower(x, w1, w2, q, k, v).compile().as_text()
  dots = _dot_operand_dtypes(hlo)
  assert len(dots) >= 10, dots  # 3 products each for 2 MLP and 2 attention matmuls (XLA may merge one)
  assert all(t == ("bf16", "bf16") for t in dots), dots


def _reference_attention(q, k, v, bias, mask):
  logits = np.einsum("bhqd,bhkd->bhqk", q, k) + bias
  logits = np.where(mask, logits, -1e30)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bhqk,bhkd->bhqd", w, v)


def test_attention_core_matches_numpy_with_gradients():
  rng = np.random.default_rng(4)
  b, h, lq, lk, d = 3, 2, 5, 7, 4
  q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((b, h, lq, d), (b, h, lk, d), (b, h, lk, d)))
  bias = jnp.asarray(rng.normal(size=(1, h, lq, lk)), jnp.float32)
  mask = jnp.asarray(rng.random((b, 1, lq, lk)) > 0.3).at[..., 0].set(True)
  out = dot_product_attention(q, k, v, bias, mask)
  np.testing.assert_allclose(np.asarray(out), _reference_attention(*map(_np, (q, k, v, bias)), np.asarray(mask)),
                             rtol=1e-5, atol=1e-6)
  # Gradients (bias included: summed over the batch by add_shared_bias) against float64 finite differences.
  f = lambda q, k, v, bias: jnp.sum(jnp.sin(dot_product_attention(q, k, v, bias, mask)))
  grads = jax.grad(f, argnums=(0, 1, 2, 3))(q, k, v, bias)
  ref_f = lambda *a: np.sum(np.sin(_reference_attention(*a, np.asarray(mask))))
  args = list(map(_np, (q, k, v, bias)))
  for i, g in enumerate(grads):
    num = np.zeros_like(args[i])
    for idx in np.ndindex(args[i].shape):
      hi, lo = [a.copy() for a in args], [a.copy() for a in args]
      hi[i][idx] += 1e-6
      lo[i][idx] -= 1e-6
      num[idx] = (ref_f(*hi) - ref_f(*lo)) / 2e-6
    np.testing.assert_allclose(np.asarray(g), num, rtol=1e-3, atol=1e-4)


def test_bf16_attention_with_dropout_matches_numpy_gradients():
  """bf16 attention (custom VJP) incl. a dropout multiplier: values and all gradients vs float64 NumPy."""
  rng = np.random.default_rng(5)
  b, h, lq, lk, d = 4, 2, 8, 16, 8
  q, k, v = (_bf16(rng, s) for s in ((b, h, lq, d), (b, h, lk, d), (b, h, lk, d)))
  bias = jnp.asarray(rng.normal(size=(1, h, lq, lk)), jnp.float32)
  mask = jnp.asarray(rng.random((b, 1, lq, lk)) > 0.2).at[..., 0].set(True)
  keep = jnp.asarray((rng.random((b, h, lq, lk)) > 0.25) / 0.75, jnp.bfloat16)
  g = _bf16(rng, (b, h, lq, d))
  out, vjp = jax.vjp(lambda q, k, v, bias: _attention(q, k, v, bias, mask, keep), q, k, v, bias)
  dq, dk, dv, dbias = vjp(g)

  qn, kn, vn, bn, gn, kp = map(_np, (q, k, v, bias, g, keep))
  logits = np.where(np.asarray(mask), np.einsum("bhqd,bhkd->bhqk", qn, kn) + bn, -1e30)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  ref_out = np.einsum("bhqk,bhkd->bhqd", p * kp, vn)
  dpk = np.einsum("bhqd,bhkd->bhqk", gn, vn)  # d(p * keep)
  dp = dpk * kp
  ds = p * (dp - np.sum(dp * p, -1, keepdims=True))
  want = {"out": ref_out, "dq": np.einsum("bhqk,bhkd->bhqd", ds, kn), "dk": np.einsum("bhqk,bhqd->bhkd", ds, qn),
          "dv": np.einsum("bhqk,bhqd->bhkd", p * kp, gn), "dbias": ds.sum(0, keepdims=True)}
  got = {"out": out, "dq": dq, "dk": dk, "dv": dv, "dbias": dbias}
  assert dbias.dtype == jnp.float32 and dq.dtype == jnp.bfloat16
  for name, w in want.items():  # bf16 operands and probabilities: a few bf16 ulps of the largest entry
    np.testing.assert_allclose(_np(got[name]), w, rtol=0, atol=4 * BF16_EPS * np.abs(w).max(), err_msg=name)


def test_kernel_choice_follows_the_target_platform_not_the_host():
  """Compiling for TPU from a CPU host (stmoe.platform, set by partitioning.mesh_context) must not trace
  the CPU-only bf16 layout path (optimisation barriers, transposed copies) into the TPU program."""
  import jax.numpy as jnp

  from stmoe import platform
  from stmoe.layers.matmul import matmul

  a = jnp.ones((8, 16), jnp.bfloat16)
  b = jnp.ones((16, 4), jnp.bfloat16)
  def grad():  # a fresh function per trace (make_jaxpr caches by function; a real TPU mesh changes the key)
    return lambda a, b: jax.grad(lambda a, b: matmul(a, b).astype(jnp.float32).sum(), argnums=(0, 1))(a, b)

  on_cpu = str(jax.make_jaxpr(grad())(a, b))
  with platform.building_for("tpu"):
    on_tpu = str(jax.make_jaxpr(grad())(a, b))
  assert "optimization_barrier" in on_cpu
  assert "optimization_barrier" not in on_tpu and "custom_vjp" not in on_tpu
