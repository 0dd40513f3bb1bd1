"""Shared helpers for the training tests: a tiny top-2 sparse model and a synthetic train run.

Run as `python -m tests.helpers_train ...`? No: the subprocess tests run scripts through
`python tests/helpers_train.py MODE ...` with XLA_FLAGS set in the child's environment only.
"""

from __future__ import annotations

import json
import os
import sys  # noqa: F401


FEATURE_LENGTHS = {"inputs": 16, "targets": 8}
VOCAB = 64


def tiny_config(num_experts: int = 4, dtype: str = "float32", **moe_overrides):
  """2+2 layers, d_model 32, 4 heads, 4 experts top-2 on every other layer (layers 1 of each stack)."""
  from stmoe.config import ModelConfig, MoeConfig, SparseLayout

  moe = MoeConfig(num_experts=num_experts, num_selected_experts=2, d_ff=32, group_size=32,
                  train_capacity_factor=2.0, eval_capacity_factor=2.0, **moe_overrides)
  return ModelConfig(vocab_size=VOCAB, d_model=32, num_heads=4, d_kv=8, d_ff=64, num_encoder_layers=2,
                     num_decoder_layers=2, activations=("relu",), moe=moe, dtype=dtype,
                     encoder_sparse=SparseLayout(kind="every", every=2),
                     decoder_sparse=SparseLayout(kind="every", every=2))


def tiny_model(**kw):
  from stmoe.models.api import make_model

  return make_model(tiny_config(**kw))
