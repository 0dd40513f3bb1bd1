"""DecodeConfig: how `predict_batch` picks each next token (greedy, seeded sampling or beam search)."""

from __future__ import annotations

import dataclasses

from stmoe.special_ids import EOS_ID

METHODS = ("greedy", "sample", "beam")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """How to pick each next token; hashable, so that each distinct configuration is compiled once.

  method: "greedy" (argmax), "sample" (temperature / top-k, seeded by the rng passed to predict_batch) or
    "beam" (stmoe.decoding.beam_search).
  max_decode_length: tokens to generate; None: the width of the batch's decoder_input_tokens.
  temperature: sampling only; logits are divided by it (must be > 0).
  top_k: sampling only; keep the k largest logits (0: the full distribution).
  beam_size: beam search only; hypotheses kept per row.
  length_penalty: beam search only; GNMT alpha (0: rank by plain log-probability).
  eos_id: the token that ends a sequence.
  """

  method: str = "greedy"
  max_decode_length: int | None = None
  temperature: float = 1.0
  top_k: int = 0
  beam_size: int = 4
  length_penalty: float = 0.6
  eos_id: int = EOS_ID

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"DecodeConfig.method={self.method!r}: use 'greedy', 'sample' or 'beam'.")
    if self.method == "sample" and self.temperature <= 0:
      raise ValueError("Sampling needs temperature > 0; use method='greedy' for argmax decoding.")
