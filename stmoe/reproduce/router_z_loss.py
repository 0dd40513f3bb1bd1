"""`stmoe reproduce router_z_loss`: ST-MoE Table 4 (router z-loss and training stability) at toy scale.

A sparse encoder-decoder (st_moe_tiny) with bfloat16 activations, trained at a learning rate high enough
for instabilities, with router z-loss coefficients {0, 1e-4, 1e-3, 1e-2} and several seeds each. A run is
*unstable* if it diverges (a NaN/Inf loss or parameter stops it: the trainer's guard) or if its training
loss spikes: after the first `spike_warmup` fraction of training, a logged loss exceeds the lowest loss
logged so far by more than `spike_threshold` nats. Reported per coefficient: stable runs, final
validation loss (negative log perplexity, the paper's unit) of the runs that finished, and the router
logit scale along training (mean logsumexp of the router logits and max |logit|, mean over MoE layers).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import gin

from stmoe.reproduce import report, runs as runs_lib, sparse_runs
from stmoe.reproduce.harness import ExperimentContext, Finding, Report, Table

PAPER = {
    "source": "Zoph et al. 2022 (ST-MoE), Table 4",
    "rows": {"baseline (z-loss 0)": {"stable": "4/6", "neg_log_perplexity": -1.755},
             "router z-loss 1e-3": {"stable": "3/3", "neg_log_perplexity": -1.741}},
}
LSE, MAXLOGIT = "experts/router_logsumexp", "experts/router_max_abs_logit"


@gin.configurable
@dataclasses.dataclass
class RouterZLoss:
  """The sweep (gin/experiments/router_z_loss.gin)."""
  base: Sequence[str] = gin.REQUIRED
  coefficients: Sequence[float] = (0.0, 1e-4, 1e-3, 1e-2)
  task: str = "shakespeare_span_corruption"
  feature_lengths: Mapping[str, int] = dataclasses.field(default_factory=lambda: {"inputs": 128, "targets": 32})
  train_steps: int = 300
  batch_size: int = 16
  learning_rate: float = 0.5
  optimizer: str = "adafactor"
  optimizer_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  log_period: int = 5
  eval_batches: int = 8
  spike_threshold: float = 1.0
  spike_warmup: float = 0.1

  def arms(self) -> dict[str, list[str]]:
    return {f"z{c:g}": list(self.base) + [f"ROUTER_Z_LOSS_COEF = {float(c)}"] for c in self.coefficients}

  @property
  def settings(self) -> runs_lib.TrainSettings:
    return runs_lib.TrainSettings(task=self.task, feature_lengths=dict(self.feature_lengths),
                                  train_steps=self.train_steps, batch_size=self.batch_size,
                                  learning_rate=self.learning_rate, checkpoint_period=self.train_steps,
                                  log_period=self.log_period, optimizer=self.optimizer,
                                  optimizer_options=dict(self.optimizer_options))


def loss_spike(steps: Sequence[int], losses: Sequence[float], total_steps: int, threshold: float,
               warmup: float) -> int | None:
  """The first logged step after `warmup * total_steps` whose loss exceeds the running minimum by more than
  `threshold` (or is not finite); None if there is none."""
  best = math.inf
  for step, loss in zip(steps, losses):
    if step > warmup * total_steps and (not math.isfinite(loss) or loss > best + threshold):
      return int(step)
    if math.isfinite(loss):
      best = min(best, loss)
  return None


def run(ctx: ExperimentContext) -> Report:
  cfg = RouterZLoss()
  arms = cfg.arms()
  final = sparse_runs.FinalEval(cfg.settings, "encoder_decoder", cfg.eval_batches, ("cross_entropy",))

  def after(arm: str, seed: int, model_dir: str, trained: dict[str, Any]) -> dict[str, Any]:
    losses = runs_lib.metric_series(model_dir, "loss")
    spike = loss_spike(losses["step"], losses["loss"], cfg.train_steps, cfg.spike_threshold, cfg.spike_warmup)
    done = not trained["diverged"]
    return {"final": final(arms[arm], model_dir) if done else {"cross_entropy": math.nan},
            "spike_step": spike, "stable": done and spike is None, "train_loss": losses,
            "router_logsumexp": runs_lib.metric_series(model_dir, LSE),
            "router_max_abs_logit": runs_lib.metric_series(model_dir, MAXLOGIT)}

  records = runs_lib.train_all(ctx, arms, lambda arm: cfg.settings, after=after,
                               train_kwargs=lambda arm, seed: {"keep_checkpoints": 1})
  return _report(ctx, cfg, records)


def _report(ctx: ExperimentContext, cfg: RouterZLoss, records: list[dict[str, Any]]) -> Report:
  summary, rows = {}, []
  for arm in cfg.arms():
    rs = [r for r in records if r["arm"] == arm]
    stable = sum(1 for r in rs if r["stable"])
    nlp = [-r["final"]["cross_entropy"] for r in rs if math.isfinite(r["final"]["cross_entropy"])]
    lse = [sparse_runs.tail_mean(r["model_dir"], LSE) for r in rs]
    mx = [max(r["router_max_abs_logit"][MAXLOGIT] or [math.nan]) for r in rs]
    summary[arm] = {"stable": stable, "runs": len(rs), "neg_log_perplexity": report.mean_std(nlp),
                    "diverged": sum(1 for r in rs if r["train"]["diverged"]),
                    "spiked": sum(1 for r in rs if r["spike_step"] is not None),
                    "final_router_logsumexp": report.mean_std(lse), "peak_max_abs_logit": report.mean_std(mx)}
    rows.append([arm, f"{stable}/{len(rs)}", str(summary[arm]["diverged"]), str(summary[arm]["spiked"]),
                 report.fmt_mean_std(nlp), report.fmt_mean_std(lse, 2), report.fmt_mean_std(mx, 1)])
  tables = [Table(f"bfloat16 activations, {cfg.optimizer} at a constant {cfg.learning_rate:g}, {cfg.train_steps} "
                  f"steps: stability and quality per router z-loss coefficient",
                  ["router z-loss", "stable runs", "diverged (NaN)", f"loss spikes (> +{cfg.spike_threshold:g})",
                   "neg. log ppl (finished runs)", "router logsumexp (end)", "peak max |router logit|"], rows),
            Table("Paper (ST-MoE Table 4, ST-MoE-L-like, 6 / 3 seeds)", ["method", "stable", "neg. log ppl"],
                  [[k, v["stable"], str(v["neg_log_perplexity"])] for k, v in PAPER["rows"].items()])]
  return Report(summary=summary, runs=records, tables=tables, findings=_findings(cfg, summary), paper=PAPER,
                plots=[_plot(ctx, cfg, records)],
                notes=["Our router always computes in float32 (MoeConfig.router_dtype): the bfloat16 round-off of "
                       "router logits that ST-MoE blames for instability cannot occur here; only the activations "
                       "are bfloat16.",
                       f"Unstable = NaN/Inf (the trainer stops the run) or a logged loss more than "
                       f"{cfg.spike_threshold:g} nats above the running minimum after {cfg.spike_warmup:.0%} of "
                       "training."])


def _findings(cfg: RouterZLoss, s: dict[str, Any]) -> list[Finding]:
  base = s.get("z0")
  if base is None:
    return []
  with_z = {a: v for a, v in s.items() if a != "z0"}
  out = []
  unstable_base = base["stable"] < base["runs"]
  more_stable = all(v["stable"] / v["runs"] >= base["stable"] / base["runs"] for v in with_z.values())
  out.append(Finding("router z-loss makes training more stable", "4/6 stable without, 3/3 with 1e-3",
                     f"without {base['stable']}/{base['runs']}, " + ", ".join(
                         f"{a} {v['stable']}/{v['runs']}" for a, v in with_z.items()),
                     (more_stable and any(v["stable"] / v["runs"] > base["stable"] / base["runs"]
                                          for v in with_z.values())) if unstable_base else None))
  if "z0.001" in s:
    q0, q1 = base["neg_log_perplexity"][0], s["z0.001"]["neg_log_perplexity"][0]
    out.append(Finding("router z-loss (1e-3) does not hurt quality (slightly improves it)", "-1.755 -> -1.741",
                       f"{q0:.3f} -> {q1:.3f}", q1 >= q0 if math.isfinite(q0) and math.isfinite(q1) else None))
  lse = {a: v["final_router_logsumexp"][0] for a, v in s.items()}
  ordered = [lse[a] for a in s]  # arms in increasing coefficient order
  out.append(Finding("router z-loss shrinks the router logits (logsumexp)", "the loss's purpose (Sec. 3.1)",
                     ", ".join(f"{a} {v:.2f}" for a, v in lse.items()),
                     all(a >= b for a, b in zip(ordered, ordered[1:]))
                     if len(ordered) > 1 and all(map(math.isfinite, ordered)) else None))
  return out


def _plot(ctx: ExperimentContext, cfg: RouterZLoss, records: list[dict[str, Any]]) -> str:
  fig, axes = report.figure(3)
  titles = ("training loss", "router logsumexp (mean over layers)", "max |router logit| (mean over layers)")
  for i, arm in enumerate(cfg.arms()):
    for r in (r for r in records if r["arm"] == arm):
      style = dict(color=f"C{i}", alpha=0.8, linestyle="-" if r["seed"] == ctx.seeds[0] else "--",
                   label=arm if r["seed"] == ctx.seeds[0] else None)
      axes[0][0].plot(r["train_loss"]["step"], r["train_loss"]["loss"], **style)
      axes[0][1].plot(r["router_logsumexp"]["step"], r["router_logsumexp"][LSE], **style)
      axes[0][2].plot(r["router_max_abs_logit"]["step"], r["router_max_abs_logit"][MAXLOGIT], **style)
  for ax, t in zip(axes[0], titles):
    ax.set_title(t)
    ax.set_xlabel("step")
  axes[0][0].legend(fontsize=7)
  return report.save(fig, ctx.output_dir, "router_z_loss.png")
