"""`stmoe reproduce finetune_subsets`: ST-MoE section 4 (which parameters to fine-tune) at toy scale.

For each seed one sparse model (st_moe_tiny) is pretrained with span corruption on the Shakespeare plays;
from it, four fine-tunings on shakespeare_genre update all parameters, only the non-MoE parameters, only
the MoE parameters (routers and experts), or only the attention blocks (the others frozen:
`stmoe.training.finetune.frozen_patterns_for`, the TRAINABLE_PARAMS switch of runs/finetune.gin). Reported:
validation accuracy (decoded, the task's own metric) of the final fine-tuned parameters and the fraction
of parameters each subset trains, beside the majority-class baseline.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

import gin

from stmoe.reproduce import report, runs as runs_lib
from stmoe.reproduce.harness import ExperimentContext, Finding, Report, Table

PAPER = {
    "source": "Zoph et al. 2022 (ST-MoE), Section 4.1, Figure 4 (SuperGLUE fine-tuning of a sparse model)",
    "finding": "updating only the non-MoE parameters works about as well as updating all of them; updating only "
               "the MoE parameters is clearly worse; updating only attention is close to all",
}


@gin.configurable
@dataclasses.dataclass
class FinetuneSubsets:
  """The pretraining and the fine-tunings (gin/experiments/finetune_subsets.gin)."""
  model: Sequence[str] = gin.REQUIRED
  finetune_bindings: Sequence[str] = ()  # dropout etc. of fine-tuning (added to `model`)
  subsets: Sequence[str] = ("all", "non_moe", "moe_only", "attention_only")
  pretrain_task: str = "shakespeare_span_corruption"
  pretrain_lengths: Mapping[str, int] = dataclasses.field(default_factory=lambda: {"inputs": 128, "targets": 32})
  pretrain_steps: int = 300
  pretrain_learning_rate: float = 0.01
  task: str = "shakespeare_genre"
  lengths: Mapping[str, int] = dataclasses.field(default_factory=lambda: {"inputs": 128, "targets": 4})
  finetune_steps: int = 300
  batch_size: int = 16
  learning_rate: float = 0.01
  log_period: int = 10
  eval_batch_size: int = 64
  max_eval_examples: int | None = None

  def pretrain_settings(self) -> runs_lib.TrainSettings:
    return runs_lib.TrainSettings(task=self.pretrain_task, feature_lengths=dict(self.pretrain_lengths),
                                  train_steps=self.pretrain_steps, batch_size=self.batch_size,
                                  learning_rate=self.pretrain_learning_rate, checkpoint_period=self.pretrain_steps,
                                  log_period=self.log_period)

  def finetune_settings(self, subset: str) -> runs_lib.TrainSettings:
    from stmoe.training.finetune import frozen_patterns_for

    return runs_lib.TrainSettings(task=self.task, feature_lengths=dict(self.lengths), train_steps=self.finetune_steps,
                                  batch_size=self.batch_size, learning_rate=self.learning_rate,
                                  checkpoint_period=self.finetune_steps, log_period=self.log_period,
                                  optimizer_options={"frozen_patterns": frozen_patterns_for(subset)})


def trained_fraction(spec: Sequence[str], frozen: Sequence[str], lengths: Mapping[str, int]) -> float:
  """Fraction of the model's parameters (elements) that no frozen pattern matches."""
  import jax
  import numpy as np

  from stmoe import gin_utils
  from stmoe.partitioning import path_str
  from stmoe.training import setup as setup_lib

  with gin_utils.isolated():
    model, _ = runs_lib.arm_model(spec)
    abstract = setup_lib.setup_run(model, None, batch_size=1, task_feature_lengths=dict(lengths)).abstract_params
  total = trained = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    n = int(np.prod(leaf.shape))
    total += n
    if not any(re.search(p, path_str(path)) for p in frozen):
      trained += n
  return trained / total


def run(ctx: ExperimentContext) -> Report:
  cfg = FinetuneSubsets()
  pre = runs_lib.train_all(ctx, {"pretrain": list(cfg.model)}, lambda arm: cfg.pretrain_settings(),
                           train_kwargs=lambda arm, seed: {"keep_checkpoints": 1})
  pre_dir = {r["seed"]: r["model_dir"] for r in pre}
  spec = list(cfg.model) + list(cfg.finetune_bindings)
  arms = {s: spec for s in cfg.subsets}

  def after(arm: str, seed: int, model_dir: str, trained: dict[str, Any]) -> dict[str, Any]:
    return {"accuracy": _accuracy(cfg, spec, model_dir), "pretrained_from": pre_dir[seed]}

  records = runs_lib.train_all(ctx, arms, cfg.finetune_settings, after=after,
                               train_kwargs=lambda arm, seed: {"keep_checkpoints": 1,
                                                               "init_checkpoint": pre_dir[seed]})
  fractions = {s: trained_fraction(spec, cfg.finetune_settings(s).optimizer_options["frozen_patterns"], cfg.lengths)
               for s in cfg.subsets}
  return _report(ctx, cfg, pre, records, fractions)


def _accuracy(cfg: FinetuneSubsets, spec: Sequence[str], model_dir: str) -> float:
  """Decoded validation accuracy (fraction) of the run's final parameters."""
  from stmoe.evaluation import task_metrics

  steps = runs_lib.checkpoint_steps(model_dir)
  if not steps:
    return math.nan
  model, params = runs_lib.restore_arm(spec, f"{model_dir}/checkpoints/{steps[-1]}", cfg.eval_batch_size,
                                       cfg.lengths)
  result = task_metrics.run_task_eval(model, params, cfg.task, "validation", dict(cfg.lengths),
                                      batch_size=cfg.eval_batch_size, max_examples=cfg.max_eval_examples)
  return result.metrics["accuracy"] / 100.0  # seqio's accuracy is in percent


def _majority(cfg: FinetuneSubsets) -> float:
  from stmoe.evaluation import task_metrics

  labels = task_metrics.task_targets(cfg.task, "validation")
  if cfg.max_eval_examples is not None:
    labels = labels[:cfg.max_eval_examples]
  return task_metrics.majority_baseline(labels, labels)[1]


def _report(ctx: ExperimentContext, cfg: FinetuneSubsets, pre: list[dict[str, Any]], records: list[dict[str, Any]],
            fractions: dict[str, float]) -> Report:
  majority = _majority(cfg)
  summary = {"majority_baseline": majority, "trained_fraction": fractions, "accuracy": {}}
  rows = []
  for s in cfg.subsets:
    acc = [r["accuracy"] for r in records if r["arm"] == s]
    summary["accuracy"][s] = report.mean_std(acc)
    rows.append([s, f"{fractions[s]:.1%}", report.fmt_mean_std(acc, 3), ", ".join(f"{a:.3f}" for a in acc)])
  rows.append(["majority class", "-", f"{majority:.3f}", ""])
  tables = [Table(f"{cfg.task} validation accuracy after {cfg.finetune_steps} fine-tuning steps from a "
                  f"{cfg.pretrain_steps}-step span-corruption pretraining (one per seed)",
                  ["parameters updated", "fraction of parameters", "accuracy (mean ± std)", "per seed"], rows)]
  a = {s: summary["accuracy"][s][0] for s in cfg.subsets}
  findings = []
  if {"all", "non_moe"} <= a.keys():
    gap = a["all"] - a["non_moe"]
    findings.append(Finding("updating only the non-MoE parameters roughly matches updating all",
                            "about equal (SuperGLUE)", f"all {a['all']:.3f} vs non-MoE {a['non_moe']:.3f}",
                            abs(gap) <= 0.02 or gap < 0))
  if {"all", "moe_only"} <= a.keys():
    findings.append(Finding("updating only the MoE parameters is clearly worse", "clearly worse",
                            f"all {a['all']:.3f} vs MoE-only {a['moe_only']:.3f}", a["moe_only"] < a["all"] - 0.02))
  if {"all", "attention_only"} <= a.keys():
    findings.append(Finding("updating only attention is close to updating all", "close",
                            f"all {a['all']:.3f} vs attention-only {a['attention_only']:.3f}",
                            abs(a["all"] - a["attention_only"]) <= 0.02 or a["attention_only"] > a["all"]))
  return Report(summary=summary, runs=pre + records, tables=tables, findings=findings, paper=PAPER,
                plots=[_plot(ctx, cfg, records, majority)],
                notes=["'Roughly matches' / 'close' means within 0.02 accuracy (or better); 'clearly worse' "
                       "more than 0.02 below. With a few hundred validation passages, 0.02 is about one "
                       "standard error; the per-seed values show the spread."])


def _plot(ctx: ExperimentContext, cfg: FinetuneSubsets, records: list[dict[str, Any]], majority: float) -> str:
  fig, axes = report.figure(2)
  for i, s in enumerate(cfg.subsets):
    for r in (r for r in records if r["arm"] == s):
      losses = runs_lib.metric_series(r["model_dir"], "loss")
      axes[0][0].plot(losses["step"], losses["loss"], color=f"C{i}", alpha=0.8,
                      label=s if r["seed"] == ctx.seeds[0] else None)
    acc = [r["accuracy"] for r in records if r["arm"] == s]
    m, sd = report.mean_std(acc)
    axes[0][1].bar(i, m, yerr=sd, color=f"C{i}", capsize=4)
  axes[0][0].set_title("fine-tuning loss")
  axes[0][0].set_xlabel("step")
  axes[0][0].legend(fontsize=7)
  axes[0][1].axhline(majority, color="grey", linestyle=":", label="majority class")
  axes[0][1].set_xticks(range(len(cfg.subsets)))
  axes[0][1].set_xticklabels(list(cfg.subsets), fontsize=8)
  axes[0][1].set_title(f"{cfg.task} validation accuracy")
  axes[0][1].legend(fontsize=7)
  return report.save(fig, ctx.output_dir, "finetune_subsets.png")
