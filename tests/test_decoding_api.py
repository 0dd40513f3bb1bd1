"""The decoding contract: stmoe.decoding drives any object with decode_start / decode_step, imports no model
module, and the deprecated stmoe.beam_search re-exports the same objects."""

from __future__ import annotations

import ast
import os

import jax
import jax.numpy as jnp
import numpy as np

from model_fixtures import tiny_config
from stmoe import beam_search as deprecated_beam_search
from stmoe import decoding
from stmoe.decoding import DecodeConfig, DecodeState
from stmoe.models.api import make_model

DECODING_DIR = os.path.join(os.path.dirname(__file__), "..", "stmoe", "decoding")


def test_decoding_imports_no_model_module():
  """models -> decoding only: no module of stmoe/decoding imports stmoe.models, not even inside a function."""
  for name in os.listdir(DECODING_DIR):
    if not name.endswith(".py"):
      continue
    tree = ast.parse(open(os.path.join(DECODING_DIR, name), encoding="utf-8").read())
    for node in ast.walk(tree):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import)
               else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      assert not any(n.startswith("stmoe.models") for n in names), (name, names)


def test_deprecated_module_reexports_the_new_one():
  for name in deprecated_beam_search.__all__:
    assert getattr(deprecated_beam_search, name) is getattr(decoding.beam_search, name)
  assert decoding.EOS_ID == 1 and decoding.PAD_ID == 0


class ToyModel:
  """A duck-typed Decodable (no stmoe model): logits depend on the last token and on the row.

  The state's cache counts the steps (gathered by beam search); the context holds per-row biases.
  """

  def __init__(self, table: np.ndarray):
    self.table = jnp.asarray(table)  # [vocab, vocab]

  def decode_start(self, params, batch, max_decode_length, num_copies=1):
    bias = jnp.repeat(batch["bias"], num_copies, axis=0)  # [rows, vocab]
    start = jnp.zeros((bias.shape[0], 1), jnp.int32)
    return self.decode_step(params, start, DecodeState(jnp.zeros((bias.shape[0],), jnp.int32), bias), -1)

  def decode_step(self, params, tokens, state, index):
    logits = params * self.table[tokens[:, 0]] + state.context  # [rows, vocab]
    return logits, DecodeState(state.cache + 1, state.context)

  reference_start = decode_start
  reference_step = decode_step


def test_any_decodable_object_is_decoded():
  rng = np.random.RandomState(0)
  vocab, batch, length = 7, 3, 5
  model = ToyModel(rng.standard_normal((vocab, vocab)).astype(np.float32) * 2)
  feed = {"bias": jnp.asarray(rng.standard_normal((batch, vocab)).astype(np.float32)),
          "decoder_input_tokens": jnp.zeros((batch, length), jnp.int32)}
  greedy = np.asarray(decoding.predict(model, 1.0, feed, DecodeConfig()))
  assert greedy.shape == (batch, length)
  beam1 = np.asarray(decoding.predict(model, 1.0, feed, DecodeConfig(method="beam", beam_size=1, length_penalty=0.0)))
  np.testing.assert_array_equal(greedy, beam1)
  beams = decoding.predict_beams(model, 1.0, feed, DecodeConfig(method="beam", beam_size=3))
  assert beams.sequences.shape == (batch, 3, length)
  sampled = [np.asarray(decoding.predict(model, 1.0, feed, DecodeConfig(method="sample"), jax.random.PRNGKey(5)))
             for _ in range(2)]
  np.testing.assert_array_equal(*sampled)


def test_model_decode_start_lays_out_copies():
  """Both model kinds: first logits [batch * copies, vocab]; a decoder-only prefill is shared by the copies."""
  config = tiny_config(vocab_size=11, num_encoder_layers=1, num_decoder_layers=1)
  prompts = jnp.asarray([[0, 3, 4, 0], [0, 5, 6, 7]], jnp.int32)
  cases = [(make_model(config), {"encoder_input_tokens": prompts, "decoder_input_tokens": jnp.zeros((2, 3), jnp.int32)},
            {"encoder_input_tokens": (2, 4), "decoder_input_tokens": (2, 3)}),
           (make_model(config.replace(decoder_only=True, num_encoder_layers=0)), {"decoder_input_tokens": prompts},
            {"decoder_input_tokens": (2, 4)})]
  for model, feed, shapes in cases:
    params = model.get_initial_variables(jax.random.PRNGKey(0), shapes)["params"]
    one, _ = model.decode_start(params, feed, 3)
    three, state = model.decode_start(params, feed, 3, num_copies=3)
    assert one.shape == (2, 11) and three.shape == (6, 11)
    np.testing.assert_allclose(np.asarray(three).reshape(2, 3, 11), np.repeat(np.asarray(one)[:, None], 3, 1),
                               rtol=1e-5, atol=1e-6)
    logits, _ = model.decode_step(params, jnp.argmax(three, -1)[:, None].astype(jnp.int32), state, 0)
    assert logits.shape == (6, 11)
