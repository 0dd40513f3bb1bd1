"""Autoregressive decoding loops over a step function: greedy and temperature / top-k sampling.

A step function maps (tokens [batch, 1], state) -> (logits [batch, vocab], state); the state is a KV cache
for cached decoding or the growing token buffer for the uncached reference path. The loops stop early once
every row has produced EOS; positions after a row's EOS are padding (0).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array
StepFn = Callable[[Array, Any, Array], tuple[Array, Any]]  # (tokens [b,1], state, step index) -> (logits [b,v], state)

EOS_ID = 1
PAD_ID = 0


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """How to pick each next token.

  method: "greedy", "sample" (temperature/top-k, seeded) or "beam" (see stmoe.beam_search).
  """

  method: str = "greedy"
  max_decode_length: int | None = None  # None: the target feature length of the batch
  temperature: float = 1.0
  top_k: int = 0  # 0: sample from the full distribution
  beam_size: int = 4
  length_penalty: float = 0.6  # GNMT alpha, beam search only
  eos_id: int = EOS_ID

  def __post_init__(self):
    if self.method not in ("greedy", "sample", "beam"):
      raise ValueError(f"DecodeConfig.method={self.method!r}: use 'greedy', 'sample' or 'beam'.")
    if self.method == "sample" and self.temperature <= 0:
      raise ValueError("Sampling needs temperature > 0; use method='greedy' for argmax decoding.")


def pick_next(logits: Array, cfg: DecodeConfig, rng: Array | None) -> Array:
  """logits [batch, vocab] -> next token ids [batch]."""
  if cfg.method == "greedy":
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / cfg.temperature
  if cfg.top_k:
    kth = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]  # [batch, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def decode_loop(step_fn: StepFn, state: Any, first_tokens: Array, num_steps: int, cfg: DecodeConfig,
                rng: Array | None = None, *, index_offset: int = 0, done: Array | None = None) -> Array:
  """Runs up to `num_steps` steps from `first_tokens` [batch]; returns generated ids [batch, num_steps].

  Step i samples with fold_in(rng, i + index_offset), so a caller that picked earlier tokens itself can
  continue the same random stream; `done` marks rows that already finished.
  """
  if cfg.method == "sample" and rng is None:
    raise ValueError("Sampling needs an rng: pass rng=jax.random.PRNGKey(seed).")
  batch = first_tokens.shape[0]
  out = jnp.zeros((batch, num_steps), jnp.int32)
  done = jnp.zeros((batch,), jnp.bool_) if done is None else done
  rng = jax.random.PRNGKey(0) if rng is None else rng

  def cond(carry):
    i, _, _, done, _ = carry
    return jnp.logical_and(i < num_steps, jnp.logical_not(jnp.all(done)))

  def body(carry):
    i, tokens, state, done, out = carry
    logits, state = step_fn(tokens[:, None], state, i)
    nxt = pick_next(logits, cfg, jax.random.fold_in(rng, i + index_offset))
    nxt = jnp.where(done, PAD_ID, nxt)
    out = out.at[:, i].set(nxt)
    done = jnp.logical_or(done, nxt == cfg.eos_id)
    return i + 1, nxt, state, done, out

  carry = (jnp.zeros((), jnp.int32), first_tokens.astype(jnp.int32), state, done, out)
  return jax.lax.while_loop(cond, body, carry)[-1]
