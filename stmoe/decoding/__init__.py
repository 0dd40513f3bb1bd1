"""Autoregressive decoding for any model that provides decode_start / decode_step (stmoe.decoding.state).

  config.py       DecodeConfig: greedy, seeded sampling or beam search, and their options
  state.py        the model contract (Decodable, DecodeState) and row tiling / gathering
  sampling.py     pick_next, decode_loop, generate: greedy and temperature / top-k sampling
  beam_search.py  beam search with length penalty (predict_beams: every beam with its score)
  predict.py      predict: dispatches on DecodeConfig.method

This package imports no model module; stmoe.models.api calls into it with the model object.
"""

from __future__ import annotations

from stmoe.decoding.beam_search import BeamResult, best_beam, predict_beams
from stmoe.decoding.config import DecodeConfig
from stmoe.decoding.predict import predict
from stmoe.decoding.sampling import StepFn, decode_loop, generate, pick_next
from stmoe.decoding.state import Decodable, DecodeState, decode_length, gather_beams, tile_beams
from stmoe.special_ids import EOS_ID, PAD_ID  # kept importable from stmoe.decoding (defined in special_ids)

__all__ = ["EOS_ID", "PAD_ID", "BeamResult", "DecodeConfig", "DecodeState", "Decodable", "StepFn", "best_beam",
           "decode_length", "decode_loop", "gather_beams", "generate", "pick_next", "predict", "predict_beams",
           "tile_beams"]
