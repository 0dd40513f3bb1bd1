"""Formatting shared by the experiments: mean ± spread over seeds, and matplotlib figures (Agg, no display)."""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof=1; 0 for one value) over the finite values; NaN if none."""
  v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
  if v.size == 0:
    return math.nan, math.nan
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def fmt_mean_std(values: Sequence[float], digits: int = 3) -> str:
  """'1.234 ± 0.010 (n=2)' (the spread is the sample std over seeds); 'n/a' without finite values."""
  m, s = mean_std(values)
  n = sum(1 for x in values if x is not None and math.isfinite(x))
  if n == 0:
    return "n/a"
  return f"{m:.{digits}f} ± {s:.{digits}f} (n={n})" if n > 1 else f"{m:.{digits}f} (n=1)"


def figure(ncols: int, nrows: int = 1, width: float = 4.5, height: float = 3.5) -> tuple[Any, Any]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
  return fig, axes


def save(fig: Any, output_dir: str, name: str) -> str:
  """Writes the figure as PNG atomically; returns the file name (relative to output_dir)."""
  import matplotlib.pyplot as plt

  fig.tight_layout()
  path = os.path.join(output_dir, name)
  tmp = f"{path}.tmp-{os.getpid()}.png"
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)
  return name
