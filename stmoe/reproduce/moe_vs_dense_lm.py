"""`stmoe reproduce moe_vs_dense_lm`: Artetxe et al. 2021's MoE-vs-dense efficiency comparison at toy scale.

A top-2 decoder-only MoE LM (every other layer sparse, GShard capacity 2*ceil(G/E)) and its FLOP-matched
dense LM (`stmoe info` shows the same training FLOPs per token) train on the same tokens with the same
schedule, for each seed. Every checkpoint is scored on held-out plays (in-domain) and on out-of-domain
text (Wikipedia articles, Lee news). The speedup is the paper's: the training compute the dense model needs
to reach the MoE model's perplexity at a budget, over that budget (stmoe.reproduce.speedup), per domain and
seed; the table gives its mean and spread over seeds beside the paper's numbers.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from stmoe.reproduce import lm_runs, report, speedup
from stmoe.reproduce.harness import ExperimentContext, Finding, Report, Table

PAPER = {
    "source": "Artetxe et al. 2021, Efficient Large Scale Language Modeling with Mixtures of Experts, Fig. 2-3",
    "speedup_in_domain": "8-16x in-domain at modest budgets",
    "speedup_out_of_domain": "2-4x",
    "speedup_overall": "about 4x (a 1.1T-parameter MoE ~ a 6.7B dense model at ~4x less compute)",
    "setup": "top-2 gating, every other layer sparse, 512 experts, capacity factor 2, 300B tokens",
}


def run(ctx: ExperimentContext) -> Report:
  """Trains and evaluates both LMs for every seed; returns the curves, speedups and findings."""
  exp = lm_runs.LmExperiment()
  records = lm_runs.train_and_evaluate(ctx, exp)
  by = {(r["arm"], r["seed"]): r for r in records}
  domains = list(exp.held_out)
  budget_step = exp.budget_fraction * exp.train_steps

  per_seed: dict[str, list[speedup.Speedup]] = {d: [] for d in domains}
  for seed in ctx.seeds:
    sparse, dense = by[(exp.sparse_arm, seed)], by[(exp.dense_arm, seed)]
    for d in domains:
      s, t = sparse["curves"][d], dense["curves"][d]
      budget = budget_step * sparse["train_flops_per_step"]
      if not s["train_flops"] or budget < s["train_flops"][0]:
        per_seed[d].append(speedup.Speedup(math.nan, "", math.nan))
        continue
      per_seed[d].append(speedup.speedup(s["train_flops"], s["cross_entropy"], t["train_flops"],
                                         t["cross_entropy"], budget))

  final_ppl = {arm: {d: [by[(arm, seed)]["curves"][d]["perplexity"][-1] for seed in ctx.seeds] for d in domains}
               for arm in exp.arms}
  seed0 = ctx.seeds[0]
  ratio = by[(exp.sparse_arm, seed0)]["model"]["flops_per_token"] / by[(exp.dense_arm, seed0)]["model"]["flops_per_token"]
  flop_rows = [[arm, f"{by[(arm, ctx.seeds[0])]['model']['total_params']:,}",
                f"{by[(arm, ctx.seeds[0])]['model']['active_params_per_token']:,}",
                f"{by[(arm, ctx.seeds[0])]['model']['flops_per_token']:,.0f}"] for arm in exp.arms]
  ppl_rows = [[arm] + [report.fmt_mean_std(final_ppl[arm][d], 2) for d in domains] for arm in exp.arms]
  speed_rows = [[d + (" (in-domain)" if d == exp.in_domain else " (out-of-domain)"),
                 ", ".join(s.text() for s in per_seed[d]),
                 report.fmt_mean_std([s.value for s in per_seed[d] if not s.bound], 2),
                 PAPER["speedup_in_domain"] if d == exp.in_domain else PAPER["speedup_out_of_domain"]]
                for d in domains]
  tables = [
      Table("Models (stmoe info, training FLOPs per token at the experiment's length)",
            ["arm", "parameters", "active parameters / token", "training FLOPs / token"], flop_rows),
      Table(f"Final validation perplexity after {exp.train_steps} steps (mean ± std over seeds)",
            ["arm"] + domains, ppl_rows),
      Table(f"Speedup of {exp.sparse_arm} over {exp.dense_arm} at {exp.budget_fraction:g} of the budget "
            f"({budget_step:.0f} steps): dense compute to reach the MoE perplexity / MoE compute",
            ["held-out text", "per seed", "mean ± std (measured crossings)", "paper"], speed_rows),
  ]
  findings = _findings(exp, per_seed)
  plots = [_plot_curves(ctx, exp, records, domains)]
  notes = [
      f"FLOP match: the {exp.sparse_arm} arm's training FLOPs per token are {ratio:.4f}x the {exp.dense_arm} "
      "arm's (the router's matmul is the difference).",
      "A speedup written '>x' is a lower bound (the dense model did not reach the MoE perplexity within its "
      "whole budget); '<x' an upper bound (it was there at its first evaluated checkpoint).",
      f"Each curve point is a checkpoint (every {exp.checkpoint_period} steps) scored on {exp.eval_batches} fixed "
      f"batches of {exp.batch_size} x {exp.targets_length} tokens per held-out set.",
  ]
  summary = {
      "final_perplexity": final_ppl,
      "speedup": {d: [{"value": s.value, "bound": s.bound, "target_cross_entropy": s.target} for s in per_seed[d]]
                  for d in domains},
      "speedup_mean_std": {d: report.mean_std([s.value for s in per_seed[d] if not s.bound]) for d in domains},
      "budget_steps": budget_step, "flops_ratio_sparse_over_dense": ratio,
      "in_domain": exp.in_domain, "train_steps": exp.train_steps, "tokens_per_step": exp.tokens_per_step,
  }
  return Report(summary=summary, runs=records, tables=tables, findings=findings, plots=plots, paper=PAPER,
                notes=notes)


def _findings(exp: lm_runs.LmExperiment, per_seed: dict[str, list[speedup.Speedup]]) -> list[Finding]:
  ind = per_seed.get(exp.in_domain, [])
  ood = {d: v for d, v in per_seed.items() if d != exp.in_domain}

  def faster(values: Sequence[speedup.Speedup]) -> bool | None:
    if not values or any(math.isnan(s.value) for s in values):
      return None
    return all(s.value > 1.0 for s in values)

  def summary(values: Sequence[speedup.Speedup]) -> str:
    return ", ".join(s.text() for s in values) or "n/a"

  out = [Finding("MoE LMs reach a given perplexity with less training compute than FLOP-matched dense LMs "
                 "(in-domain)", PAPER["speedup_in_domain"], f"speedup per seed {summary(ind)}", faster(ind))]
  for d, v in ood.items():
    out.append(Finding(f"... and out of domain ({d})", PAPER["speedup_out_of_domain"],
                       f"speedup per seed {summary(v)}", faster(v)))
  if ind and ood:
    def mean(values):
      finite = [s.value for s in values if math.isfinite(s.value)]
      return sum(finite) / len(finite) if finite else math.nan
    m_in = mean(ind)
    larger = all(m_in > mean(v) for v in ood.values()) if math.isfinite(m_in) else None
    if any(s.bound == "lower" for s in ind) and larger is False:
      larger = None  # a lower bound in-domain cannot be ranked below a measured value
    out.append(Finding("The speedup is larger in-domain than out-of-domain", "8-16x vs 2-4x",
                       f"in-domain mean {m_in:.2f}x vs " + ", ".join(f"{d} {mean(v):.2f}x" for d, v in ood.items()),
                       larger))
  return out


def _plot_curves(ctx: ExperimentContext, exp: lm_runs.LmExperiment, records: list[dict[str, Any]],
                 domains: list[str]) -> str:
  """Validation perplexity vs training compute, one panel per held-out set, one colour per arm."""
  fig, axes = report.figure(len(domains))
  colours = {arm: f"C{i}" for i, arm in enumerate(exp.arms)}
  for ax, d in zip(axes[0], domains):
    for r in records:
      c = r["curves"].get(d)
      if c:
        ax.plot([f / 1e12 for f in c["train_flops"]], c["perplexity"], color=colours[r["arm"]], alpha=0.8,
                label=f"{r['arm']} (seed {r['seed']})", linestyle="-" if r["seed"] == ctx.seeds[0] else "--")
    ax.set_title(f"{d}{' (in-domain)' if d == exp.in_domain else ' (out-of-domain)'}")
    ax.set_xlabel("training compute (TFLOPs)")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
  axes[0][0].legend(fontsize=7)
  return report.save(fig, ctx.output_dir, "perplexity_curves.png")

