"""`stmoe reproduce few_shot_priming`: Artetxe et al. 2021's zero/few-shot priming comparison at toy scale.

The final checkpoints of the paired LMs of `moe_vs_dense_lm` (the same gin: `LmExperiment`) are primed
with k demonstrations from each task's train split and score every candidate answer by its summed
log-likelihood (stmoe.evaluation.priming, also `stmoe eval --num_shots`). Point `FewShotPriming.lm_dir` at
the output directory of a finished `moe_vs_dense_lm` run to reuse its models; left unset, the LMs are
trained here (same budget, same seeds).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Sequence

import gin

from stmoe.errors import UserError
from stmoe.reproduce import lm_runs, report
from stmoe.reproduce import runs as runs_lib
from stmoe.reproduce.harness import ExperimentContext, Finding, Report, Table

PAPER = {
    "source": "Artetxe et al. 2021, Efficient Large Scale Language Modeling with Mixtures of Experts, Sec. 4.3-4.4",
    "zero_shot": "MoE models beat dense models of the same compute in zero-shot priming on most tasks",
    "few_shot": "dense models gain more from demonstrations than MoE models; the MoE advantage shrinks as k grows",
}


@gin.configurable
@dataclasses.dataclass
class FewShotPriming:
  """What to prime and how (gin/experiments/few_shot_priming.gin).

  lm_dir: the output directory of a finished `stmoe reproduce moe_vs_dense_lm` run with the same
    LmExperiment config (its final checkpoints are used); None trains the LMs under this experiment's dir.
  tasks: priming tasks (stmoe.evaluation.priming.priming_task_names()).
  shots: the k values; max_examples: evaluated examples per task (the first N of the split).
  max_length: prompt + candidate tokens (longer prompts lose their oldest tokens).
  """
  lm_dir: str | None = None
  tasks: Sequence[str] = ("shakespeare_cloze",)
  shots: Sequence[int] = (0, 1, 4)
  split: str = "validation"
  max_examples: int | None = 300
  max_length: int = 256
  batch_size: int = 32
  demo_seed: int = 0


def _lm_records(ctx: ExperimentContext, exp: lm_runs.LmExperiment, cfg: FewShotPriming) -> list[dict[str, Any]]:
  if cfg.lm_dir is None:
    return lm_runs.train_and_evaluate(ctx, exp, evaluate=False)
  records = []
  for seed in ctx.seeds:
    for arm in exp.arms:
      record = runs_lib.read_run_result(runs_lib.run_dir(os.path.abspath(cfg.lm_dir), arm, seed))
      if record is None:
        raise UserError(f"FewShotPriming.lm_dir={cfg.lm_dir!r} has no finished run of arm {arm!r} seed {seed}: "
                        f"run `stmoe reproduce moe_vs_dense_lm --output_dir {cfg.lm_dir} --seeds "
                        f"{len(ctx.seeds)}` first (with the same gin), or leave lm_dir unset to train here.")
      records.append(record)
  return records


def run(ctx: ExperimentContext) -> Report:
  from stmoe.evaluation import priming

  exp = lm_runs.LmExperiment()
  cfg = FewShotPriming()
  records = _lm_records(ctx, exp, cfg)
  rows: list[dict[str, Any]] = []
  jobs = [(r, task) for r in records for task in cfg.tasks]
  for i, (r, task) in enumerate(jobs):
    if r["train"].get("diverged"):
      continue
    ctx.stage(i, len(jobs), f"prime {r['arm']} seed {r['seed']} on {task}, k in {list(cfg.shots)}")
    ckpt = lm_runs.final_checkpoint(r)
    model, params = runs_lib.restore_arm(exp.arms[r["arm"]], ckpt, exp.batch_size, exp.settings.feature_lengths)
    res = priming.evaluate_priming(model, params, task, split=cfg.split, shots=tuple(cfg.shots), seed=cfg.demo_seed,
                                   max_examples=cfg.max_examples, batch_size=cfg.batch_size,
                                   max_length=cfg.max_length)
    for k in cfg.shots:
      m = res["shots"][k]
      rows.append({"arm": r["arm"], "seed": r["seed"], "task": task, "k": int(k), "checkpoint": ckpt,
                   **{key: m[key] for key in ("accuracy", "accuracy_length_normalized", "accuracy_calibrated",
                                              "num_examples", "num_truncated", "chance") if key in m}})
  return _report(ctx, exp, cfg, rows, records)


def _acc(rows: list[dict[str, Any]], arm: str, task: str, k: int, key: str = "accuracy") -> list[float]:
  return [r[key] for r in rows if r["arm"] == arm and r["task"] == task and r["k"] == k and key in r]


METRICS = {"accuracy": "summed log-likelihood (the prediction)",
           "accuracy_calibrated": "calibrated: log p(c | prompt) - log p(c | empty prompt)"}


def _report(ctx: ExperimentContext, exp: lm_runs.LmExperiment, cfg: FewShotPriming, rows: list[dict[str, Any]],
            records: list[dict[str, Any]]) -> Report:
  arms = list(exp.arms)
  tables, findings, summary = [], [], {}
  for task in cfg.tasks:
    chance = next((r["chance"] for r in rows if r["task"] == task and "chance" in r), math.nan)
    for metric, meaning in METRICS.items():
      table_rows = []
      for arm in arms:
        table_rows.append([arm] + [report.fmt_mean_std(_acc(rows, arm, task, k, metric), 3) for k in cfg.shots])
        summary.setdefault(metric, {}).setdefault(task, {})[arm] = {
            str(k): report.mean_std(_acc(rows, arm, task, k, metric)) for k in cfg.shots}
      table_rows.append(["chance"] + [f"{chance:.3f}"] * len(cfg.shots))
      tables.append(Table(f"{task} ({cfg.split}, first {cfg.max_examples} examples), {meaning}: accuracy by number "
                          f"of demonstrations k (mean ± std over seeds)", ["arm"] + [f"k={k}" for k in cfg.shots],
                          table_rows))
      findings += _findings(exp, cfg, task, rows, chance, metric)
  plots = [_plot(ctx, exp, cfg, rows)] if rows else []
  notes = [f"Models: the final checkpoints ({exp.train_steps} steps) of the {'/'.join(arms)} LMs of moe_vs_dense_lm.",
           f"Prompts up to {cfg.max_length} tokens (the LMs trained on {exp.targets_length}-token sequences; "
           "relative position buckets extend to longer inputs); longer prompts lose their oldest tokens.",
           "The prediction is the candidate with the highest summed log-likelihood (ties: the lowest index). The "
           "calibrated score subtracts each candidate's log-likelihood after an empty prompt (how likely the line "
           "is on its own), which a toy LM's summed score is dominated by; see docs/priming.md."]
  return Report(summary=summary, runs=rows, tables=tables, findings=findings, plots=plots, paper=PAPER, notes=notes)


def _findings(exp: lm_runs.LmExperiment, cfg: FewShotPriming, task: str, rows: list[dict[str, Any]],
              chance: float, metric: str) -> list[Finding]:
  sparse, dense = exp.sparse_arm, exp.dense_arm
  k0, kmax = min(cfg.shots), max(cfg.shots)
  m = {(arm, k): report.mean_std(_acc(rows, arm, task, k, metric))[0] for arm in (sparse, dense) for k in cfg.shots}
  if any(math.isnan(v) for v in m.values()):
    return []
  label = f"{task} ({'calibrated' if metric == 'accuracy_calibrated' else 'summed'})"
  beats = [m[(sparse, k)] > m[(dense, k)] for k in cfg.shots]
  out = [Finding(f"{label}: the MoE LM beats the dense LM in zero/few-shot priming", PAPER["zero_shot"],
                 ", ".join(f"k={k}: {m[(sparse, k)]:.3f} vs {m[(dense, k)]:.3f}" for k in cfg.shots)
                 + f" (chance {chance:.3f})", all(beats) if all(beats) or not any(beats) else None)]
  gain_s, gain_d = m[(sparse, kmax)] - m[(sparse, k0)], m[(dense, kmax)] - m[(dense, k0)]
  out.append(Finding(f"{label}: the dense LM gains more from demonstrations (k={k0} -> {kmax})", PAPER["few_shot"],
                     f"gain {dense} {gain_d:+.3f} vs {sparse} {gain_s:+.3f}", gain_d > gain_s))
  if max(m.values()) <= chance + 0.02:
    for f in out:
      f.reproduced = None  # at (or within noise of) chance, nothing can be concluded
  return out


def _plot(ctx: ExperimentContext, exp: lm_runs.LmExperiment, cfg: FewShotPriming, rows: list[dict[str, Any]]) -> str:
  fig, axes = report.figure(len(METRICS), nrows=len(cfg.tasks))
  for row, task in enumerate(cfg.tasks):
    chance = next((r["chance"] for r in rows if r["task"] == task and "chance" in r), None)
    for ax, metric in zip(axes[row], METRICS):
      for i, arm in enumerate(exp.arms):
        stats = [report.mean_std(_acc(rows, arm, task, k, metric)) for k in cfg.shots]
        ax.errorbar(list(cfg.shots), [m for m, _ in stats], yerr=[sd for _, sd in stats], marker="o",
                    color=f"C{i}", label=arm, capsize=3)
      if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", label="chance")
      ax.set_title(f"{task}: {'calibrated' if metric == 'accuracy_calibrated' else 'summed log-likelihood'}")
      ax.set_xlabel("demonstrations k")
      ax.set_ylabel("accuracy")
      ax.set_xticks(list(cfg.shots))
      ax.legend(fontsize=7)
  return report.save(fig, ctx.output_dir, "priming_accuracy.png")
