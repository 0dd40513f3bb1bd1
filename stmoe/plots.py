"""PNG plots of a run (matplotlib, Agg backend: no display needed): training curves and expert load.

Reads MODEL_DIR/metrics.jsonl as the trainer writes it: `loss` per logged step, `task_eval/<metric>` from the
fine-tuning callback, and the router statistics `experts/<stack>/layer_<i>/expert_fraction/<e>` (the
fraction of the layer's routing assignments that went to expert e).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Sequence

_FRACTION = re.compile(r"^experts/(?P<layer>[^/]+/layer_\d+)/expert_fraction/(?P<expert>\d+)$")


def read_metrics(path: str) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl file (a MODEL_DIR is accepted too); [] if it does not exist."""
  if os.path.isdir(path):
    path = os.path.join(path, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of `key` over the records that have it as a number."""
  steps, values = [], []
  for r in records:
    v = r.get(key)
    if isinstance(v, (int, float)):
      steps.append(int(r["step"]))
      values.append(float(v))
  return steps, values


def expert_load(records: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
  """{"encoder/layer_1": [fraction of expert 0, 1, ...]} from the LAST record that has router fractions."""
  for r in reversed(records):
    found: dict[str, dict[int, float]] = {}
    for k, v in r.items():
      m = _FRACTION.match(k)
      if m and isinstance(v, (int, float)):
        found.setdefault(m.group("layer"), {})[int(m.group("expert"))] = float(v)
    if found:
      return {layer: [per[e] for e in sorted(per)] for layer, per in sorted(found.items())}
  return {}


def training_plot(path: str, pretrain: Sequence[dict[str, Any]], finetune: Sequence[dict[str, Any]], *,
                  baseline: float | None = None, accuracy_scale: float = 1.0,
                  title: str = "stmoe quickstart") -> str:
  """Writes a 3-panel PNG: pretraining loss, fine-tuning loss + task accuracy, expert load per MoE layer.

  `accuracy_scale` multiplies the logged task_eval/accuracy (0.01 for seqio's percent) to plot fractions;
  `baseline` (a fraction) is drawn as a horizontal line.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
  ax = axes[0]
  s, v = series(pretrain, "loss")
  ax.plot(s, v, label="train loss", color="tab:blue")
  s, v = series(pretrain, "eval/loss")
  if s:
    ax.plot(s, v, "o--", label="validation loss", color="tab:orange")
  ax.set_title("pretraining (span corruption)")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (cross-entropy + router losses)")
  ax.legend()
  ax.grid(alpha=0.3)

  ax = axes[1]
  s, v = series(finetune, "loss")
  ax.plot(s, v, label="train loss", color="tab:blue")
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.set_title("fine-tuning (genre of unseen plays)")
  ax.grid(alpha=0.3)
  acc_s, acc_v = series(finetune, "task_eval/accuracy")
  acc_v = [a * accuracy_scale for a in acc_v]
  if acc_s:
    ax2 = ax.twinx()
    ax2.plot(acc_s, acc_v, "o-", color="tab:green", label="validation accuracy")
    if baseline is not None:
      ax2.axhline(baseline, color="tab:red", linestyle=":", label=f"majority class {baseline:.2f}")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("accuracy")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax2.legend(lines[0] + lines2[0], ["train loss"] + lines2[1], loc="upper right", fontsize=8)
  else:
    ax.legend()

  ax = axes[2]
  load = expert_load(finetune) or expert_load(pretrain)
  if load:
    layers = list(load)
    num_experts = max(len(v) for v in load.values())
    width = 0.8 / len(layers)
    x = np.arange(num_experts)
    for i, layer in enumerate(layers):
      fr = np.asarray(load[layer], np.float64)
      share = fr / max(float(fr.sum()), 1e-12)  # each expert's share of the layer's kept assignments
      ax.bar(x[:len(fr)] + (i - (len(layers) - 1) / 2) * width, share, width, label=layer)
    ax.axhline(1.0 / num_experts, color="k", linestyle=":", label="uniform (1/experts)")
    ax.set_xticks(x)
    ax.set_xlabel("expert")
    ax.set_ylabel("share of routed (kept) token assignments")
    top = max(max(np.asarray(v) / max(sum(v), 1e-12)) for v in load.values())
    ax.set_ylim(0, top * 1.35)
    ax.legend(fontsize=7, loc="upper center", ncol=3)
  else:
    ax.text(0.5, 0.5, "no router statistics logged", ha="center", va="center")
  ax.set_title("expert load per MoE layer (last logged step)")
  fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
