"""`stmoe reproduce balance_losses`: Shazeer et al. 2017 Appendix A Table 6 (and Appendix B) at toy scale.

A decoder-only LM whose sparse layers use noisy top-k gating (k of 16 experts), trained with the
importance and load losses weighted (w_importance, w_load) in {(0,0), (0.2,0), (0,0.2), (0.1,0.1),
(0.01,0.01), (1,1)}, plus a hierarchical MoE (Appendix B: 4 groups x 4 experts, the same experts per token)
with (0.1, 0.1) at both levels. Reported per setting: validation perplexity, CV(importance), CV(load) and
max/mean expert load at the final checkpoint on validation batches (the noise-free gating of evaluation),
and a heatmap of each expert's share of the tokens over training for (0,0) vs (0.1,0.1).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

import gin
import numpy as np

from stmoe.reproduce import report, runs as runs_lib, sparse_runs
from stmoe.reproduce.harness import ExperimentContext, Finding, Report, Table

PAPER = {
    "source": "Shazeer et al. 2017, Outrageously Large Neural Networks, Appendix A, Table 6 (MoE-256, k=4)",
    "rows": {  # (w_importance, w_load): test perplexity, CV(importance), CV(load), max/mean load
        "w0_0": (39.8, 3.04, 3.01, 17.80), "w0.2_0": (35.6, 0.06, 0.17, 1.47), "w0_0.2": (35.7, 0.22, 0.04, 1.15),
        "w0.1_0.1": (35.6, 0.06, 0.05, 1.14), "w0.01_0.01": (35.7, 0.48, 0.11, 1.37), "w1_1": (35.7, 0.03, 0.02, 1.07),
    },
}
METRICS = ("cross_entropy", "experts/importance_cv", "experts/load_cv", "experts/smooth_load_cv",
           "experts/max_mean_load")


@gin.configurable
@dataclasses.dataclass
class BalanceLosses:
  """The grid (gin/experiments/balance_losses.gin).

  base: the flat noisy top-k model; weights: (w_importance, w_load) pairs (aux_loss_coef is 1 in `base`, so
  the weights are the paper's); hierarchical: extra arms {name: [bindings on top of base]}.
  """
  base: Sequence[str] = gin.REQUIRED
  weights: Sequence[tuple[float, float]] = ((0, 0), (0.2, 0), (0, 0.2), (0.1, 0.1), (0.01, 0.01), (1, 1))
  hierarchical: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
  heatmap_arms: Sequence[str] = ("w0_0", "w0.1_0.1")
  task: str = "shakespeare_lm"
  targets_length: int = 128
  train_steps: int = 300
  batch_size: int = 16
  learning_rate: float = 0.01
  log_period: int = 10
  eval_batches: int = 8

  def arms(self) -> dict[str, list[str]]:
    out = {}
    for wi, wl in self.weights:
      out[f"w{wi:g}_{wl:g}"] = list(self.base) + [f"MoeConfig.importance_loss_weight = {float(wi)}",
                                                  f"MoeConfig.load_loss_weight = {float(wl)}"]
    for name, extra in self.hierarchical.items():
      out[name] = list(self.base) + list(extra)
    return out

  @property
  def settings(self) -> runs_lib.TrainSettings:
    return runs_lib.TrainSettings(task=self.task, feature_lengths={"targets": self.targets_length},
                                  train_steps=self.train_steps, batch_size=self.batch_size,
                                  learning_rate=self.learning_rate, checkpoint_period=self.train_steps,
                                  log_period=self.log_period)


def run(ctx: ExperimentContext) -> Report:
  cfg = BalanceLosses()
  arms = cfg.arms()
  final = sparse_runs.FinalEval(cfg.settings, "decoder_only", cfg.eval_batches, METRICS)

  def after(arm: str, seed: int, model_dir: str, trained: dict[str, Any]) -> dict[str, Any]:
    return {"final": final(arms[arm], model_dir), "load_over_training": load_over_training(model_dir)}

  records = runs_lib.train_all(ctx, arms, lambda arm: cfg.settings, after=after,
                               train_kwargs=lambda arm, seed: {"keep_checkpoints": 1})
  return _report(ctx, cfg, records)


_FRACTION = re.compile(r"^experts/(?P<layer>[^/]+/layer_\d+)/expert_fraction/(?P<expert>\d+)$")


def load_over_training(model_dir: str) -> dict[str, Any]:
  """{"step": [...], "<stack>/layer_<i>": [[share of expert e per logged step]]}: each expert's share of the
  kept (token, expert) assignments, normalised to sum to 1 per step (the heatmap's rows)."""
  out: dict[str, Any] = {"step": []}
  per_layer: dict[str, list[list[float]]] = {}
  for row in runs_lib.read_metrics(model_dir):
    found: dict[str, dict[int, float]] = {}
    for k, v in row.items():
      m = _FRACTION.match(k)
      if m and isinstance(v, (int, float)):
        found.setdefault(m.group("layer"), {})[int(m.group("expert"))] = float(v)
    if not found:
      continue
    out["step"].append(int(row["step"]))
    for layer, per in found.items():
      vec = np.asarray([per[e] for e in sorted(per)])
      per_layer.setdefault(layer, []).append((vec / max(vec.sum(), 1e-12)).tolist())
  out.update(per_layer)
  return out


def _report(ctx: ExperimentContext, cfg: BalanceLosses, records: list[dict[str, Any]]) -> Report:
  arms = list(cfg.arms())
  summary, rows = {}, []
  for arm in arms:
    finals = [r["final"] for r in records if r["arm"] == arm and not r["train"]["diverged"]]
    ppl = [math.exp(f["cross_entropy"]) for f in finals if math.isfinite(f["cross_entropy"])]
    cvi = [f["experts/importance_cv"] for f in finals]
    cvl = [f["experts/load_cv"] for f in finals]
    cvs = [f.get("experts/smooth_load_cv", math.nan) for f in finals]
    mx = [f["experts/max_mean_load"] for f in finals]
    diverged = sum(1 for r in records if r["arm"] == arm and r["train"]["diverged"])
    summary[arm] = {"perplexity": report.mean_std(ppl), "importance_cv": report.mean_std(cvi),
                    "load_cv": report.mean_std(cvl), "smooth_load_cv": report.mean_std(cvs), "max_mean_load": report.mean_std(mx), "diverged": diverged}
    paper = PAPER["rows"].get(arm)
    rows.append([arm, report.fmt_mean_std(ppl, 1), report.fmt_mean_std(cvi, 2), report.fmt_mean_std(cvl, 2),
                 report.fmt_mean_std(cvs, 2), report.fmt_mean_std(mx, 2), " / ".join(f"{x:g}" for x in paper) if paper else "-"])
  tables = [Table(f"After {cfg.train_steps} steps, at the final checkpoint on {cfg.eval_batches} validation batches "
                  "(CVs and loads: mean over the MoE layers)",
                  ["arm (w_importance_w_load)", "perplexity", "CV(importance)", "CV(load, realised)",
                   "CV(load, smooth estimator)", "max/mean load",
                   "paper: ppl / CV(imp) / CV(load) / max/mean"], rows)]
  plots = [_heatmap(ctx, cfg, records)]
  return Report(summary=summary, runs=records, tables=tables, findings=_findings(cfg, summary), paper=PAPER,
                plots=[p for p in plots if p],
                notes=["CV(load, realised) and max/mean load count the (token, expert) assignments the router made; "
                       "CV(load, smooth estimator) is the paper's P(x, i) sum (its Table 6 column). Evaluation "
                       "gating is noise-free, so these are the deterministic router's balance; with dropless "
                       "dispatch nothing is dropped.",
                       "The paper's model is MoE-256 (k=4) on the 1B-word benchmark; ours is 16 experts on toy text."])


def _findings(cfg: BalanceLosses, s: dict[str, Any]) -> list[Finding]:
  out = []
  if "w0_0" not in s:
    return out
  none = s["w0_0"]
  balanced = [a for a in s if a.startswith("w") and a != "w0_0"]
  if balanced:
    worse = all(none["perplexity"][0] > s[a]["perplexity"][0] for a in balanced)
    out.append(Finding("without balancing losses perplexity is worse than with any of them",
                       "39.8 vs 35.6-35.7",
                       f"(0,0) {none['perplexity'][0]:.1f} vs " + ", ".join(f"{a} {s[a]['perplexity'][0]:.1f}"
                                                                             for a in balanced), worse))
    imb = all(none["max_mean_load"][0] > s[a]["max_mean_load"][0] for a in balanced)
    out.append(Finding("without balancing losses the load is far more unbalanced (max/mean, CV)",
                       "max/mean 17.80 vs 1.07-1.47",
                       f"(0,0) {none['max_mean_load'][0]:.2f} vs " + ", ".join(
                           f"{a} {s[a]['max_mean_load'][0]:.2f}" for a in balanced), imb))
  if "w1_1" in s and "w0.01_0.01" in s:
    out.append(Finding("stronger balancing losses give lower CV(importance)", "(1,1) 0.03 < (0.01,0.01) 0.48",
                       f"(1,1) {s['w1_1']['importance_cv'][0]:.2f} vs (0.01,0.01) "
                       f"{s['w0.01_0.01']['importance_cv'][0]:.2f}",
                       s["w1_1"]["importance_cv"][0] < s["w0.01_0.01"]["importance_cv"][0]))
  for name in cfg.hierarchical:
    if name in s and "w0.1_0.1" in s:
      h, f = s[name], s["w0.1_0.1"]
      out.append(Finding(f"hierarchical MoE ({name}) trains as well as the flat MoE with the same losses",
                         "Appendix B: hierarchical MoEs match or beat flat ones at scale",
                         f"perplexity {h['perplexity'][0]:.1f} vs flat {f['perplexity'][0]:.1f}; max/mean load "
                         f"{h['max_mean_load'][0]:.2f} vs {f['max_mean_load'][0]:.2f}",
                         None))
  return out


def _heatmap(ctx: ExperimentContext, cfg: BalanceLosses, records: list[dict[str, Any]]) -> str | None:
  """Expert share of tokens over training, first seed, first MoE layer, for the heatmap arms."""
  chosen = [r for r in records if r["arm"] in cfg.heatmap_arms and r["seed"] == ctx.seeds[0]]
  chosen.sort(key=lambda r: list(cfg.heatmap_arms).index(r["arm"]))
  if not chosen:
    return None
  fig, axes = report.figure(len(chosen))
  for ax, r in zip(axes[0], chosen):
    lt = r["load_over_training"]
    layers = sorted(k for k in lt if k != "step")
    if not layers:
      continue
    grid = np.asarray(lt[layers[0]])  # [logged steps, experts]
    im = ax.imshow(grid.T, aspect="auto", origin="lower", cmap="viridis", vmin=0.0,
                   extent=[lt["step"][0], lt["step"][-1], -0.5, grid.shape[1] - 0.5])
    ax.set_title(f"{r['arm']}: {layers[0]}")
    ax.set_xlabel("training step")
    ax.set_ylabel("expert")
    fig.colorbar(im, ax=ax, label="share of assignments")
  return report.save(fig, ctx.output_dir, "expert_load_heatmap.png")
