"""SuperGLUE's official metrics as seqio metric functions `fn(targets, predictions) -> {name: value}`.

Pure Python/NumPy (no TensorFlow, no scikit-learn). Values are percentages (0-100), as T5 reports them.
Inputs are what the postprocessors in `stmoe.data.superglue` return: class indices (-1 = unparseable
prediction, always wrong), MultiRC {"group", "value"} dicts, ReCoRD answer lists / predicted strings.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

import numpy as np


def accuracy(targets: Sequence, predictions: Sequence) -> dict[str, float]:
  if len(targets) != len(predictions):
    raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")
  return {"accuracy": 100.0 * float(np.mean([t == p for t, p in zip(targets, predictions)]))}


def _f1_binary(targets: Sequence[int], predictions: Sequence[int], positive: int = 1) -> float:
  tp = sum(1 for t, p in zip(targets, predictions) if t == positive and p == positive)
  fp = sum(1 for t, p in zip(targets, predictions) if t != positive and p == positive)
  fn = sum(1 for t, p in zip(targets, predictions) if t == positive and p != positive)
  return 0.0 if tp == 0 else 2.0 * tp / (2 * tp + fp + fn)


def f1_macro(targets: Sequence[int], predictions: Sequence[int], num_classes: int) -> float:
  """Unweighted mean over classes of each class's one-vs-rest F1 (a class never seen scores 0)."""
  return float(np.mean([_f1_binary(targets, predictions, c) for c in range(num_classes)]))


def cb_metrics(targets: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
  """CommitmentBank: accuracy and macro-F1 over its three classes."""
  return {**accuracy(targets, predictions), "f1_macro": 100.0 * f1_macro(targets, predictions, 3)}


def multirc_metrics(targets: Sequence[dict], predictions: Sequence[dict]) -> dict[str, float]:
  """MultiRC: exact match per question (all its answers right) and F1a over all answer options."""
  groups: dict[int, list[bool]] = collections.defaultdict(list)
  for t, p in zip(targets, predictions):
    groups[t["group"]].append(t["value"] == p["value"])
  em = float(np.mean([all(v) for v in groups.values()]))
  f1a = _f1_binary([t["value"] for t in targets], [p["value"] for p in predictions], positive=1)
  return {"exact_match": 100.0 * em, "f1a": 100.0 * f1a}


def normalize_answer(text: str) -> str:
  """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
  text = text.lower()
  text = "".join(ch for ch in text if ch not in set(string.punctuation))
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


def _token_f1(target: str, prediction: str) -> float:
  t, p = normalize_answer(target).split(), normalize_answer(prediction).split()
  common = collections.Counter(t) & collections.Counter(p)
  same = sum(common.values())
  if same == 0:
    return 0.0
  precision, recall = same / len(p), same / len(t)
  return 2 * precision * recall / (precision + recall)


def record_metrics(targets: Sequence[Sequence[str]], predictions: Sequence[str]) -> dict[str, float]:
  """ReCoRD: per query, the max over its correct answers of exact match and token F1; then means."""
  ems, f1s = [], []
  for answers, pred in zip(targets, predictions):
    if not answers:  # unlabelled (test) query: nothing to score against
      continue
    ems.append(max(float(normalize_answer(a) == normalize_answer(pred)) for a in answers))
    f1s.append(max(_token_f1(a, pred) for a in answers))
  return {"exact_match": 100.0 * float(np.mean(ems)), "f1": 100.0 * float(np.mean(f1s))}


def matthews_corrcoef(targets: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
  """AX-b: Matthews correlation of binary labels (predictions that aren't 0/1 count as wrong)."""
  t = np.asarray(targets)
  p = np.asarray(predictions)
  p = np.where(np.isin(p, [0, 1]), p, 1 - t)  # unparseable -> the wrong class
  tp = float(np.sum((t == 1) & (p == 1)))
  tn = float(np.sum((t == 0) & (p == 0)))
  fp = float(np.sum((t == 0) & (p == 1)))
  fn = float(np.sum((t == 1) & (p == 0)))
  denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
  return {"matthews_corrcoef": 0.0 if denom == 0 else 100.0 * (tp * tn - fp * fn) / denom}


def metric_fns(task: str) -> list:
  """The official metric functions of a SuperGLUE task."""
  return {
      "cb": [cb_metrics],
      "multirc": [multirc_metrics],
      "record": [record_metrics],
      "axb": [matthews_corrcoef],
  }.get(task, [accuracy])
