"""What the ST-MoE / Shazeer experiments share: an arm grid over one base model, each run trained with the
same settings, then its final checkpoint scored on fixed validation batches (optionally under evaluation
overrides such as another capacity factor), plus summaries of the logged router metrics.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from stmoe.reproduce import runs as runs_lib


def arm_specs(base: Sequence[str], arms: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
  """Each arm = the base model's gin files/bindings followed by the arm's own (which win)."""
  return {name: list(base) + list(extra) for name, extra in arms.items()}


class FinalEval:
  """Scores the final checkpoint of runs on fixed validation batches of one task (built on first use)."""

  def __init__(self, settings: runs_lib.TrainSettings, model_type: str, num_batches: int,
               metrics: Sequence[str] = ("cross_entropy",)):
    self.settings, self.model_type, self.num_batches, self.metrics = settings, model_type, num_batches, metrics
    self._held: runs_lib.HeldOut | None = None

  def held_out(self) -> runs_lib.HeldOut:
    if self._held is None:
      s = self.settings
      self._held = runs_lib.held_out_batches("validation", s.task, "validation", s.feature_lengths, s.batch_size,
                                             self.num_batches, self.model_type)
    return self._held

  def __call__(self, spec: Sequence[str], model_dir: str) -> dict[str, float]:
    """{metric: value} at the newest checkpoint (NaN for every metric if there is none)."""
    steps = runs_lib.checkpoint_steps(model_dir)
    if not steps:
      return {m: math.nan for m in self.metrics}
    curves = runs_lib.evaluate_checkpoints(spec, model_dir, [self.held_out()], self.settings.batch_size,
                                           self.settings.feature_lengths, steps=[steps[-1]], metrics=self.metrics)
    return {m: curves["validation"][m][0] for m in self.metrics} | {"step": steps[-1]}


def tail_mean(model_dir: str, key: str, fraction: float = 0.2) -> float:
  """Mean of a logged training metric over the last `fraction` of its logged steps (NaN if never logged)."""
  series = runs_lib.metric_series(model_dir, key)[key]
  if not series:
    return math.nan
  n = max(1, int(round(len(series) * fraction)))
  return float(np.mean(series[-n:]))


def steps_per_second(model_dir: str, skip: int = 2) -> float:
  """Median logged steps/s, skipping the first `skip` log intervals (compilation, warm-up)."""
  values = runs_lib.metric_series(model_dir, "steps_per_second")["steps_per_second"][skip:]
  return float(np.median(values)) if values else math.nan
