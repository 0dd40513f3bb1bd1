"""`predict`: one entry point that picks greedy / sampling or beam search from a DecodeConfig."""

from __future__ import annotations

from typing import Any

import jax

from stmoe.decoding.beam_search import best_beam
from stmoe.decoding.config import DecodeConfig
from stmoe.decoding.sampling import generate
from stmoe.decoding.state import Batch, Decodable

Array = jax.Array


def predict(model: Decodable, params: Any, batch: Batch, cfg: DecodeConfig, rng: Array | None = None, *,
            use_cache: bool = True) -> Array:
  """Decoded ids [batch, max_decode_length] int32 (0 after EOS), by cfg.method, for any `Decodable` model.

  use_cache=False selects the model's uncached reference path for greedy and sampling; beam search always
  uses the KV cache.
  """
  if cfg.method == "beam":
    return best_beam(model, params, batch, cfg)
  return generate(model, params, batch, cfg, rng, use_cache=use_cache)
