"""`stmoe reproduce capacity_grid`: ST-MoE Table 8 / Switch Table 1 at toy scale.

Top-1 and top-2 routing trained at capacity factors {0.75, 1.0, 1.25, 2.0}, each evaluated at its training
factor and at 2.0 (the ST-MoE convention), beside the FLOP-matched dense model (matched to top-2). For each:
validation loss (and negative log perplexity = -loss, the papers' unit), the fraction of tokens dropped
(training: the mean over the last 20% of logged steps; evaluation), training step time and FLOPs per token.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import gin

from stmoe.reproduce import report, runs as runs_lib, sparse_runs
from stmoe.reproduce.harness import ExperimentContext, Finding, Report, Table

PAPER = {
    "source": "Zoph et al. 2022 (ST-MoE), Table 8; Fedus et al. 2021 (Switch), Table 1",
    "neg_log_perplexity": {
        "top1_cf0.75": {"train": -1.428, "eval2.0": -1.404}, "top2_cf0.75": {"train": -1.424, "eval2.0": -1.402},
        "top1_cf1.25": {"train": -1.378, "eval2.0": -1.373}, "top2_cf1.25": {"train": -1.375, "eval2.0": -1.369},
        "top2_cf2.0": {"train": -1.360}, "dense": {"train": -1.474},
    },
    "step_time": "train capacity factor 1.25 -> 2.0 cost +7% step time for ST-MoE-L",
}


@gin.configurable
@dataclasses.dataclass
class CapacityGrid:
  """The grid (gin/experiments/capacity_grid.gin)."""
  base: Sequence[str] = ("models/st_moe_tiny.gin", "VOCAB_SIZE = 8192")
  dense: Sequence[str] = ("models/st_moe_tiny_dense.gin", "VOCAB_SIZE = 8192")
  top_k: Sequence[int] = (1, 2)
  train_capacity_factors: Sequence[float] = (0.75, 1.0, 1.25, 2.0)
  eval_capacity_factor: float = 2.0
  task: str = "shakespeare_span_corruption"
  feature_lengths: Mapping[str, int] = dataclasses.field(default_factory=lambda: {"inputs": 128, "targets": 32})
  train_steps: int = 300
  batch_size: int = 16
  learning_rate: float = 0.01
  log_period: int = 10
  eval_batches: int = 8

  def arms(self) -> dict[str, list[str]]:
    out = {}
    for k in self.top_k:
      for cf in self.train_capacity_factors:
        out[f"top{k}_cf{cf:g}"] = list(self.base) + [f"NUM_SELECTED_EXPERTS = {k}", f"TRAIN_CAPACITY_FACTOR = {cf}",
                                                     f"EVAL_CAPACITY_FACTOR = {cf}"]
    out["dense"] = list(self.dense)
    return out

  @property
  def settings(self) -> runs_lib.TrainSettings:
    return runs_lib.TrainSettings(task=self.task, feature_lengths=dict(self.feature_lengths),
                                  train_steps=self.train_steps, batch_size=self.batch_size,
                                  learning_rate=self.learning_rate, checkpoint_period=self.train_steps,
                                  log_period=self.log_period)


DROPPED = "experts/fraction_tokens_left_behind"


def run(ctx: ExperimentContext) -> Report:
  grid = CapacityGrid()
  arms = grid.arms()
  settings = grid.settings
  final = sparse_runs.FinalEval(settings, "encoder_decoder", grid.eval_batches, ("cross_entropy", DROPPED))

  def after(arm: str, seed: int, model_dir: str, trained: dict[str, Any]) -> dict[str, Any]:
    at_train = final(arms[arm], model_dir)
    at_eval = at_train if arm == "dense" else final(arms[arm] + [f"EVAL_CAPACITY_FACTOR = {grid.eval_capacity_factor}"],
                                                    model_dir)
    return {"eval_at_train_cf": at_train, "eval_at_eval_cf": at_eval,
            "train_dropped": sparse_runs.tail_mean(model_dir, DROPPED),
            "steps_per_second": sparse_runs.steps_per_second(model_dir),
            "model": runs_lib.model_flops(arms[arm], settings.feature_lengths)}

  records = runs_lib.train_all(ctx, arms, lambda arm: settings, after=after,
                               train_kwargs=lambda arm, seed: {"keep_checkpoints": 1})
  return _report(ctx, grid, records)


def _vals(records: list[dict[str, Any]], arm: str, fn) -> list[float]:
  return [fn(r) for r in records if r["arm"] == arm and not r["train"]["diverged"]]


def _report(ctx: ExperimentContext, grid: CapacityGrid, records: list[dict[str, Any]]) -> Report:
  arms = list(grid.arms())
  e = grid.eval_capacity_factor
  rows, summary = [], {}
  dense_sps = report.mean_std(_vals(records, "dense", lambda r: r["steps_per_second"]))[0]
  for arm in arms:
    loss_t = _vals(records, arm, lambda r: r["eval_at_train_cf"]["cross_entropy"])
    loss_e = _vals(records, arm, lambda r: r["eval_at_eval_cf"]["cross_entropy"])
    drop_train = _vals(records, arm, lambda r: r["train_dropped"])
    drop_eval = _vals(records, arm, lambda r: r["eval_at_train_cf"].get(DROPPED, math.nan))
    sps = _vals(records, arm, lambda r: r["steps_per_second"])
    flops = next(r["model"]["flops_per_token"] for r in records if r["arm"] == arm)
    paper = PAPER["neg_log_perplexity"].get(arm, {})
    summary[arm] = {"loss_at_train_cf": report.mean_std(loss_t), "loss_at_eval_cf": report.mean_std(loss_e),
                    "train_dropped": report.mean_std(drop_train), "eval_dropped": report.mean_std(drop_eval),
                    "steps_per_second": report.mean_std(sps), "flops_per_token": flops}
    rel_time = dense_sps / report.mean_std(sps)[0] if sps else math.nan
    rows.append([arm, report.fmt_mean_std([-v for v in loss_t]),
                 "" if arm == "dense" else report.fmt_mean_std([-v for v in loss_e]),
                 report.fmt_mean_std(drop_train, 3), report.fmt_mean_std(drop_eval, 3), f"{rel_time:.2f}",
                 f"{flops / 1e6:.2f}M",
                 f"{paper.get('train', '')}" + (f" / {paper['eval2.0']}" if "eval2.0" in paper else "")])
  tables = [Table(f"Negative log perplexity (= -validation loss; higher is better) after {grid.train_steps} steps, "
                  f"at the training capacity factor and at {e:g}",
                  ["arm", "neg. log ppl (train cf)", f"neg. log ppl (eval cf {e:g})", "dropped (train)",
                   "dropped (eval, train cf)", "step time / dense", "train FLOPs/token",
                   f"paper (train cf / eval {e:g})"], rows)]
  return Report(summary=summary, runs=records, tables=tables, findings=_findings(grid, summary), paper=PAPER,
                plots=[_plot(ctx, grid, summary)],
                notes=["Step times are medians of the logged steps/s on a shared CPU and are noisy; the sort "
                       "dispatch's compute grows with the capacity factor as on accelerators, but CPU timings "
                       "are not TPU timings.",
                       "The dense baseline is FLOP-matched to top-2 (one expert of width 2 x EXPERT_D_FF); top-1 "
                       "arms do half the expert FLOPs per token (the FLOPs column)."])


def _findings(grid: CapacityGrid, s: dict[str, Any]) -> list[Finding]:
  def loss(arm, key="loss_at_train_cf"):
    return s[arm][key][0] if arm in s else math.nan

  out = []
  for k in grid.top_k:
    cfs = sorted(grid.train_capacity_factors)
    seq = [loss(f"top{k}_cf{cf:g}") for cf in cfs]
    better = all(a >= b for a, b in zip(seq, seq[1:]))
    out.append(Finding(f"top-{k}: a higher train capacity factor gives better quality", "monotone in Table 8",
                       ", ".join(f"cf {cf:g}: {-v:.3f}" for cf, v in zip(cfs, seq)), better))
    low = [cf for cf in cfs if cf < grid.eval_capacity_factor]
    gains = [loss(f"top{k}_cf{cf:g}") - loss(f"top{k}_cf{cf:g}", "loss_at_eval_cf") for cf in low]
    out.append(Finding(f"top-{k}: evaluating at cf {grid.eval_capacity_factor:g} helps models trained with less",
                       "+0.005 to +0.024 neg. log ppl", ", ".join(f"cf {cf:g}: {g:+.4f}" for cf, g in zip(low, gains)),
                       all(g > 0 for g in gains) if gains else None))
  if 1 in grid.top_k and 2 in grid.top_k:
    d = [loss(f"top1_cf{cf:g}") - loss(f"top2_cf{cf:g}") for cf in grid.train_capacity_factors]
    out.append(Finding("top-2 beats top-1 at the same capacity factor", "+0.003 to +0.004 neg. log ppl",
                       ", ".join(f"cf {cf:g}: {x:+.4f}" for cf, x in zip(grid.train_capacity_factors, d)),
                       all(x > 0 for x in d)))
  sparse = [a for a in s if a != "dense"]
  if "dense" in s and sparse:
    best = min(loss(a) for a in sparse)
    out.append(Finding("every sparse model beats the FLOP-matched dense model", "dense -1.474 vs sparse >= -1.428",
                       f"dense {-loss('dense'):.3f}, sparse {min(-loss(a) for a in sparse):.3f} to {-best:.3f}",
                       all(loss(a) < loss("dense") for a in sparse)))
  return out


def _plot(ctx: ExperimentContext, grid: CapacityGrid, s: dict[str, Any]) -> str:
  fig, axes = report.figure(2)
  for i, k in enumerate(grid.top_k):
    cfs = sorted(grid.train_capacity_factors)
    for j, key in enumerate(("loss_at_train_cf", "loss_at_eval_cf")):
      ax = axes[0][j]
      ys = [-s[f"top{k}_cf{cf:g}"][key][0] for cf in cfs]
      es = [s[f"top{k}_cf{cf:g}"][key][1] for cf in cfs]
      ax.errorbar(cfs, ys, yerr=es, marker="o", color=f"C{i}", label=f"top-{k}", capsize=3)
  for j, title in enumerate(("evaluated at the train capacity factor",
                             f"evaluated at capacity factor {grid.eval_capacity_factor:g}")):
    ax = axes[0][j]
    if "dense" in s:
      ax.axhline(-s["dense"]["loss_at_train_cf"][0], color="grey", linestyle=":", label="dense")
    ax.set_title(title)
    ax.set_xlabel("train capacity factor")
    ax.set_ylabel("neg. log perplexity")
    ax.legend(fontsize=7)
  return report.save(fig, ctx.output_dir, "capacity_grid.png")
