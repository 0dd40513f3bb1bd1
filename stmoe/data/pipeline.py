"""The input pipeline the trainer and the evaluator consume: numpy batches with t5x feature names.

`DataIterator` streams training batches of a seqio task or mixture through seqio's feature converters
(encoder-decoder, decoder-only, prefix-LM; packed or not), deterministic for a given seed, sharded per
process, with a JSON-serialisable position (`get_state` / `set_state`) for exact resumes.
`get_eval_dataset` builds the ordered, unpacked, unshuffled batches of a task split together with the
postprocessed targets and a `compute_metrics(predictions)` that runs the task's metric functions.

seqio/TensorFlow are imported when an iterator is built, never by `import stmoe.data.pipeline`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

MODEL_TYPES = ("encoder_decoder", "decoder_only", "prefix_lm")
_STATE_VERSION = 1


def _feature_converter(model_type: str, pack: bool):
  import seqio

  if model_type == "encoder_decoder":
    return seqio.EncDecFeatureConverter(pack=pack)
  if model_type == "decoder_only":  # causal LM on "targets", or prefix LM when "inputs" is requested
    return seqio.DecoderFeatureConverter(pack=pack)
  if model_type == "prefix_lm":
    return seqio.PrefixLMFeatureConverter(pack=pack)
  raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}.")


def _get_task_or_mixture(name: str):
  import seqio

  import stmoe.tasks  # noqa: F401  (registers the tasks)

  try:
    return seqio.get_mixture_or_task(name)
  except ValueError:
    raise ValueError(
        f"No seqio task or mixture named {name!r}. stmoe registers: "
        f"{', '.join(sorted(seqio.TaskRegistry.names()) + sorted(seqio.MixtureRegistry.names()))}. "
        "Register your own in a module imported from your gin file (see docs/data.md).") from None


class DataIterator:
  """Training batches (int32 numpy dicts with t5x feature names) of THIS process's shard.

  Each process reads its own shard (`shard_id` of `num_shards`) and yields `batch_size // num_shards`
  rows per batch. The same arguments and (non-None) seed give the same batches; with seed=None the
  stream is random and can't be resumed exactly. `set_state(get_state())` after p
  batches yields exactly what an uninterrupted iterator yields from batch p on (the stream is rebuilt
  and the first p batches are skipped, so a resume costs the time to recompute them).
  """

  def __init__(self, mixture_or_task_name: str, task_feature_lengths: Mapping[str, int], batch_size: int,
               *, split: str = "train", model_type: str = "encoder_decoder", shuffle: bool = True,
               seed: int | None = 0, pack: bool = True, repeat: bool = True, shard_id: int = 0,
               num_shards: int = 1, use_cached: bool = False):
    if model_type not in MODEL_TYPES:
      raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}.")
    if batch_size % num_shards:
      raise ValueError(f"batch_size {batch_size} is not divisible by num_shards {num_shards}: each "
                       "process must get the same number of rows.")
    if not 0 <= shard_id < num_shards:
      raise ValueError(f"shard_id must be in [0, {num_shards}), got {shard_id}.")
    self.mixture_or_task_name = mixture_or_task_name
    self.task_feature_lengths = dict(task_feature_lengths)
    self.batch_size = batch_size
    self.per_process_batch_size = batch_size // num_shards
    self.split, self.model_type, self.shuffle, self.seed = split, model_type, shuffle, seed
    self.pack, self.repeat, self.use_cached = pack, repeat, use_cached
    self.shard_id, self.num_shards = shard_id, num_shards
    self._provider = _get_task_or_mixture(mixture_or_task_name)
    self._position = 0
    self._iterator = None

  @property
  def vocabulary(self):
    """The output vocabulary (a seqio.Vocabulary; `.vocab_size` includes the 100 extra ids)."""
    features = self._provider.output_features
    return features["targets"].vocabulary

  def _build(self) -> None:
    import seqio

    shard_info = seqio.ShardInfo(self.shard_id, self.num_shards) if self.num_shards > 1 else None
    ds = seqio.get_dataset(
        self._provider, self.task_feature_lengths, _feature_converter(self.model_type, self.pack),
        dataset_split=self.split, use_cached=self.use_cached, shuffle=self.shuffle,
        num_epochs=None if self.repeat else 1, shard_info=shard_info, verbose=False, seed=self.seed)
    ds = ds.batch(self.per_process_batch_size, drop_remainder=True)
    if self._position:
      ds = ds.skip(self._position)
    self._iterator = ds.as_numpy_iterator()

  def __iter__(self) -> DataIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self._build()
    batch = next(self._iterator)  # StopIteration ends a non-repeating stream
    self._position += 1
    return {k: np.asarray(v, np.int32) for k, v in batch.items()}

  def _identity(self) -> dict[str, Any]:
    return {"mixture_or_task_name": self.mixture_or_task_name, "split": self.split,
            "task_feature_lengths": self.task_feature_lengths, "batch_size": self.batch_size,
            "model_type": self.model_type, "shuffle": self.shuffle, "seed": self.seed, "pack": self.pack,
            "repeat": self.repeat, "shard_id": self.shard_id, "num_shards": self.num_shards}

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position: the number of batches yielded plus what defines the stream."""
    return {"version": _STATE_VERSION, "position": self._position, **self._identity()}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues from a `get_state()` position; the stream's definition must be the same."""
    if state.get("version") != _STATE_VERSION:
      raise ValueError(f"Unknown data iterator state version {state.get('version')!r}.")
    mismatched = {k: (state.get(k), v) for k, v in self._identity().items() if state.get(k) != v}
    if mismatched:
      detail = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in mismatched.items())
      raise ValueError(f"Can't resume this data stream from a state saved for a different one ({detail}). "
                       "Restore with the same task, lengths, batch size, seed and sharding.")
    self._position = int(state["position"])
    self._iterator = None  # rebuilt lazily, skipping `position` batches


@dataclasses.dataclass
class EvalData:
  """An evaluation split: model batches, the raw examples, the metric targets, and scoring.

  batches: int32 dicts (t5x feature names, unpacked, in example order); the last one is padded with
    all-zero rows up to batch_size (drop predictions past `num_examples`).
  examples: the task's examples (numpy/bytes, incl. "inputs_pretokenized", "targets_pretokenized").
  targets: the postprocessed targets, what the task's metric functions compare against.
  """
  task_name: str
  batches: list[dict[str, np.ndarray]]
  examples: list[dict[str, Any]]
  targets: list[Any]
  num_examples: int
  postprocess_fn: Callable | None
  metric_fns: list[Callable]
  vocabulary: Any

  def compute_metrics(self, predictions: list[str]) -> dict[str, float]:
    """Postprocesses decoded prediction strings (one per example, in order) and runs the metrics."""
    if len(predictions) < self.num_examples:
      raise ValueError(f"{len(predictions)} predictions for {self.num_examples} examples.")
    preds = []
    for text, ex in zip(predictions[: self.num_examples], self.examples):
      preds.append(self.postprocess_fn(text, example=ex, is_target=False) if self.postprocess_fn else text)
    metrics = {}
    for fn in self.metric_fns:
      metrics.update(fn(self.targets, preds))
    return metrics


def _to_str(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def get_eval_dataset(task_name: str, split: str, task_feature_lengths: Mapping[str, int],
                     batch_size: int, *, model_type: str = "encoder_decoder",
                     max_examples: int | None = None, seed: int = 0) -> EvalData:
  """The ordered eval batches of a task split with its metric targets (see `EvalData`).

  Targets are `task.postprocess_fn(targets_pretokenized, example=ex, is_target=True)`, as seqio's
  evaluator computes them; `compute_metrics` does the same for the predictions and applies
  `task.metric_fns` (e.g. SuperGLUE's official metrics).
  """
  import seqio

  task = _get_task_or_mixture(task_name)
  if not isinstance(task, seqio.Task):
    raise ValueError(f"{task_name!r} is a mixture; evaluate each of its tasks separately.")
  ds = task.get_dataset(dict(task_feature_lengths), split=split, shuffle=False, num_epochs=1, seed=seed)
  if max_examples is not None:
    ds = ds.take(max_examples)
  examples = list(ds.as_numpy_iterator())
  targets = []
  for ex in examples:
    text = _to_str(ex["targets_pretokenized"]) if "targets_pretokenized" in ex else ""
    targets.append(task.postprocess_fn(text, example=ex, is_target=True) if task.postprocess_fn else text)
  model_ds = _feature_converter(model_type, pack=False)(ds, dict(task_feature_lengths))
  rows = list(model_ds.as_numpy_iterator())
  if len(rows) != len(examples):
    raise RuntimeError(f"feature conversion changed the number of examples ({len(examples)} -> {len(rows)})")
  batches = []
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    batch = {k: np.stack([r[k] for r in chunk]).astype(np.int32) for k in chunk[0]}  # [rows, length]
    pad = batch_size - len(chunk)
    if pad:
      batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], np.int32)]) for k, v in batch.items()}
    batches.append(batch)
  return EvalData(task_name=task_name, batches=batches, examples=examples, targets=targets,
                  num_examples=len(examples), postprocess_fn=task.postprocess_fn,
                  metric_fns=list(task.metric_fns), vocabulary=task.output_features["targets"].vocabulary)
