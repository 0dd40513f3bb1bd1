"""Shared pieces of the Hugging Face parity tests: padded batches and torch's summed log-likelihood."""

from __future__ import annotations

import numpy as np
import torch


def padded_batch(rng: np.random.RandomState, vocab: int, batch: int, enc_len: int, dec_len: int, *,
                 pad: bool = True, eos_last: bool = False) -> dict[str, np.ndarray]:
  """Random tokens in [2, vocab); rows after the first right-padded at random lengths, ending in EOS (1)."""
  enc = rng.randint(2, vocab, (batch, enc_len)).astype(np.int32)
  tgt = rng.randint(2, vocab, (batch, dec_len)).astype(np.int32)
  if eos_last:
    tgt[:, -1] = 1
  for row in range(1, batch if pad else 1):
    e, d = rng.randint(2, enc_len), rng.randint(2, dec_len)
    enc[row, e:] = 0
    tgt[row, d - 1] = 1
    tgt[row, d:] = 0
  dec_in = np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], axis=1)
  return {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in, "decoder_target_tokens": tgt,
          "decoder_loss_weights": (tgt > 0).astype(np.float32)}


def summed_loglik(logits: torch.Tensor, batch: dict[str, np.ndarray]) -> np.ndarray:
  """Per-row summed target log-likelihood (float64 log-softmax of HF's float32 logits), weighted."""
  log_probs = torch.log_softmax(logits.double(), dim=-1)
  labels = torch.tensor(batch["decoder_target_tokens"], dtype=torch.long)
  token_ll = log_probs.gather(-1, labels[..., None])[..., 0].numpy()
  return np.sum(token_ll * batch["decoder_loss_weights"], axis=-1)


def max_rel_err(ours, ref) -> float:
  return float(np.max(np.abs(np.asarray(ours, np.float64) - ref) / np.abs(ref)))
