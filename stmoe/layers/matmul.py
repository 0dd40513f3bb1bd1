"""Matrix products in the activation dtype with float32 accumulation, laid out for XLA:CPU's fast path.

Every heavy product of the model (projections, attention, experts, logits) goes through :func:`matmul`.

* float32 activations: a plain ``dot_general``; XLA differentiates it.
* bfloat16/float16 activations: inputs in that dtype, products accumulated in float32
  (``preferred_element_type``) and rounded once at the end, as TPUs and tensor cores do. On CPU, XLA
  lowers such a product to its YNNPACK kernels, about twice the float32 matmul rate on CPUs with
  AVX512-BF16, but only when the left operand contracts its minor (last) dim; otherwise it silently
  upcasts both operands to float32 and the product runs at the float32 rate or below. Reverse-mode AD
  of ``x @ w`` produces ``x^T @ dy``, which contracts the left operand's major dim, so a third of
  every training step's FLOPs would fall off the fast path; the same happens to any operand that is a
  transposed view (e.g. heads-major attention inputs), because the check looks at the physical layout.
  The custom VJP below writes each backward product in the accepted form, materialising the one
  transpose it needs (a copy of whichever operand is cheaper), and passes every operand row-major,
  behind an optimisation barrier so that XLA does not fold the copies back into the product.
  On GPU/TPU the backends handle any layout, so the plain form is used there. The platform is the one
  the step is built for (stmoe.platform.target_platform: the mesh's devices), not the host's backend.

Operands are ``a [..., M, K]`` and ``b [..., K, N]`` (or ``b [..., N, K]`` with ``transpose_b``) with
identical leading batch dims.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from stmoe.platform import target_platform

Array = jax.Array


def _dims(ndim: int, transpose_b: bool):
  """dot_general dimension numbers of [..., M, K] x [..., K, N] (or [..., N, K]) with shared batch dims."""
  batch = tuple(range(ndim - 2))
  return (((ndim - 1,), (ndim - 1 if transpose_b else ndim - 2,)), (batch, batch))


def _raw(a: Array, b: Array, transpose_b: bool, out_dtype: Any) -> Array:
  return jax.lax.dot_general(a, b, _dims(a.ndim, transpose_b),
                             preferred_element_type=jnp.float32).astype(out_dtype)


def _row_major(x: Array) -> Array:
  """x itself, stored row-major: free if it already is, a copy if it is a transposed view (e.g. heads-major
  attention operands), because XLA:CPU's bf16 product path checks the physical layout too."""
  return jax.lax.optimization_barrier(x.reshape(-1)).reshape(x.shape)


def _fast(a: Array, b: Array, transpose_b: bool, out_dtype: Any) -> Array:
  return _raw(_row_major(a), _row_major(b), transpose_b, out_dtype)


def product(a: Array, b: Array, *, transpose_b: bool = False, out_dtype: Any = None) -> Array:
  """The forward product of :func:`matmul` without its custom gradient, for code that writes its own VJP
  (e.g. the dropless grouped matmul): float32 accumulation, CPU-fast operand layout for low precision."""
  out_dtype = a.dtype if out_dtype is None else out_dtype
  if a.dtype == jnp.float32 or target_platform() != "cpu":
    return _raw(a, b, transpose_b, out_dtype)
  return _fast(a, b, transpose_b, out_dtype)


def product_contract_rows(x: Array, y: Array, out_dtype: Any = None) -> Array:
  """x [..., M, P]^T @ y [..., M, Q] -> [..., P, Q] (a weight gradient), with float32 accumulation."""
  out_dtype = x.dtype if out_dtype is None else out_dtype
  if x.dtype == jnp.float32 or target_platform() != "cpu":
    batch = tuple(range(x.ndim - 2))
    return jax.lax.dot_general(x, y, (((x.ndim - 2,), (y.ndim - 2,)), (batch, batch)),
                               preferred_element_type=jnp.float32).astype(out_dtype)
  return _contract_rows(x, y, out_dtype)


def _transposed_copy(x: Array) -> Array:
  """[..., M, K] -> [..., K, M], stored row-major (a real copy XLA cannot fold into the next product)."""
  *lead, m, k = x.shape
  flat = jnp.swapaxes(x, -1, -2).reshape(*lead, k * m)  # the reshape forces the transposed copy
  return jax.lax.optimization_barrier(flat).reshape(*lead, k, m)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _cpu_matmul(a: Array, b: Array, transpose_b: bool, out_dtype: Any) -> Array:
  return _fast(a, b, transpose_b, out_dtype)


def _cpu_matmul_fwd(a, b, transpose_b, out_dtype):
  return _fast(a, b, transpose_b, out_dtype), (a, b)


def _cpu_matmul_bwd(transpose_b, out_dtype, res, g):
  a, b = res
  g = g.astype(a.dtype)  # [..., M, N]
  if transpose_b:  # y = a b^T with b [..., N, K]
    da = _fast(g, b, False, a.dtype)  # [..., M, N] x [..., N, K]
    db = _contract_rows(g, a, b.dtype)  # g^T a: [..., N, K]
  else:  # y = a b with b [..., K, N]
    da = _fast(g, b, True, a.dtype)  # [..., M, N] x [..., K, N]^T
    db = _contract_rows(a, g, b.dtype)  # a^T g: [..., K, N]
  return da, db


def _contract_rows(x: Array, y: Array, out_dtype: Any) -> Array:
  """x [..., M, P]^T @ y [..., M, Q] -> [..., P, Q], contracting the (major) row dim of both.

  Either x is copied transposed (P*M elements) and multiplied as is, or y is (Q*M) and the [Q, P]
  product is transposed back (P*Q more); the cheaper one is used. In attention the second form copies
  a [q, kv] block instead of a [q, k] one, in an MLP's output projection a [tokens, embed] one instead of
  [tokens, mlp].
  """
  *_, m, p = x.shape
  q = y.shape[-1]
  if p * m <= q * m + p * q:
    return _fast(_transposed_copy(x), y, False, out_dtype)  # [..., P, M] x [..., M, Q]
  return _transposed_copy(_fast(_transposed_copy(y), x, False, out_dtype))  # ([..., Q, M] x [..., M, P])^T


_cpu_matmul.defvjp(_cpu_matmul_fwd, _cpu_matmul_bwd)


def matmul(a: Array, b: Array, *, transpose_b: bool = False, out_dtype: Any = None) -> Array:
  """a [..., M, K] @ b [..., K, N] (b [..., N, K] if transpose_b) -> [..., M, N] in `out_dtype`.

  Both operands must already be in the compute dtype (the activation dtype); the result defaults to it.
  Low-precision inputs accumulate in float32; see the module docstring for why and how on CPU.
  """
  if a.dtype != b.dtype:
    raise TypeError(f"matmul operands must share a dtype, got {a.dtype} and {b.dtype}.")
  if a.ndim != b.ndim or a.shape[:-2] != b.shape[:-2]:
    raise ValueError(f"matmul needs identical leading batch dims, got {a.shape} and {b.shape}.")
  out_dtype = a.dtype if out_dtype is None else out_dtype
  if a.dtype == jnp.float32:
    return jax.lax.dot_general(a, b, _dims(a.ndim, transpose_b)).astype(out_dtype)
  if target_platform() == "cpu":
    return _cpu_matmul(a, b, transpose_b, jnp.dtype(out_dtype))
  return _raw(a, b, transpose_b, out_dtype)


def linear(x: Array, kernel: Array, num_contracted: int = 1) -> Array:
  """x [..., *in] @ kernel [*in, *out] -> [..., *out] through :func:`matmul` (both in the compute dtype)."""
  in_shape = kernel.shape[:num_contracted]
  out_shape = kernel.shape[num_contracted:]
  if tuple(x.shape[x.ndim - num_contracted:]) != tuple(in_shape):
    raise ValueError(f"linear: input dims {x.shape} do not end with the kernel's input dims {in_shape}.")
  lead = x.shape[:x.ndim - num_contracted]
  k, n = math.prod(in_shape), math.prod(out_shape)
  y = matmul(x.reshape(-1, k), kernel.reshape(k, n))  # [tokens, out]
  return y.reshape(*lead, *out_shape)
