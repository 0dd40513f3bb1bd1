"""Span corruption: lengths, statistics over many examples, sentinel order, exact restoration of the text."""

import numpy as np
import pytest

from stmoe.data import span_corruption as sc


def test_lengths_match_t5_numbers():
  # T5 (Raffel et al. 2020) pretrains with inputs 512 -> 568 raw tokens and 114 target tokens.
  assert sc.span_corruption_lengths(512) == (568, 114)
  for inputs_length in (16, 64, 100, 512, 1024):
    tokens, targets = sc.span_corruption_lengths(inputs_length)
    # independent count: 15% noise, spans of 3, one sentinel per span, EOS on both sides
    noise = round(tokens * 0.15)
    spans = round(noise / 3)
    assert tokens - noise + spans + 1 <= inputs_length
    noise1 = round((tokens + 1) * 0.15)
    assert (tokens + 1) - noise1 + round(noise1 / 3) + 1 > inputs_length  # the longest that fits
    assert targets == noise + spans + 1


def test_numpy_reference_statistics_and_roundtrip():
  rng = np.random.default_rng(0)
  noise, total, span_lengths = 0, 0, []
  for _ in range(300):
    n = int(rng.integers(20, 200))
    mask = sc.noise_mask(n, rng)
    noise += mask.sum()
    total += n
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    starts, ends = np.where(edges == 1)[0], np.where(edges == -1)[0]
    span_lengths += list(ends - starts)
    assert not mask[0]  # spans alternate starting with non-noise
    tokens = rng.integers(3, 900, size=n)
    inputs, targets = sc.apply_span_corruption(tokens, mask, vocab_size=1000)
    assert sc.restore_text_ids(inputs, targets, vocab_size=1000) == tokens.tolist()
  assert abs(noise / total - 0.15) < 0.01
  assert abs(np.mean(span_lengths) - 3.0) < 0.3


@pytest.fixture(scope="module")
def tf_preprocessors():
  from stmoe.data import preprocessors
  return preprocessors


def test_tf_noise_mask_counts(tf_preprocessors):
  import tensorflow as tf
  span_lengths, noise, total = [], 0, 0
  for i, n in enumerate([2, 3, 10, 57, 100, 568] * 20):
    seeds = tf.constant([[i, 1], [i, 2]], tf.int32)
    mask = tf_preprocessors.noise_mask(tf.constant(n), seeds).numpy()
    assert mask.shape == (n,) and not mask[0]
    num_noise, num_spans = sc.noise_counts(n, 0.15, 3.0)
    assert mask.sum() == num_noise
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    lengths = np.where(edges == -1)[0] - np.where(edges == 1)[0]
    assert len(lengths) == min(num_spans, num_noise, n - num_noise)
    if n >= 57:
      span_lengths += list(lengths)
      noise += mask.sum()
      total += n
  assert abs(noise / total - 0.15) < 0.005
  assert abs(np.mean(span_lengths) - 3.0) < 0.3


def test_tf_sentinels_match_numpy_reference(tf_preprocessors):
  import tensorflow as tf
  rng = np.random.default_rng(1)
  for _ in range(20):
    n = int(rng.integers(5, 80))
    mask = sc.noise_mask(n, rng)
    tokens = rng.integers(3, 900, size=n).astype(np.int32)
    want_in, want_tg = sc.apply_span_corruption(tokens, mask, vocab_size=1000)
    got_in = tf_preprocessors.replace_spans_with_sentinels(tf.constant(tokens), tf.constant(mask), 1000)
    got_tg = tf_preprocessors.replace_spans_with_sentinels(tf.constant(tokens), tf.constant(~mask), 1000)
    np.testing.assert_array_equal(np.append(got_in.numpy(), 1), want_in)
    np.testing.assert_array_equal(np.append(got_tg.numpy(), 1), want_tg)


@pytest.fixture(scope="module")
def corrupted_examples():
  import seqio
  import stmoe.tasks  # noqa: F401
  task = seqio.get_mixture_or_task("shakespeare_span_corruption")
  lengths = {"inputs": 128, "targets": 32}
  ds = task.get_dataset(lengths, split="validation", shuffle=False, seed=7)
  return task, lengths, list(ds.take(300).as_numpy_iterator())


def test_task_statistics_and_sentinels(corrupted_examples):
  task, lengths, examples = corrupted_examples
  vocab_size = task.output_features["targets"].vocabulary.vocab_size
  is_sentinel = lambda t: t >= vocab_size - 100  # noqa: E731
  tokens_length, targets_length = sc.span_corruption_lengths(lengths["inputs"])
  noise, total, spans = 0, 0, 0
  for ex in examples:
    inputs, targets = ex["inputs"], ex["targets"]
    assert inputs[-1] == 1 and targets[-1] == 1  # EOS
    assert len(inputs) <= lengths["inputs"] and len(targets) <= targets_length
    sent_in = [t for t in inputs if is_sentinel(t)]
    sent_tg = [t for t in targets if is_sentinel(t)]
    assert sent_in == sent_tg == list(range(vocab_size - 1, vocab_size - 1 - len(sent_in), -1))
    n_noise = sum(1 for t in targets[:-1] if not is_sentinel(t))
    n_keep = sum(1 for t in inputs[:-1] if not is_sentinel(t))
    if n_noise + n_keep == tokens_length:  # full chunks (not a document's tail)
      assert len(inputs) == lengths["inputs"]
      noise += n_noise
      total += n_noise + n_keep
      spans += len(sent_in)
  assert total > 100 * tokens_length
  assert abs(noise / total - 0.15) < 0.01
  assert abs(noise / spans - 3.0) < 0.3


def test_decoding_inputs_and_targets_restores_the_text(corrupted_examples):
  from stmoe.data import bundled
  task, _, examples = corrupted_examples
  vocab = task.output_features["targets"].vocabulary
  doc = bundled.shakespeare_documents("validation")[0]
  want = vocab.encode(doc)
  restored = []
  for ex in examples:
    restored += sc.restore_text_ids(ex["inputs"], ex["targets"], vocab.vocab_size)
    if len(restored) >= len(want) - 1:
      break
  assert restored[: len(want)] == want[: len(restored)]
  assert vocab.decode(restored[:40]) == vocab.decode(want[:40])
  assert "DRAMATIS PERSONAE" in vocab.decode(restored)
