"""seqio preprocessors for pretraining: chunking, T5 span corruption, prefix-LM and causal-LM (TensorFlow).

Imported only by the task registrations (`stmoe.tasks`) and the pipeline, never by `import stmoe`.
The arithmetic (lengths, what the mask means) is in `stmoe.data.span_corruption`, which also holds a
NumPy reference the tests compare these ops against.
"""

from __future__ import annotations

from collections.abc import Mapping

import seqio
import tensorflow as tf

from stmoe.data import span_corruption as sc

DEFAULT_INPUTS_LENGTH = 512  # used when seqio calls us without sequence lengths (e.g. caching)


def split_tokens(dataset: tf.data.Dataset, max_tokens: int, feature_key: str = "targets",
                 min_tokens: int = 1) -> tf.data.Dataset:
  """Cuts each example's `feature_key` tokens into consecutive chunks of at most `max_tokens`.

  Chunks shorter than `min_tokens` (the tail of a document) are dropped; nothing else is lost.
  """
  def chunks(ex):
    tokens = ex[feature_key]  # [n]
    starts = tf.range(0, tf.size(tokens), max_tokens)  # [num_chunks]
    ragged = tf.RaggedTensor.from_row_starts(tokens, starts)  # [num_chunks, <=max_tokens]
    return tf.data.Dataset.from_tensor_slices({feature_key: ragged})

  ds = dataset.flat_map(chunks)
  return ds.filter(lambda ex: tf.size(ex[feature_key]) >= min_tokens)


DOCUMENTS_PER_GROUP = 128


def concat_documents(dataset: tf.data.Dataset, feature_key: str = "targets",
                     documents_per_group: int = DOCUMENTS_PER_GROUP) -> tf.data.Dataset:
  """Concatenates the tokens of consecutive groups of documents (in order, no separator), as T5 does.

  Splitting the concatenation into chunks (`split_tokens`) then gives full-length examples even from
  short documents (one sentence per line), so packed batches carry no padding.
  """
  ds = dataset.map(lambda ex: {feature_key: ex[feature_key]})
  ds = ds.ragged_batch(documents_per_group)  # [docs, (tokens)]
  return ds.map(lambda ex: {feature_key: ex[feature_key].flat_values})  # [sum of tokens]


def _random_segmentation(num_items: tf.Tensor, num_segments: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Lengths (each >= 1) of `num_segments` random consecutive segments of `num_items` items."""
  order = tf.argsort(tf.random.stateless_uniform([num_items - 1], seed=seed))  # [num_items - 1]
  cuts = tf.sort(order[: num_segments - 1] + 1)  # [num_segments - 1]
  bounds = tf.concat([[0], cuts, [num_items]], axis=0)  # [num_segments + 1]
  return bounds[1:] - bounds[:-1]  # [num_segments]


def noise_mask(length: tf.Tensor, seeds: tf.Tensor, noise_density: float = sc.NOISE_DENSITY,
               mean_noise_span_length: float = sc.MEAN_NOISE_SPAN_LENGTH) -> tf.Tensor:
  """Boolean [length] mask: alternating non-noise / noise spans, starting with non-noise (length >= 2).

  Same counts as `span_corruption.noise_counts`: round(length * density) noise tokens (at least 1, at
  most length - 1) in round(num_noise / mean_span_length) spans (at least 1). `seeds`: [2, 2] int32.
  """
  length_f = tf.cast(length, tf.float32)
  num_noise = tf.cast(tf.round(length_f * noise_density), tf.int32)
  num_noise = tf.clip_by_value(num_noise, 1, length - 1)
  num_spans = tf.cast(tf.round(tf.cast(num_noise, tf.float32) / mean_noise_span_length), tf.int32)
  num_spans = tf.minimum(tf.maximum(num_spans, 1), tf.minimum(num_noise, length - num_noise))
  noise_lengths = _random_segmentation(num_noise, num_spans, seeds[0])  # [spans]
  keep_lengths = _random_segmentation(length - num_noise, num_spans, seeds[1])  # [spans]
  interleaved = tf.reshape(tf.stack([keep_lengths, noise_lengths], axis=1), [-1])  # [2 * spans]
  parity = tf.tile(tf.constant([False, True]), [num_spans])  # [2 * spans]
  return tf.repeat(parity, interleaved)  # [length]


def replace_spans_with_sentinels(tokens: tf.Tensor, mask: tf.Tensor, vocab_size: int) -> tf.Tensor:
  """Each run of masked tokens becomes one sentinel: vocab_size - 1 for the first run, then descending."""
  prev = tf.concat([[False], mask[:-1]], axis=0)  # [n]
  first = tf.logical_and(mask, tf.logical_not(prev))  # [n] first token of each run
  later = tf.logical_and(mask, prev)  # [n] the rest of each run: dropped
  sentinel = vocab_size - tf.cumsum(tf.cast(first, tf.int32))  # [n]
  out = tf.where(first, sentinel, tokens)  # [n]
  return tf.boolean_mask(out, tf.logical_not(later))


@seqio.map_over_dataset(num_seeds=2)
def _denoise(ex, seeds, vocab_size, noise_density, mean_noise_span_length):
  tokens = ex["targets"]  # [n]
  mask = noise_mask(tf.size(tokens), tf.stack(seeds), noise_density, mean_noise_span_length)  # [n]
  return {
      **{k: v for k, v in ex.items() if k != "targets"},
      "inputs": replace_spans_with_sentinels(tokens, mask, vocab_size),
      "targets": replace_spans_with_sentinels(tokens, tf.logical_not(mask), vocab_size),
  }


def span_corruption(dataset: tf.data.Dataset, sequence_length: Mapping[str, int] | None,
                    output_features: Mapping[str, seqio.Feature],
                    noise_density: float = sc.NOISE_DENSITY,
                    mean_noise_span_length: float = sc.MEAN_NOISE_SPAN_LENGTH) -> tf.data.Dataset:
  """T5 span corruption of tokenized "targets": chunks sized so the corrupted inputs fill "inputs".

  Expects tokenized text in "targets" (no EOS); documents are concatenated in groups of 128 and cut into
  chunks; produces "inputs" and "targets" without EOS (add it with
  `seqio.preprocessors.append_eos_after_trim`).
  """
  inputs_length = (sequence_length or {}).get("inputs") or DEFAULT_INPUTS_LENGTH
  tokens_length, _ = sc.span_corruption_lengths(inputs_length - 0, noise_density, mean_noise_span_length)
  vocab_size = output_features["targets"].vocabulary.vocab_size
  ds = split_tokens(concat_documents(dataset), tokens_length, "targets", min_tokens=2)
  return _denoise(ds, vocab_size=vocab_size, noise_density=noise_density,
                  mean_noise_span_length=mean_noise_span_length)


@seqio.map_over_dataset(num_seeds=1)
def _split_prefix(ex, seed, max_inputs, max_targets):
  tokens = ex["targets"]  # [n], n <= max_inputs + max_targets, n >= 2
  n = tf.size(tokens)
  low = tf.maximum(1, n - max_targets)
  high = tf.minimum(n - 1, max_inputs)  # inclusive
  k = tf.random.stateless_uniform([], seed=seed, minval=low, maxval=high + 1, dtype=tf.int32)
  return {**{k_: v for k_, v in ex.items() if k_ != "targets"}, "inputs": tokens[:k], "targets": tokens[k:]}


def prefix_lm(dataset: tf.data.Dataset, sequence_length: Mapping[str, int] | None) -> tf.data.Dataset:
  """Prefix LM: concatenated documents cut into chunks of up to inputs+targets-2 tokens, each split at a uniformly random point (no EOS yet).

  The split keeps both parts within their lengths (EOS included), so no token is trimmed away.
  """
  lengths = sequence_length or {"inputs": DEFAULT_INPUTS_LENGTH, "targets": DEFAULT_INPUTS_LENGTH}
  max_inputs, max_targets = lengths["inputs"] - 1, lengths["targets"] - 1
  ds = split_tokens(concat_documents(dataset), max_inputs + max_targets, "targets", min_tokens=2)
  return _split_prefix(ds, max_inputs=max_inputs, max_targets=max_targets)


def causal_lm(dataset: tf.data.Dataset, sequence_length: Mapping[str, int] | None) -> tf.data.Dataset:
  """Causal LM: concatenated documents' "targets" cut into chunks of targets_length - 1 tokens (+ EOS)."""
  targets_length = (sequence_length or {}).get("targets") or DEFAULT_INPUTS_LENGTH
  return split_tokens(concat_documents(dataset), targets_length - 1, "targets", min_tokens=1)
