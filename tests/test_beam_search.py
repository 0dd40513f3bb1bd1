"""Beam search: beam=1 is greedy, exhaustive beams find the brute-force optimum, scores are the model's.

References are independent of the beam code: greedy decoding (`predict_batch`), NumPy scoring of every
sequence from one full (uncached) forward pass of the network, and a plain-Python beam search without early
stopping over a synthetic model whose logits depend on the whole (cached) history.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_fixtures import tiny_config, tiny_sparse_config
from stmoe import beam_search
from stmoe.config import SparseLayout
from stmoe.decoding import DecodeConfig
from stmoe.models.api import make_model

V = 6  # tiny vocabulary (0 pad/start, 1 EOS) so that every sequence can be enumerated
L = 3  # max decode length for the brute-force cases
EXHAUSTIVE_BEAM = V * (V - 1) ** (L - 1)  # >= every candidate of the last step, so nothing is ever pruned

ONE_LAYER = dict(vocab_size=V, num_encoder_layers=1, num_decoder_layers=1)
CONFIGS = {
    "dense": tiny_config(**ONE_LAYER),
    "sparse": tiny_sparse_config(**ONE_LAYER, encoder_sparse=SparseLayout(kind="every", every=1),
                                 decoder_sparse=SparseLayout(kind="every", every=1)),
}
ENC_TOKENS = np.array([[2, 3, 4, 5, 2], [5, 5, 3, 0, 0]], np.int32)
PROMPTS = np.array([[0, 3, 4, 2], [0, 5, 0, 0]], np.int32)  # different prompt lengths (right-aligned inside)


@functools.lru_cache(maxsize=None)
def _model(kind: str, name: str):
  """A tiny model with NumPy-drawn random parameters (no init compile: keeps the file fast)."""
  config = CONFIGS[name]
  if kind == "lm":
    model = make_model(config.replace(decoder_only=True, num_encoder_layers=0))
    shapes = {"decoder_input_tokens": (2, 4)}
  else:
    model = make_model(config)
    shapes = {"encoder_input_tokens": (2, 5), "decoder_input_tokens": (2, L)}
  abstract = jax.eval_shape(lambda rng: model.get_initial_variables(rng, shapes), jax.random.PRNGKey(0))["params"]
  rng = np.random.RandomState(3 if kind == "lm" else 4)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):  # RMSNorm scales around 1
      return 1.0 + 0.1 * rng.standard_normal(leaf.shape)
    if "token_embedder" in name:  # tied logits: a wide embedding makes the distributions peaked
      return 2.0 * rng.standard_normal(leaf.shape)
    return 0.3 * rng.standard_normal(leaf.shape)

  params = treedef.unflatten([jnp.asarray(draw(p, x), jnp.float32) for p, x in leaves])
  return model, params


def _batch(kind: str, length: int) -> dict:
  if kind == "lm":
    return {"decoder_input_tokens": jnp.asarray(PROMPTS)}
  return {"encoder_input_tokens": jnp.asarray(ENC_TOKENS),
          "decoder_input_tokens": jnp.zeros((ENC_TOKENS.shape[0], length), jnp.int32)}


@functools.lru_cache(maxsize=None)
def _jitted_beams(model, cfg: DecodeConfig):
  return jax.jit(lambda params, batch: beam_search.predict_beams(model, params, batch, cfg))


def _beams(kind, name, beam, alpha, length=L):
  model, params = _model(kind, name)
  cfg = DecodeConfig(method="beam", beam_size=beam, length_penalty=alpha, max_decode_length=length)
  out = _jitted_beams(model, cfg)(params, _batch(kind, length))
  return jax.tree_util.tree_map(np.asarray, out)


def _all_sequences() -> np.ndarray:
  """Every length-L token array [V**L, L]; a sequence's meaning ends at its first EOS (if any)."""
  return np.array(list(itertools.product(range(V), repeat=L)), np.int32)


def _eos_sequences() -> np.ndarray:
  """Every sequence of length <= L that ends at its first EOS, padded with 0: [num, L]."""
  seqs = []
  for n in range(1, L + 1):
    for prefix in itertools.product([t for t in range(V) if t != 1], repeat=n - 1):
      seqs.append(list(prefix) + [1] + [0] * (L - n))
  return np.array(seqs, np.int32)


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@functools.lru_cache(maxsize=None)
def _brute_force(kind: str, name: str) -> dict:
  """{(row, sequence): (summed log-probability up to the first EOS or L, length)} for every sequence.

  One full uncached forward pass over all V**L sequences (teacher forcing, every position a real token, as
  in decoding); for the decoder-only model the prompt is left-aligned without padding, unlike the decoder's
  right-aligned layout, which relative positions make equivalent.
  """
  model, params = _model(kind, name)
  seqs = _all_sequences()
  num = seqs.shape[0]
  is_eos = seqs == 1
  lengths = np.where(is_eos.any(1), is_eos.argmax(1) + 1, L)  # tokens up to and including the first EOS
  table = {}
  for row in range(2):
    if kind == "lm":
      prompt = PROMPTS[row][:np.max(np.nonzero(PROMPTS[row])[0]) + 1]  # left-aligned, no padding
      tokens = np.concatenate([np.tile(prompt, (num, 1)), seqs[:, :-1]], 1)
      logits = np.asarray(_forward(model, params, tokens))[:, len(prompt) - 1:]  # [num, L, V]
    else:
      inputs = np.concatenate([np.zeros((num, 1), np.int32), seqs[:, :-1]], 1)  # shifted right
      logits = np.asarray(_forward(model, params, np.tile(ENC_TOKENS[row], (num, 1)), inputs))
    token_lp = np.take_along_axis(_log_softmax(logits), seqs[..., None], -1)[..., 0]  # [num, L]
    logp = np.sum(token_lp * (np.arange(L)[None] < lengths[:, None]), 1)
    for s, lp, n in zip(seqs, logp, lengths):
      table[row, tuple(s)] = (lp, n)
  return table


def _forward(model, params, *inputs):
  """Full-sequence logits; decoder_valid=None marks every decoder position real, as cached decoding does."""
  return _jitted_forward(model)(params, *map(jnp.asarray, inputs))


@functools.lru_cache(maxsize=None)
def _jitted_forward(model):
  return jax.jit(lambda p, *x: model.module.apply({"params": p}, *x)[0])


def _score(kind, name, row, seq, alpha):
  """Brute-force penalised score of one decoded sequence (0s after its EOS are padding)."""
  lp, n = _brute_force(kind, name)[row, tuple(int(t) for t in seq)]
  return lp / _penalty(n, alpha)


def _penalty(lengths, alpha):
  return ((5.0 + lengths) / 6.0) ** alpha


# --- beam 1 is greedy -------------------------------------------------------------------------------------
# EOS ids that these random models emit in one row and not in the other (picked by looking at their greedy
# output), so that both the stop-at-EOS path and the run-to-max-length path are compared.
GREEDY_EOS = {("encdec", "dense"): 2, ("encdec", "sparse"): 1, ("lm", "dense"): 2, ("lm", "sparse"): 4}


@pytest.mark.parametrize("kind,name", list(GREEDY_EOS))
def test_beam_one_equals_greedy(kind, name):
  """With alpha=0 a one-wide beam keeps exactly the greedy path and stops when greedy emits EOS.

  (With alpha > 0 a one-wide beam may legitimately prefer a longer continuation that the length penalty
  favours, so exact equality is only a theorem for alpha=0.)
  """
  model, params = _model(kind, name)
  batch = _batch(kind, 6)
  eos = GREEDY_EOS[kind, name]
  greedy = np.asarray(model.predict_batch(params, batch, max_decode_length=6, eos_id=eos))
  beam = np.asarray(model.predict_batch(params, batch, max_decode_length=6, eos_id=eos, method="beam",
                                        beam_size=1, length_penalty=0.0))
  assert beam.dtype == np.int32 and beam.shape == greedy.shape == (2, 6)
  np.testing.assert_array_equal(beam, greedy)
  assert sorted((row == eos).any() for row in greedy) == [False, True], "exercise both stopping paths"


# --- exhaustive beam == brute force -----------------------------------------------------------------------
@pytest.mark.parametrize("kind,name,alpha", [("encdec", "dense", 0.6), ("encdec", "sparse", 0.0),
                                              ("lm", "dense", 0.6), ("lm", "sparse", 0.0)])
def test_exhaustive_beam_matches_brute_force(kind, name, alpha):
  seqs = _eos_sequences()  # [31, L]: the candidates beam search returns when some beam finishes
  res = _beams(kind, name, EXHAUSTIVE_BEAM, alpha)
  for row in range(2):
    scores = np.array([_score(kind, name, row, s, alpha) for s in seqs])
    best = int(np.argmax(scores))
    assert np.sort(scores)[-1] - np.sort(scores)[-2] > 1e-3, "ambiguous optimum; change the seed"
    np.testing.assert_array_equal(res.sequences[row, 0], seqs[best])
    np.testing.assert_allclose(res.scores[row, 0], scores[best], rtol=1e-5, atol=1e-5)
    # Nothing was pruned: the finished set is exactly all EOS-terminated sequences, each with its score.
    assert res.finished[row].sum() == len(seqs)
    found = {tuple(s): sc for s, sc, ok in zip(res.sequences[row], res.scores[row], res.finished[row]) if ok}
    assert set(found) == {tuple(s) for s in seqs}
    for s, expected in zip(seqs, scores):
      np.testing.assert_allclose(found[tuple(s)], expected, rtol=1e-5, atol=1e-5)
    assert np.all(np.diff(res.scores[row][res.finished[row]]) <= 0), "beams are sorted best first"


# --- narrower beams ---------------------------------------------------------------------------------------
def test_beam_scores_are_model_scores_and_grow_with_beam():
  """Every returned beam's score is its brute-force score; wider beams (here) never do worse.

  Beam search is not monotone in the beam width in general; on this input it is, and the widest beam
  reaches the brute-force optimum, which bounds every narrower one.
  """
  kind, name, alpha = "encdec", "dense", 0.6
  keys = []
  for beam in (1, 2, 4, EXHAUSTIVE_BEAM):
    res = _beams(kind, name, beam, alpha)
    assert res.valid[:, 0].all()
    for row in range(2):
      for s, sc, ok in zip(res.sequences[row], res.scores[row], res.valid[row]):
        if ok:  # finished beams, or alive fallbacks of rows with none (scored at length L)
          np.testing.assert_allclose(sc, _score(kind, name, row, s, alpha), rtol=1e-5, atol=1e-5)
    keys.append([(bool(res.finished[row, 0]), float(res.scores[row, 0])) for row in range(2)])
  for row in range(2):
    ranked = [k[row] for k in keys]  # a finished beam beats any unfinished fallback
    assert ranked == sorted(ranked), ranked
    optimum = max(_score(kind, name, row, s, alpha) for s in _eos_sequences())
    np.testing.assert_allclose(ranked[-1][1], optimum, rtol=1e-5)

def test_unfinished_rows_fall_back_to_alive_beams():
  """Max length 1, beam 2: a row finishes iff EOS is among its 2 best first tokens, else returns alive ones."""
  model, params = _model("encdec", "dense")
  logits = np.asarray(_forward(model, params, ENC_TOKENS, np.zeros((2, L), np.int32)))  # [2, L, V]
  first_lp = _log_softmax(logits[:, 0])  # [2, V]: the first step does not depend on later inputs
  res = _beams("encdec", "dense", 2, 0.6, length=1)
  lp1 = _penalty(1.0, 0.6)
  for row in range(2):
    order = np.argsort(-first_lp[row], kind="stable")
    if 1 in order[:2]:
      assert res.finished[row].tolist() == [True, False]
      assert res.sequences[row, 0, 0] == 1
      np.testing.assert_allclose(res.scores[row, 0], first_lp[row][1] / lp1, rtol=1e-5)
    else:
      assert not res.finished[row].any() and res.valid[row].all()
      np.testing.assert_array_equal(res.sequences[row, :, 0], order[:2])
      np.testing.assert_allclose(res.scores[row], first_lp[row][order[:2]] / lp1, rtol=1e-5)


# --- longer sequences: the early stop changes nothing ------------------------------------------------------



def _reference_beam_search(next_logp, beam: int, alpha: float, length: int, eos: int):
  """Plain-Python beam search with the same candidate rules but no early stop (runs all `length` steps).

  next_logp(prefixes) -> [len(prefixes), V] log-probabilities of the next token. Returns the finished
  (sequence, score) pairs best first, or the alive ones scored at `length` when nothing finished.
  """
  alive, finished = [((), 0.0)], []
  for t in range(length):
    rows = next_logp([seq for seq, _ in alive])
    cands = [(seq + (tok,), lp + rows[j][tok]) for j, (seq, lp) in enumerate(alive) for tok in range(V)]
    cands = sorted(cands, key=lambda c: -c[1])[:2 * beam]  # stable: ties keep (beam, token) order
    finished += [(seq, lp / _penalty(t + 1, alpha)) for rank, (seq, lp) in enumerate(cands)
                 if seq[-1] == eos and rank < beam]
    finished = sorted(finished, key=lambda c: -c[1])[:beam]
    alive = [(seq, lp) for seq, lp in cands if seq[-1] != eos][:beam]
  if finished:
    return finished
  return [(seq, lp / _penalty(length, alpha)) for seq, lp in alive]


def _synthetic_logits(tables: np.ndarray, row: int, step: int, fed: tuple) -> np.ndarray:
  """[V] next-token logits of a synthetic model: depends on the row, the step, the last fed token and the
  sum of all fed tokens (so a wrongly gathered cache changes them)."""
  return tables[row, step, fed[-1]] + tables[row, -1 - step, sum(fed) % V]


@pytest.mark.parametrize("beam,alpha", [(1, 0.0), (2, 0.6), (3, 2.0), (4, 0.6), (5, -0.5)])
def test_loop_matches_reference_on_synthetic_model(beam, alpha):
  """Length 8, 3 rows: same beams and scores as a no-early-stop reference, for a synthetic step function
  whose logits depend on the whole history kept in the 'cache' (so the per-step gather is checked too)."""
  length, batch = 8, 3
  tables = np.random.RandomState(7).standard_normal((batch, 2 * length, V, V)).astype(np.float32) * 1.5

  def step(tokens, cache, i):  # tokens [batch * beam, 1]; cache [batch * beam, length]: fed tokens so far
    cache = jax.lax.dynamic_update_slice(cache, tokens, (0, i))
    last = tokens[:, 0]
    rows = jnp.arange(batch * beam) // beam
    total = jnp.sum(cache, axis=1) % V
    t = jnp.asarray(tables)
    return t[rows, i, last] + t[rows, 2 * length - 1 - i, total], cache

  cfg = DecodeConfig(method="beam", beam_size=beam, length_penalty=alpha, max_decode_length=length)

  @jax.jit
  def run():
    state = beam_search.beam_loop(step, jnp.zeros((batch * beam, length), jnp.int32),
                                  beam_search.init_state(batch, beam, length), jnp.zeros((batch * beam,), jnp.int32),
                                  0, length, cfg)
    return beam_search.finalize(state, length, alpha)

  res = jax.tree_util.tree_map(np.asarray, run())
  num_finished = 0
  for row in range(batch):
    next_logp = lambda prefixes: [_log_softmax(_synthetic_logits(tables, row, len(p), (0,) + p)) for p in prefixes]
    expected = _reference_beam_search(next_logp, beam, alpha, length, 1)
    got = [(tuple(int(x) for x in s), sc) for s, sc, ok in zip(res.sequences[row], res.scores[row],
                                                               res.valid[row]) if ok]
    assert len(got) == len(expected)
    for (seq, score), (ref_seq, ref_score) in zip(got, expected):
      assert seq == ref_seq + (0,) * (length - len(ref_seq))
      np.testing.assert_allclose(score, ref_score, rtol=1e-5, atol=1e-5)
    num_finished += int(res.finished[row].sum())
  assert num_finished > 0


