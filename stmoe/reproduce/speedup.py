"""Compute-to-target speedups between two training curves (Artetxe et al. 2021's efficiency measure).

The paper's speedup of a sparse model over a dense one at a budget C is the training compute the dense
model needs to reach the perplexity the sparse model has after C, divided by C. Curves are known at
evaluated checkpoints only; between two of them the loss is interpolated linearly in compute, and the
resolution is the evaluation period. Two edge cases are reported as bounds, never as numbers:
  * the dense model never reaches the target within its curve -> a lower bound (its whole budget / C);
  * the dense model is already at the target at its first evaluated point -> an upper bound.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class Speedup:
  value: float  # dense compute to reach the target / sparse compute
  bound: str  # "" (a measured crossing), "lower" (dense never got there), "upper" (first point already there)
  target: float  # the sparse model's loss at the budget

  def text(self, digits: int = 2) -> str:
    prefix = {"": "", "lower": ">", "upper": "<"}[self.bound]
    return f"{prefix}{self.value:.{digits}f}"


def value_at(x: Sequence[float], y: Sequence[float], at: float) -> float:
  """y interpolated linearly at x=`at` (x increasing; `at` must lie within the curve)."""
  if not x[0] <= at <= x[-1]:
    raise ValueError(f"{at} is outside the curve's range [{x[0]}, {x[-1]}].")
  for i in range(1, len(x)):
    if at <= x[i]:
      t = (at - x[i - 1]) / (x[i] - x[i - 1])
      return y[i - 1] + t * (y[i] - y[i - 1])
  return y[-1]


def compute_to_reach(x: Sequence[float], y: Sequence[float], target: float) -> float | None:
  """The first x at which the curve y(x) falls to `target` (linear between points); None if it never does."""
  if not x:
    return None
  if y[0] <= target:
    return float(x[0])
  for i in range(1, len(x)):
    if y[i] <= target:
      t = (y[i - 1] - target) / (y[i - 1] - y[i])
      return float(x[i - 1] + t * (x[i] - x[i - 1]))
  return None


def speedup(sparse_compute: Sequence[float], sparse_loss: Sequence[float], dense_compute: Sequence[float],
            dense_loss: Sequence[float], budget: float) -> Speedup:
  """Dense compute to reach the sparse loss at `budget`, divided by `budget` (see the module docstring)."""
  if any(math.isnan(v) for v in list(sparse_loss) + list(dense_loss)):
    return Speedup(math.nan, "", math.nan)
  target = value_at(sparse_compute, sparse_loss, budget)
  reached = compute_to_reach(dense_compute, dense_loss, target)
  if reached is None:
    return Speedup(dense_compute[-1] / budget, "lower", target)
  if dense_loss[0] <= target:
    return Speedup(reached / budget, "upper", target)
  return Speedup(reached / budget, "", target)
