"""T5 relative position buckets against an independent NumPy implementation of T5's bucketing."""

import math

import numpy as np
import pytest

from stmoe.layers.position import relative_position_bucket


def numpy_t5_bucket(relative_position: int, bidirectional: bool, num_buckets: int, max_distance: int) -> int:
  """Scalar re-implementation of Raffel et al.'s bucketing (mesh-tensorflow's _relative_position_bucket)."""
  n = -relative_position
  ret = 0
  if bidirectional:
    num_buckets //= 2
    if n < 0:
      ret += num_buckets
    n = abs(n)
  else:
    n = max(n, 0)
  max_exact = num_buckets // 2
  if n < max_exact:
    return ret + n
  val = max_exact + int(np.float32(math.log(np.float32(n) / max_exact)) / np.float32(math.log(max_distance / max_exact))
                        * (num_buckets - max_exact))
  return ret + min(val, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (16, 64)])
def test_buckets_match_numpy(bidirectional, num_buckets, max_distance):
  rel = np.arange(-300, 301)
  ours = np.asarray(relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=num_buckets,
                                             max_distance=max_distance))
  ref = np.array([numpy_t5_bucket(int(r), bidirectional, num_buckets, max_distance) for r in rel])
  np.testing.assert_array_equal(ours, ref)
  assert ours.min() >= 0 and ours.max() < num_buckets


def test_causal_buckets_ignore_future():
  rel = np.arange(1, 50)  # keys after the query
  ours = np.asarray(relative_position_bucket(rel, bidirectional=False, num_buckets=32, max_distance=128))
  assert (ours == 0).all()
