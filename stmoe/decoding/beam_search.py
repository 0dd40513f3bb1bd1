"""Beam search with a KV cache, for any model that provides decode_start / decode_step (see state.py).

Per batch row we keep `beam` *alive* hypotheses (no EOS yet) ranked by summed log-probability, and `beam`
*finished* hypotheses (ended by EOS) ranked by their length-penalised score

    score = log p(sequence) / lp(len),   lp(len) = ((5 + len) / 6) ** alpha      (GNMT, Wu et al. 2016)

where len counts the generated tokens including the EOS. Each step expands every alive hypothesis by every
token and keeps the 2 * beam best candidates by log-probability, so that even if up to `beam` of them end in
EOS, `beam` candidates remain to continue. Of the 2 * beam candidates, EOS candidates ranked within the top
`beam` are finished (merged with the old finished set, the best `beam` kept); the best `beam` non-EOS ones stay
alive. Finishing only top-`beam` EOS candidates makes beam search with beam=1 exactly greedy decoding.

The loop (`jax.lax.while_loop`, fixed shapes) stops once, for every row, all `beam` finished slots are filled
and the worst finished score is at least the best score any alive hypothesis could still reach (its
log-probability can only fall, so the bound is logp / max(lp(len + 1), lp(max_len))).

The model lays its state out as [batch * beam, ...] (decode_start with num_copies=beam; row-major: the beams of
row 0 first); every step gathers the state's cache by the parent beam of each surviving hypothesis. Cache
leaves with a leading batch dim (per-layer keys/values, the stack's key_valid / key_prefix) are gathered;
scalar leaves (the write index) are shared; the state's context (the encoder output) is never reordered.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from stmoe.decoding.config import DecodeConfig
from stmoe.decoding.state import Batch, Decodable, DecodeState, decode_length, gather_beams, tile_beams

Array = jax.Array
# (tokens [batch * beam, 1], cache, step index) -> (logits [batch * beam, vocab], cache)
StepFn = Callable[[Array, Any, Array], tuple[Array, Any]]

__all__ = ["NEG_INF", "BeamResult", "BeamState", "StepFn", "beam_loop", "best_beam", "expand", "finalize",
           "gather_beams", "init_state", "length_penalty", "predict_beams", "rows_done", "tile_beams"]

NEG_INF = -1.0e9  # score of empty / dead slots; finite so that sums and divisions never produce NaN


class BeamState(NamedTuple):
  """Loop state. sequences [batch, beam, length] hold generated ids (0 after the last generated one)."""

  alive_seqs: Array  # [batch, beam, length] int32
  alive_logp: Array  # [batch, beam] float32 summed log-probability (NEG_INF for dead slots)
  alive_ok: Array  # [batch, beam] bool: a real hypothesis
  fin_seqs: Array  # [batch, beam, length] int32, ending with EOS
  fin_scores: Array  # [batch, beam] float32 length-penalised score (NEG_INF for empty slots)
  fin_ok: Array  # [batch, beam] bool


class BeamResult(NamedTuple):
  """All beams of a search, best first: finished ones when a row has any, else its alive ones.

  sequences [batch, beam, length] int32 (0 after EOS); scores [batch, beam] float32 length-penalised
  log-probability (alive fallbacks are scored as if their length were max_decode_length); finished
  [batch, beam] bool: whether each beam ended with EOS; valid [batch, beam] bool: a real hypothesis.
  """

  sequences: Array
  scores: Array
  finished: Array
  valid: Array


def length_penalty(length: Array | int, alpha: float) -> Array:
  """GNMT length normaliser ((5 + length) / 6) ** alpha; alpha=0 gives 1 (plain log-probability)."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def init_state(batch: int, beam: int, length: int) -> BeamState:
  """One live empty hypothesis per row (slot 0, log-probability 0); the other slots are dead."""
  seqs = jnp.zeros((batch, beam, length), jnp.int32)
  first = jnp.arange(beam)[None, :] == 0  # [1, beam]
  alive_ok = jnp.broadcast_to(first, (batch, beam))
  return BeamState(
      alive_seqs=seqs, alive_logp=jnp.where(alive_ok, 0.0, NEG_INF).astype(jnp.float32), alive_ok=alive_ok,
      fin_seqs=seqs, fin_scores=jnp.full((batch, beam), NEG_INF, jnp.float32),
      fin_ok=jnp.zeros((batch, beam), jnp.bool_))


def _take(x: Array, index: Array) -> Array:
  """x [batch, n, ...], index [batch, m] -> [batch, m, ...]."""
  index = index.reshape(index.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


def expand(state: BeamState, logits: Array, i: Array, cfg: DecodeConfig) -> tuple[BeamState, Array]:
  """One beam step: writes position i from logits [batch, beam, vocab] of the alive hypotheses.

  Returns the new state and the parent beam [batch, beam] of each new alive hypothesis (to gather the cache).
  """
  batch, beam, vocab = logits.shape
  if 2 * beam > beam * vocab:
    raise ValueError(f"Beam search needs vocab_size >= 2 (got {vocab}).")
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [batch, beam, vocab]
  cand = state.alive_logp[:, :, None] + log_probs  # [batch, beam, vocab]
  cand_logp, flat = jax.lax.top_k(cand.reshape(batch, beam * vocab), 2 * beam)  # [batch, 2*beam]
  parent = flat // vocab  # [batch, 2*beam]
  token = (flat % vocab).astype(jnp.int32)  # [batch, 2*beam]
  live = _take(state.alive_ok, parent)  # [batch, 2*beam]
  seqs = _take(state.alive_seqs, parent)  # [batch, 2*beam, length]
  at_i = jnp.arange(seqs.shape[-1])[None, None, :] == i  # [1, 1, length]
  seqs = jnp.where(at_i, token[:, :, None], seqs)
  is_eos = token == cfg.eos_id

  # Finished: EOS candidates ranked within the top `beam`, merged with the old finished set.
  new_fin = live & is_eos & (jnp.arange(2 * beam)[None, :] < beam)  # [batch, 2*beam]
  new_scores = jnp.where(new_fin, cand_logp / length_penalty(i + 1, cfg.length_penalty), NEG_INF)
  all_scores = jnp.concatenate([state.fin_scores, new_scores], axis=1)  # [batch, 3*beam]
  all_ok = jnp.concatenate([state.fin_ok, new_fin], axis=1)
  all_seqs = jnp.concatenate([state.fin_seqs, seqs], axis=1)  # [batch, 3*beam, length]
  fin_scores, keep = jax.lax.top_k(jnp.where(all_ok, all_scores, NEG_INF), beam)  # [batch, beam]

  # Alive: the best `beam` non-EOS candidates (there are at least `beam` of the 2*beam).
  cont = live & ~is_eos
  alive_logp, pick = jax.lax.top_k(jnp.where(cont, cand_logp, NEG_INF), beam)  # [batch, beam]
  new_state = BeamState(
      alive_seqs=_take(seqs, pick), alive_logp=alive_logp, alive_ok=_take(cont, pick),
      fin_seqs=_take(all_seqs, keep), fin_scores=fin_scores, fin_ok=_take(all_ok, keep))
  return new_state, _take(parent, pick)


def rows_done(state: BeamState, i: Array, length: int, alpha: float) -> Array:
  """[batch] bool: all finished slots filled and no alive hypothesis (now len i + 1) can beat the worst."""
  best_alive = jnp.max(jnp.where(state.alive_ok, state.alive_logp, NEG_INF), axis=1)  # [batch], <= 0
  best_lp = jnp.maximum(length_penalty(i + 2, alpha), length_penalty(length, alpha))
  bound = jnp.where(jnp.any(state.alive_ok, axis=1), best_alive / best_lp, NEG_INF)
  worst_fin = jnp.min(jnp.where(state.fin_ok, state.fin_scores, NEG_INF), axis=1)
  return jnp.logical_or(jnp.all(state.fin_ok, axis=1) & (worst_fin >= bound), ~jnp.any(state.alive_ok, axis=1))


def beam_loop(step_fn: StepFn, cache: Any, state: BeamState, tokens: Array, start: int, length: int,
              cfg: DecodeConfig) -> BeamState:
  """Runs steps start..length-1: feed tokens [batch * beam] (the last token of each alive hypothesis), expand.

  `cache` is already laid out [batch * beam, ...]. Stops early when every row is done (see rows_done).
  """
  batch, beam, _ = state.alive_seqs.shape

  def cond(carry):
    i, _, _, state = carry
    not_done = jnp.logical_not(jnp.all(rows_done(state, i - 1, length, cfg.length_penalty)))
    return jnp.logical_and(i < length, not_done)

  def body(carry):
    i, tokens, cache, state = carry
    logits, cache = step_fn(tokens[:, None], cache, i)  # [batch * beam, vocab]
    state, parent = expand(state, logits.reshape(batch, beam, -1), i, cfg)
    flat_parent = (jnp.arange(batch)[:, None] * beam + parent).reshape(-1)  # [batch * beam]
    cache = gather_beams(cache, flat_parent)
    tokens = state.alive_seqs[:, :, i].reshape(-1)
    return i + 1, tokens, cache, state

  carry = (jnp.asarray(start, jnp.int32), tokens.astype(jnp.int32), cache, state)
  return jax.lax.while_loop(cond, body, carry)[-1]


def finalize(state: BeamState, length: int, alpha: float) -> BeamResult:
  """Finished beams for rows that have any, else the alive ones (scored at length max_decode_length)."""
  has_fin = jnp.any(state.fin_ok, axis=1)  # [batch]
  alive_scores = jnp.where(state.alive_ok, state.alive_logp / length_penalty(length, alpha), NEG_INF)
  pick = lambda a, b: jnp.where(has_fin.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)
  return BeamResult(sequences=pick(state.fin_seqs, state.alive_seqs), scores=pick(state.fin_scores, alive_scores),
                    finished=pick(state.fin_ok, jnp.zeros_like(state.fin_ok)),
                    valid=pick(state.fin_ok, state.alive_ok))


def _check(cfg: DecodeConfig) -> int:
  if cfg.beam_size < 1:
    raise ValueError(f"DecodeConfig.beam_size={cfg.beam_size}: use a beam of at least 1.")
  return cfg.beam_size


def predict_beams(model: Decodable, params: Any, batch: Batch, cfg: DecodeConfig) -> BeamResult:
  """All beams and scores for any `Decodable` model (jit-compatible; wrap in jax.jit with model/cfg closed over).

  The model's start call gives the first logits of every copy; only slot 0 of each row is alive, so the first
  expansion picks the row's `beam` best first tokens. Later steps feed each alive hypothesis's last token.
  """
  beam = _check(cfg)
  length = decode_length(batch, cfg.max_decode_length)
  first_logits, state = model.decode_start(params, batch, length, num_copies=beam)  # [batch * beam, vocab]
  batch_size = first_logits.shape[0] // beam
  beams, parent = expand(init_state(batch_size, beam, length), first_logits.reshape(batch_size, beam, -1),
                         jnp.asarray(0), cfg)
  cache = gather_beams(state.cache, (jnp.arange(batch_size)[:, None] * beam + parent).reshape(-1))
  context = state.context  # closed over, never gathered: identical across the beams of a row

  def step(tokens, cache, i):  # feeds the tokens of position i - 1, returns the logits of position i
    logits, new_state = model.decode_step(params, tokens, DecodeState(cache, context), i - 1)
    return logits, new_state.cache

  if length > 1:
    beams = beam_loop(step, cache, beams, beams.alive_seqs[:, :, 0].reshape(-1), 1, length, cfg)
  return finalize(beams, length, cfg.length_penalty)


def best_beam(model: Decodable, params: Any, batch: Batch, cfg: DecodeConfig) -> Array:
  """Best beam per row [batch, max_decode_length] int32, 0 after EOS (the same format as greedy decoding)."""
  return predict_beams(model, params, batch, cfg).sequences[:, 0]
