"""The contract between a model and the decoding loops: two calls, one state, and row tiling / gathering.

A model that can be decoded (stmoe.models.api.EncoderDecoderModel and DecoderOnlyModel) provides

  decode_start(params, batch, max_decode_length, num_copies=1) -> (first_logits [batch * copies, vocab], state)
  decode_step(params, tokens [batch * copies, 1], state, index) -> (logits [batch * copies, vocab], state)

with the KV cache, and `reference_start` / `reference_step` with the same signatures that recompute the whole
prefix every step (the slow path `use_cache=False` that tests compare the cache against). `first_logits`
predict generated position 0; `decode_step` feeds the token generated at position `index` and returns the
logits of position `index + 1`. Rows are laid out row-major over copies: the copies of batch row 0 first.

The loops here never look inside a state, and stmoe.decoding imports no model module: the model is passed
in and duck-typed (`Decodable`), so greedy, sampling and beam search drive every model kind the same way.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Protocol

import jax
import jax.numpy as jnp

Array = jax.Array
Batch = Mapping[str, Array]


class DecodeState(NamedTuple):
  """What a model carries from one decode step to the next.

  cache: what the steps update (per-layer keys / values and the write index, or the reference path's token
    buffer); leaves with a leading dim are laid out [batch * copies, ...] and belong to one hypothesis each,
    so beam search reorders them by parent beam (`gather_beams`).
  context: inputs the steps only read (the encoder output and its tokens); laid out [batch * copies, ...]
    too but identical across the copies of a row, so it is never reordered.
  """

  cache: Any
  context: Any = ()


class Decodable(Protocol):
  """What the decoding loops need from a model (see the module docstring for the contract)."""

  def decode_start(self, params: Any, batch: Batch, max_decode_length: int,
                   num_copies: int = 1) -> tuple[Array, DecodeState]:
    ...

  def decode_step(self, params: Any, tokens: Array, state: DecodeState,
                  index: Array | int) -> tuple[Array, DecodeState]:
    ...

  def reference_start(self, params: Any, batch: Batch, max_decode_length: int,
                      num_copies: int = 1) -> tuple[Array, DecodeState]:
    ...

  def reference_step(self, params: Any, tokens: Array, state: DecodeState,
                     index: Array | int) -> tuple[Array, DecodeState]:
    ...


def decode_length(batch: Batch, max_decode_length: int | None) -> int:
  """Tokens to generate: max_decode_length, or else the width of the batch's decoder_input_tokens."""
  return max_decode_length or batch["decoder_input_tokens"].shape[1]


def tile_beams(tree: Any, copies: int) -> Any:
  """Repeats every leaf with a leading batch dim `copies` times: [batch, ...] -> [batch * copies, ...].

  Scalars (the cache's write index) are shared by all copies and left as they are.
  """
  return jax.tree_util.tree_map(lambda x: x if x.ndim == 0 else jnp.repeat(x, copies, axis=0), tree)


def gather_beams(tree: Any, flat_index: Array) -> Any:
  """Selects rows [batch * beam, ...] by flat_index [batch * beam] (parent of each new hypothesis)."""
  return jax.tree_util.tree_map(lambda x: x if x.ndim == 0 else jnp.take(x, flat_index, axis=0), tree)
