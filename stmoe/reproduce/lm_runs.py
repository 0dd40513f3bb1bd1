"""The language models of Artetxe et al. 2021 at toy scale: a top-2 MoE LM and its FLOP-matched dense LM,
trained on the same tokens with the same schedule, evaluated at every checkpoint on in- and out-of-domain
held-out text. Shared by `moe_vs_dense_lm` (the curves and speedups) and `few_shot_priming` (which primes
the final checkpoints), so both are configured by the one gin-configurable `LmExperiment`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import gin

from stmoe.errors import UserError
from stmoe.reproduce import runs as runs_lib


@gin.configurable
@dataclasses.dataclass
class LmExperiment:
  """The paired LMs and their budget (gin/experiments/moe_vs_dense_lm.gin binds every field).

  arms: {name: [gin files and bindings]}; `sparse_arm` / `dense_arm` name the pair the speedup compares.
  held_out: {name: (task, split)}: the evaluation text; `in_domain` names the one drawn from the training
    distribution (held-out plays), the others are out-of-domain.
  checkpoint_period: the spacing of the evaluated points of the curves (every checkpoint is kept).
  eval_batches: batches of each held-out set (the same fixed batches for every run and checkpoint).
  budget_fraction: the speedup is measured at this fraction of the sparse model's training budget, so the
    dense model has the rest of its own budget to catch up (a lower bound is reported if it does not).
  """
  arms: Mapping[str, Sequence[str]] = gin.REQUIRED
  sparse_arm: str = "moe"
  dense_arm: str = "dense"
  task: str = "shakespeare_lm"
  targets_length: int = 128
  train_steps: int = 1000
  batch_size: int = 16
  learning_rate: float = 0.01
  checkpoint_period: int = 100
  held_out: Mapping[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
  in_domain: str = "plays"
  eval_batches: int = 16
  budget_fraction: float = 0.5

  def __post_init__(self):
    for name in (self.sparse_arm, self.dense_arm):
      if name not in self.arms:
        raise UserError(f"LmExperiment: arm {name!r} is not among arms {list(self.arms)}.")
    if self.held_out and self.in_domain not in self.held_out:
      raise UserError(f"LmExperiment.in_domain={self.in_domain!r} is not a held-out set: {list(self.held_out)}.")
    if not 0 < self.budget_fraction <= 1:
      raise UserError(f"LmExperiment.budget_fraction={self.budget_fraction} must be in (0, 1].")

  @property
  def settings(self) -> runs_lib.TrainSettings:
    return runs_lib.TrainSettings(task=self.task, feature_lengths={"targets": self.targets_length},
                                  train_steps=self.train_steps, batch_size=self.batch_size,
                                  learning_rate=self.learning_rate, checkpoint_period=self.checkpoint_period)

  @property
  def tokens_per_step(self) -> int:
    return self.batch_size * self.targets_length


def train_and_evaluate(ctx: Any, exp: LmExperiment, *, evaluate: bool = True) -> list[dict[str, Any]]:
  """Every (arm, seed) run: trained (or resumed, or read back when finished) and, with `evaluate`, each
  checkpoint scored on every held-out set. Returns one record per run (written as the run's
  run_result.json), in seed-major order."""
  settings = exp.settings
  flops = {arm: runs_lib.model_flops(spec, settings.feature_lengths) for arm, spec in exp.arms.items()}
  held: list[runs_lib.HeldOut] = []

  def after(arm: str, seed: int, model_dir: str, trained: dict[str, Any]) -> dict[str, Any]:
    curves = {}
    if evaluate and exp.held_out:
      if not held:
        held.extend(runs_lib.held_out_batches(name, task, split, settings.feature_lengths, exp.batch_size,
                                              exp.eval_batches, "decoder_only")
                    for name, (task, split) in exp.held_out.items())
      curves = runs_lib.evaluate_checkpoints(exp.arms[arm], model_dir, held, exp.batch_size,
                                             settings.feature_lengths)
    compute_per_step = flops[arm]["flops_per_token"] * exp.tokens_per_step
    for c in curves.values():
      c["train_flops"] = [s * compute_per_step for s in c["step"]]
      c["perplexity"] = [math.exp(v) if math.isfinite(v) else math.nan for v in c["cross_entropy"]]
    return {"model": flops[arm], "train_flops_per_step": compute_per_step, "curves": curves,
            "evaluated": evaluate, "train_loss": runs_lib.metric_series(model_dir, "loss")}

  return runs_lib.train_all(ctx, exp.arms, lambda arm: settings, after=after,
                            done=lambda record: bool(record.get("evaluated")) or not evaluate,
                            train_kwargs=lambda arm, seed: {"keep_checkpoints": None})


def final_checkpoint(record: Mapping[str, Any]) -> str:
  """The newest checkpoint of a finished run (few-shot priming scores it)."""
  steps = runs_lib.checkpoint_steps(record["model_dir"])
  if not steps:
    raise UserError(f"the run {record['model_dir']} has no checkpoint; rerun the experiment to train it.")
  return f"{record['model_dir']}/checkpoints/{steps[-1]}"
