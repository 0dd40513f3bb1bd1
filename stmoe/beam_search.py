"""Deprecated (kept for one release): beam search moved to `stmoe.decoding.beam_search`.

Import from `stmoe.decoding.beam_search` (or `stmoe.decoding` for predict_beams / BeamResult). The old
per-model entry points (encoder_decoder_beams, decoder_only_beams and their *_beam_search variants) are gone:
`predict_beams(model, params, batch, cfg)` drives every model kind through decode_start / decode_step.
"""

from __future__ import annotations

from stmoe.decoding.beam_search import (NEG_INF, BeamResult, BeamState, StepFn, beam_loop, best_beam, expand,
                                        finalize, gather_beams, init_state, length_penalty, predict_beams,
                                        rows_done, tile_beams)

__all__ = ["NEG_INF", "BeamResult", "BeamState", "StepFn", "beam_loop", "best_beam", "expand", "finalize",
           "gather_beams", "init_state", "length_penalty", "predict_beams", "rows_done", "tile_beams"]
