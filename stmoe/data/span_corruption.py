"""T5 span corruption: lengths and a NumPy reference of the noise mask (no TensorFlow).

Span corruption (Raffel et al. 2020, section 3.7): choose round(noise_density * n) noise tokens in
round(num_noise / mean_noise_span_length) spans; the inputs keep the other tokens with each noise span
replaced by one sentinel; the targets list each noise span after its sentinel. Sentinels count down
from the top of the vocabulary (extra_id_0 = vocab_size - 1, extra_id_1 = vocab_size - 2, ...).

The TensorFlow version used by the tasks is `stmoe.data.preprocessors`; this module holds the pure
arithmetic (shared by both) and an independent NumPy implementation the tests compare against.
"""

from __future__ import annotations

import numpy as np

NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0


def noise_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
  """(num_noise_tokens, num_noise_spans) for a sequence of `length` tokens.

  At least one noise token and one non-noise token (for length >= 2), at least one span, and no more
  spans than either kind of token allows (every span and every gap between spans is non-empty).
  """
  num_noise = int(round(length * noise_density))
  num_noise = min(max(num_noise, 1), length - 1)
  num_spans = int(round(num_noise / mean_noise_span_length))
  num_spans = max(num_spans, 1)
  return num_noise, num_spans


def corrupted_lengths(tokens_length: int, noise_density: float = NOISE_DENSITY,
                      mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> tuple[int, int]:
  """(inputs_length, targets_length) after span-corrupting `tokens_length` tokens, each with its EOS.

  inputs = the non-noise tokens + one sentinel per span + EOS; targets = the noise tokens + one sentinel
  per span + EOS.
  """
  num_noise = int(round(tokens_length * noise_density))
  num_spans = int(round(num_noise / mean_noise_span_length))
  return (tokens_length - num_noise) + num_spans + 1, num_noise + num_spans + 1


def span_corruption_lengths(inputs_length: int, noise_density: float = NOISE_DENSITY,
                            mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> tuple[int, int]:
  """(tokens_length, targets_length): the longest raw chunk whose corrupted inputs fit `inputs_length`.

  The pipeline cuts the tokenized text into chunks of `tokens_length` tokens, so the corrupted inputs
  (with EOS) fill `inputs_length` exactly and the targets need `targets_length` (for 512: 568 and 114,
  T5's numbers). Request TASK_FEATURE_LENGTHS = {"inputs": inputs_length, "targets": targets_length}.
  """
  if inputs_length < 3:
    raise ValueError(f"inputs_length must be at least 3 for span corruption, got {inputs_length}.")
  tokens_length = inputs_length
  while corrupted_lengths(tokens_length + 1, noise_density, mean_noise_span_length)[0] <= inputs_length:
    tokens_length += 1
  _, targets_length = corrupted_lengths(tokens_length, noise_density, mean_noise_span_length)
  if noise_density == 0.5 and targets_length > inputs_length:
    # Rounding can make the targets one longer at density 0.5; keep them within the inputs' budget.
    tokens_length -= 1
    targets_length -= 1
  return tokens_length, targets_length


def random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
  """Random lengths (each >= 1) of `num_segments` consecutive segments covering `num_items` items."""
  cuts = np.sort(rng.permutation(np.arange(1, num_items))[: num_segments - 1])  # [num_segments - 1]
  bounds = np.concatenate([[0], cuts, [num_items]])  # [num_segments + 1]
  return np.diff(bounds)  # [num_segments]


def noise_mask(length: int, rng: np.random.Generator, noise_density: float = NOISE_DENSITY,
               mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> np.ndarray:
  """Boolean [length] mask: non-noise and noise spans alternate, starting with non-noise."""
  num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
  num_spans = min(num_spans, num_noise, length - num_noise)
  noise_lengths = random_segmentation(num_noise, num_spans, rng)  # [spans]
  keep_lengths = random_segmentation(length - num_noise, num_spans, rng)  # [spans]
  interleaved = np.stack([keep_lengths, noise_lengths], axis=1).reshape(-1)  # [2 * spans]
  return np.repeat(np.tile([False, True], num_spans), interleaved)  # [length]


def apply_span_corruption(tokens: np.ndarray, mask: np.ndarray, vocab_size: int,
                          eos_id: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets) with EOS for `tokens` [n] and a noise `mask` [n]; sentinels descend from the top."""
  inputs, targets = [], []
  sentinel = vocab_size - 1
  for i, (tok, noisy) in enumerate(zip(tokens.tolist(), mask.tolist())):
    starts_span = noisy and (i == 0 or not mask[i - 1])
    if starts_span:
      inputs.append(sentinel)
      targets.append(sentinel)
      sentinel -= 1
    (targets if noisy else inputs).append(tok)
  return np.array(inputs + [eos_id], np.int32), np.array(targets + [eos_id], np.int32)


def restore_text_ids(inputs: np.ndarray, targets: np.ndarray, vocab_size: int,
                     num_sentinels: int = 100, eos_id: int = 1) -> list[int]:
  """Inverts span corruption: each sentinel in `inputs` is replaced by the span after it in `targets`.

  Raises if the sentinels of inputs and targets don't match one to one in the same descending order.
  """
  def is_sentinel(t: int) -> bool:
    return vocab_size - num_sentinels <= t < vocab_size

  inputs = [t for t in inputs.tolist() if t != eos_id and t != 0]
  targets = [t for t in targets.tolist() if t != eos_id and t != 0]
  spans: dict[int, list[int]] = {}
  order, current = [], None
  for t in targets:
    if is_sentinel(t):
      current = t
      order.append(t)
      spans[t] = []
    elif current is None:
      raise ValueError("targets do not start with a sentinel")
    else:
      spans[current].append(t)
  in_order = [t for t in inputs if is_sentinel(t)]
  if in_order != order:
    raise ValueError(f"sentinels differ: inputs {in_order} vs targets {order}")
  if order != list(range(vocab_size - 1, vocab_size - 1 - len(order), -1)):
    raise ValueError(f"sentinels are not consecutive descending from the top: {order}")
  out = []
  for t in inputs:
    out += spans[t] if is_sentinel(t) else [t]
  return out
