"""Metric writers (TensorBoard via tensorboardX, MODEL_DIR/metrics.jsonl) and a terminal progress bar.

Only process 0 writes (the others get no-op writers), so a multi-host run produces one set of files.
TensorFlow is never imported: tensorboardX writes the event files itself.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping, TextIO

import numpy as np


def to_python(metrics: Mapping[str, Any]) -> dict[str, float]:
  """Device scalars -> Python floats (for JSON and TensorBoard)."""
  out = {}
  for k, v in metrics.items():
    a = np.asarray(v)
    if a.size == 1:
      out[k] = float(a.reshape(()))
  return out


class MetricsWriter:
  """Writes a dict of scalars per logged step to TensorBoard and one JSON line to metrics.jsonl."""

  def __init__(self, model_dir: str, enabled: bool = True, tensorboard_subdir: str = "tensorboard",
               resume_step: int | None = None):
    """`resume_step`: a run resumed from this step; rows of later steps (logged after that checkpoint by
    the interrupted run, and about to be logged again) move to metrics_discarded.jsonl, so metrics.jsonl
    never repeats a step."""
    self.enabled = enabled
    self._tb = None
    self._jsonl: TextIO | None = None
    if not enabled:
      return
    os.makedirs(model_dir, exist_ok=True)
    if resume_step is not None:
      _set_aside_rows_after(os.path.join(model_dir, "metrics.jsonl"), resume_step)
    from tensorboardX import SummaryWriter  # lazily: only process 0 needs it

    self._tb = SummaryWriter(logdir=os.path.join(model_dir, tensorboard_subdir))
    self._jsonl = open(os.path.join(model_dir, "metrics.jsonl"), "a", encoding="utf-8")

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    for k, v in scalars.items():
      if math.isfinite(v):
        self._tb.add_scalar(k, v, global_step=step)
    record = {"step": int(step)}
    record.update({k: (v if math.isfinite(v) else str(v)) for k, v in scalars.items()})
    self._jsonl.write(json.dumps(record, sort_keys=True) + "\n")
    self._jsonl.flush()
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._jsonl is not None:
      self._jsonl.close()


def _set_aside_rows_after(path: str, step: int) -> None:
  """Moves the rows of metrics.jsonl with a step after `step` to metrics_discarded.jsonl (atomically)."""
  if not os.path.exists(path):
    return
  keep, drop = [], []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        later = int(json.loads(line).get("step", 0)) > step
      except (ValueError, AttributeError):
        later = False
      (drop if later else keep).append(line)
  if not drop:
    return
  with open(os.path.join(os.path.dirname(path), "metrics_discarded.jsonl"), "a", encoding="utf-8") as f:
    f.writelines(drop)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(keep)
  os.replace(tmp, path)


def _fmt_seconds(s: float) -> str:
  if not math.isfinite(s):
    return "?"
  s = int(round(s))
  h, rem = divmod(s, 3600)
  m, sec = divmod(rem, 60)
  return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


class ProgressBar:
  """`[#####.....] step 120/1000 loss 3.21 | 4.2 steps/s | ETA 03:29`.

  On a terminal the bar redraws in place; otherwise (logs, CI) it prints a plain line every
  `plain_every_s` seconds so logs stay readable.
  """

  def __init__(self, total_steps: int, start_step: int = 0, enabled: bool = True, stream: TextIO | None = None,
               plain_every_s: float = 30.0, width: int = 30):
    self.total, self.start = total_steps, start_step
    self.enabled = enabled
    self.stream = stream or sys.stderr
    self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
    self.width, self.plain_every_s = width, plain_every_s
    self._t0 = time.time()
    self._last_print = 0.0

  def update(self, step: int, loss: float | None = None, force: bool = False) -> str:
    done = step - self.start
    elapsed = max(time.time() - self._t0, 1e-9)
    rate = done / elapsed
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    frac = min(1.0, step / max(self.total, 1))
    bar = "#" * int(frac * self.width) + "." * (self.width - int(frac * self.width))
    loss_s = f" loss {loss:.4f}" if loss is not None else ""
    line = f"[{bar}] step {step}/{self.total}{loss_s} | {rate:.2f} steps/s | ETA {_fmt_seconds(eta)}"
    if not self.enabled:
      return line
    now = time.time()
    if self.tty:
      self.stream.write("\r" + line)
      if step >= self.total:
        self.stream.write("\n")
      self.stream.flush()
    elif force or now - self._last_print >= self.plain_every_s or step >= self.total:
      self.stream.write(line + "\n")
      self.stream.flush()
      self._last_print = now
    return line

  def close(self) -> None:
    if self.enabled and self.tty:
      self.stream.write("\n")
      self.stream.flush()
