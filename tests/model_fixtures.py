"""Tiny model configurations and batch builders shared by the model tests."""

from __future__ import annotations

import numpy as np

from stmoe.config import ModelConfig, MoeConfig, SparseLayout

VOCAB = 97


def tiny_config(**overrides) -> ModelConfig:
  base = dict(vocab_size=VOCAB, d_model=32, num_heads=4, d_kv=12, d_ff=48, num_encoder_layers=2,
              num_decoder_layers=2, relative_attention_num_buckets=8, relative_attention_max_distance=20)
  base.update(overrides)
  return ModelConfig(**base)


def tiny_sparse_config(**overrides) -> ModelConfig:
  """Top-2 MoE on every other layer with a capacity large enough that no token is ever dropped."""
  moe = MoeConfig(num_experts=4, num_selected_experts=2, d_ff=24, group_size=8, train_capacity_factor=8.0,
                  eval_capacity_factor=8.0, dispatch="sort")
  layout = SparseLayout(kind="every", every=2)
  base = dict(moe=moe, encoder_sparse=layout, decoder_sparse=layout)
  base.update(overrides)
  return tiny_config(**base)


def random_batch(rng: np.random.RandomState, batch: int, enc_len: int, dec_len: int) -> dict[str, np.ndarray]:
  """Encoder-decoder batch with t5x feature names; ids >= 2 so that no token is padding or EOS."""
  targets = rng.randint(2, VOCAB, (batch, dec_len)).astype(np.int32)
  return {
      "encoder_input_tokens": rng.randint(2, VOCAB, (batch, enc_len)).astype(np.int32),
      "decoder_target_tokens": targets,
      "decoder_input_tokens": shift_right(targets),
      "decoder_loss_weights": np.ones_like(targets, np.float32),
  }


def shift_right(targets: np.ndarray) -> np.ndarray:
  out = np.zeros_like(targets)
  out[:, 1:] = targets[:, :-1]
  return out
