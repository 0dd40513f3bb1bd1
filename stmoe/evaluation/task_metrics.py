"""Task-metric evaluation: decode a task split, postprocess, and run the task's seqio metric functions.

This is what seqio's Evaluator does, on our model API and without TensorFlow in the decoding loop:
  1. `get_eval_dataset` gives the ordered, unpacked batches, the raw examples and the postprocessed targets;
  2. `model.predict_batch` decodes each batch (greedy by default; the MoE layers run deterministically with
     the EVAL capacity factor);
  3. the decoded ids are cut at EOS and detokenized, then `EvalData.compute_metrics` applies the task's
     postprocess_fn and metric_fns (e.g. accuracy for shakespeare_genre, the official SuperGLUE metrics).
Used by `stmoe eval` (task metrics), `stmoe infer`, the fine-tuning callback and the quickstart.
Library functions only: the command lines are stmoe/cli/eval.py and stmoe/cli/infer.py.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import sys
import time
from typing import Any, Mapping, Sequence

import numpy as np

from stmoe.special_ids import EOS_ID


@dataclasses.dataclass
class TaskEvalResult:
  """Metrics of one task split plus what produced them (one entry per example, in order)."""
  task: str
  split: str
  metrics: dict[str, float]
  inputs: list[str]
  predictions: list[str]
  targets: list[str]
  num_examples: int
  seconds: float

  def records(self) -> list[dict[str, str]]:
    """JSONL rows: {"input", "prediction", "target"}."""
    return [{"input": i, "prediction": p, "target": t}
            for i, p, t in zip(self.inputs, self.predictions, self.targets)]


def trim_ids(ids: Sequence[int], eos_id: int = EOS_ID) -> list[int]:
  """Token ids up to (not including) the first EOS, without padding (0)."""
  out = []
  for t in np.asarray(ids).tolist():
    if t == eos_id:
      break
    if t != 0:
      out.append(int(t))
  return out


def decode_texts(vocabulary: Any, token_ids: np.ndarray) -> list[str]:
  """[batch, length] ids -> one string per row (cut at EOS); `vocabulary` is a seqio Vocabulary."""
  return [vocabulary.decode(trim_ids(row)) for row in np.asarray(token_ids)]


def _text(x: Any) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def example_text(example: Mapping[str, Any], feature: str, vocabulary: Any) -> str:
  """The text of an example's feature: its "<feature>_pretokenized" string if the task keeps one, else its
  token ids decoded (LM and prefix-LM tasks keep only ids); "" if the example has no such feature."""
  if f"{feature}_pretokenized" in example:
    return _text(example[f"{feature}_pretokenized"])
  if feature in example:
    return vocabulary.decode(trim_ids(np.asarray(example[feature]).reshape(-1)))
  return ""


def predict_texts(model: Any, params: Any, batches: Sequence[Mapping[str, np.ndarray]], vocabulary: Any, *,
                  num_examples: int | None = None, decode_config: Any = None,
                  max_decode_length: int | None = None, seed: int = 0, progress: bool = False,
                  label: str = "decode") -> list[str]:
  """Decodes every batch with `model.predict_batch` and detokenizes; returns `num_examples` strings."""
  import jax

  from stmoe import decoding

  cfg = decode_config or decoding.DecodeConfig()
  if max_decode_length is not None and cfg.max_decode_length is None:
    cfg = dataclasses.replace(cfg, max_decode_length=int(max_decode_length))
  out: list[str] = []
  t0 = time.time()
  for i, batch in enumerate(batches):
    rng = jax.random.PRNGKey(seed + i) if cfg.method == "sample" else None
    feed = {k: v for k, v in batch.items() if k in ("encoder_input_tokens", "decoder_input_tokens",
                                                     "decoder_target_tokens", "decoder_causal_attention")}
    ids = np.asarray(jax.device_get(model.predict_batch(params, feed, rng, decode_config=cfg)))
    out.extend(decode_texts(vocabulary, ids))
    last = i + 1 == len(batches)
    if progress and (sys.stderr.isatty() or last):  # redraw in place on a terminal; one line in logs
      done = min(len(out), num_examples or len(out))
      sys.stderr.write(f"\r[{label}] batch {i + 1}/{len(batches)} ({done} examples, {time.time() - t0:.0f}s)")
      sys.stderr.write("\n" if last else "")
      sys.stderr.flush()
  return out[:num_examples] if num_examples is not None else out


def evaluate_task(model: Any, params: Any, eval_data: Any, *, decode_config: Any = None,
                  max_decode_length: int | None = None, seed: int = 0, progress: bool = False,
                  split: str = "validation") -> TaskEvalResult:
  """Decodes `eval_data` (a `stmoe.data.pipeline.EvalData`) and computes its task's metrics."""
  t0 = time.time()
  preds = predict_texts(model, params, eval_data.batches, eval_data.vocabulary,
                        num_examples=eval_data.num_examples, decode_config=decode_config,
                        max_decode_length=max_decode_length, seed=seed, progress=progress,
                        label=f"{eval_data.task_name}")
  metrics = {k: float(v) for k, v in eval_data.compute_metrics(preds).items()}
  inputs = [example_text(ex, "inputs", eval_data.vocabulary) for ex in eval_data.examples]
  targets = [example_text(ex, "targets", eval_data.vocabulary) for ex in eval_data.examples]
  return TaskEvalResult(task=eval_data.task_name, split=split, metrics=metrics, inputs=inputs, predictions=preds,
                        targets=targets, num_examples=eval_data.num_examples, seconds=time.time() - t0)


def run_task_eval(model: Any, params: Any, task: str, split: str, task_feature_lengths: Mapping[str, int], *,
                  batch_size: int = 32, max_examples: int | None = None, decode_config: Any = None,
                  seed: int = 0, progress: bool = False) -> TaskEvalResult:
  """Builds the eval data of `task`/`split` and evaluates it (see `evaluate_task`)."""
  from stmoe.data.pipeline import get_eval_dataset

  from stmoe.training import layout

  model_type = layout.model_type_of(model)
  lengths = dict(task_feature_lengths)
  if model_type != "encoder_decoder":
    provider_features = _task_features(task)
    if "inputs" not in provider_features:
      lengths.pop("inputs", None)  # a causal LM task: targets only
  data = get_eval_dataset(task, split, lengths, batch_size, max_examples=max_examples, model_type=model_type)
  return evaluate_task(model, params, data, decode_config=decode_config,
                       max_decode_length=int(task_feature_lengths["targets"]), seed=seed, progress=progress,
                       split=split)


def _task_features(task: str) -> set[str]:
  import seqio

  import stmoe.tasks  # noqa: F401

  return set(seqio.get_mixture_or_task(task).output_features)


def majority_baseline(train_targets: Sequence[str], eval_targets: Sequence[str]) -> tuple[str, float]:
  """(the most frequent TRAIN label, its accuracy on the eval targets): the majority-class baseline."""
  if not train_targets or not eval_targets:
    raise ValueError("majority_baseline needs non-empty train and eval targets.")
  label = collections.Counter(train_targets).most_common(1)[0][0]
  return label, float(np.mean([t == label for t in eval_targets]))


def task_targets(task: str, split: str) -> list[str]:
  """The raw target strings of a task split (no tokenization), e.g. for a majority-class baseline."""
  import stmoe.tasks  # noqa: F401
  import seqio

  ds = seqio.get_mixture_or_task(task).source.get_dataset(split=split, shuffle=False)
  return [_text(ex["targets"]) for ex in ds.as_numpy_iterator()]


def write_results(path: str, payload: Mapping[str, Any]) -> str:
  """Writes a JSON results file atomically (tmp + rename)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
  return path


def write_predictions(path: str, records: Sequence[Mapping[str, Any]]) -> str:
  """Writes one JSON object per line (atomically: tmp + rename)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  os.replace(tmp, path)  # atomically: a failed run never leaves half a file
  return path


def tasks_with_metrics(name: str) -> list[str]:
  """The task itself, or a mixture's sub-tasks, that have seqio metric functions."""
  import seqio

  import stmoe.tasks  # noqa: F401

  provider = seqio.get_mixture_or_task(name)
  tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  return [t.name for t in tasks if t.metric_fns]


def score_tasks(model: Any, params: Any, name: str, split: str, task_feature_lengths: Mapping[str, int], *,
                batch_size: int = 32, max_examples: int | None = None, decode_config: Any = None, seed: int = 0,
                progress: bool = False) -> dict[str, TaskEvalResult]:
  """Decodes and scores every task of `name` (a task or a mixture) that has metric functions."""
  return {task: run_task_eval(model, params, task, split, task_feature_lengths, batch_size=batch_size,
                              max_examples=max_examples, decode_config=decode_config, seed=seed,
                              progress=progress)
          for task in tasks_with_metrics(name)}
