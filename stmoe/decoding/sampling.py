"""Greedy and temperature / top-k sampling: `decode_loop` over a step function, and `generate` over a model.

A step function maps (tokens [batch, 1], state, index) -> (logits [batch, vocab], state); the state is a KV
cache for cached decoding or the growing token buffer for the uncached reference path. The loops stop early
once every row has produced EOS; positions after a row's EOS are padding (PAD_ID).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from stmoe.decoding.config import DecodeConfig
from stmoe.decoding.state import Batch, Decodable, DecodeState, decode_length
from stmoe.special_ids import PAD_ID

Array = jax.Array
StepFn = Callable[[Array, Any, Array], tuple[Array, Any]]  # (tokens [b,1], state, step index) -> (logits [b,v], state)


def pick_next(logits: Array, cfg: DecodeConfig, rng: Array | None) -> Array:
  """logits [batch, vocab] -> next token ids [batch]: the argmax, or a draw from the tempered top-k."""
  if cfg.method == "greedy":
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / cfg.temperature
  if cfg.top_k:
    kth = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]  # [batch, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _check_rng(cfg: DecodeConfig, rng: Array | None) -> None:
  if cfg.method == "sample" and rng is None:
    raise ValueError("Sampling needs an rng: pass rng=jax.random.PRNGKey(seed).")


def decode_loop(step_fn: StepFn, state: Any, first_tokens: Array, num_steps: int, cfg: DecodeConfig,
                rng: Array | None = None, *, index_offset: int = 0, done: Array | None = None) -> Array:
  """Runs up to `num_steps` steps from `first_tokens` [batch]; returns generated ids [batch, num_steps].

  Step i calls step_fn(tokens, state, i) and samples with fold_in(rng, i + index_offset), so a caller that
  picked earlier tokens itself can continue the same random stream; `done` marks rows that already finished.
  """
  _check_rng(cfg, rng)
  batch = first_tokens.shape[0]
  out = jnp.zeros((batch, num_steps), jnp.int32)
  done = jnp.zeros((batch,), jnp.bool_) if done is None else done
  rng = jax.random.PRNGKey(0) if rng is None else rng

  def cond(carry):
    i, _, _, done, _ = carry
    return jnp.logical_and(i < num_steps, jnp.logical_not(jnp.all(done)))

  def body(carry):
    i, tokens, state, done, out = carry
    logits, state = step_fn(tokens[:, None], state, i)  # [batch, vocab]
    nxt = pick_next(logits, cfg, jax.random.fold_in(rng, i + index_offset))  # [batch]
    nxt = jnp.where(done, PAD_ID, nxt)
    out = out.at[:, i].set(nxt)
    done = jnp.logical_or(done, nxt == cfg.eos_id)
    return i + 1, nxt, state, done, out

  carry = (jnp.zeros((), jnp.int32), first_tokens.astype(jnp.int32), state, done, out)
  return jax.lax.while_loop(cond, body, carry)[-1]


def generate(model: Decodable, params: Any, batch: Batch, cfg: DecodeConfig, rng: Array | None = None, *,
             use_cache: bool = True) -> Array:
  """Greedy or sampled ids [batch, max_decode_length] (PAD_ID after EOS) for any `Decodable` model.

  The model's start call gives the logits of the first token (picked here with fold_in(rng, 0)); the loop
  then feeds each picked token to the step call. use_cache=False drives the model's reference_start /
  reference_step (full recompute every step) instead of decode_start / decode_step; both draw the same
  random stream, so the same seed gives the same samples with or without the cache.
  """
  if cfg.method not in ("greedy", "sample"):
    raise ValueError(f"generate decodes greedily or by sampling, not {cfg.method!r}: use "
                     "stmoe.decoding.beam_search.predict_beams for beam search.")
  _check_rng(cfg, rng)
  start, step = (model.decode_start, model.decode_step) if use_cache else (model.reference_start,
                                                                             model.reference_step)
  length = decode_length(batch, cfg.max_decode_length)
  first_logits, state = start(params, batch, length)  # [batch, vocab]
  first = pick_next(first_logits, cfg, None if rng is None else jax.random.fold_in(rng, 0))  # [batch]
  if length == 1:
    return first[:, None]
  context = state.context  # closed over rather than carried: the loop only updates the cache

  def step_fn(tokens, cache, i):
    logits, new_state = step(params, tokens, DecodeState(cache, context), i)
    return logits, new_state.cache

  rest = decode_loop(step_fn, state.cache, first, length - 1, cfg, rng, index_offset=1,
                     done=first == cfg.eos_id)  # [batch, length - 1]
  return jnp.concatenate([first[:, None], rest], axis=1)
