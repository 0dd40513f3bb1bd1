"""Input sources for the trainer: pluggable (gin) functions returning a batch iterator with a position.

An input function has the signature::

    input_fn(mixture_or_task_name, task_feature_lengths, batch_size, *, split, model_type, shuffle, seed,
             shard_id, num_shards, repeat) -> iterator

and the iterator yields this process's rows of each global batch (``batch_size // num_shards`` rows of
numpy int32 features with t5x names) and has ``get_state() -> dict`` / ``set_state(dict)`` (a JSON-able
stream position, checkpointed with the model so a resumed run sees exactly the same batches).

* :func:`seqio_input` -- the real thing: ``stmoe.data.pipeline.DataIterator`` over a registered seqio
  task or mixture (TensorFlow is imported only here, lazily).
* :func:`synthetic_input` -- a deterministic in-memory copy task (targets = the first tokens of the
  inputs) for tests, benchmarks and smoke runs; needs no TensorFlow and its loss falls quickly.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import gin
import numpy as np

from stmoe.errors import UserError


class MissingTaskError(UserError):
  """MIXTURE_OR_TASK_NAME names no registered seqio task or mixture."""


@gin.configurable
def seqio_input(mixture_or_task_name: str | None, task_feature_lengths: Mapping[str, int], batch_size: int, *,
                split: str = "train", model_type: str = "encoder_decoder", shuffle: bool = True, seed: int = 0,
                shard_id: int = 0, num_shards: int = 1, repeat: bool = True, pack: bool = True):
  """A seqio-backed DataIterator (imports stmoe.tasks, which registers the tasks, and TensorFlow)."""
  if not mixture_or_task_name:
    raise MissingTaskError("MIXTURE_OR_TASK_NAME is not set: pass --gin.MIXTURE_OR_TASK_NAME=\"'task_name'\" "
                           "(run `stmoe data` / see docs/data.md for the registered tasks).")
  import seqio

  import stmoe.tasks  # noqa: F401  (registers tasks and mixtures)
  from stmoe.data.pipeline import DataIterator

  registered = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
  if mixture_or_task_name not in registered:
    close = sorted(n for n in registered if mixture_or_task_name.split("_")[0] in n)[:10]
    raise MissingTaskError(
        f"MIXTURE_OR_TASK_NAME={mixture_or_task_name!r} is not a registered seqio task or mixture. "
        f"Similar names: {close or sorted(registered)[:10]}. Register it in stmoe/tasks or fix the name.")
  from stmoe.training import layout

  provider = seqio.get_mixture_or_task(mixture_or_task_name)
  layout.check_feature_lengths(model_type, task_feature_lengths)
  layout.check_task_features(model_type, mixture_or_task_name, frozenset(provider.output_features),
                             task_feature_lengths)
  return DataIterator(mixture_or_task_name, dict(task_feature_lengths), batch_size, split=split,
                      model_type=model_type, shuffle=shuffle, seed=seed, pack=pack, repeat=repeat,
                      shard_id=shard_id, num_shards=num_shards)


class SyntheticIterator:
  """Deterministic copy-task batches; batch n depends only on (seed, split, n), so positions are exact."""

  def __init__(self, task_feature_lengths: Mapping[str, int], batch_size: int, *, vocab_size: int,
               model_type: str, seed: int, split: str, shard_id: int, num_shards: int, repeat: bool,
               num_batches: int | None):
    if batch_size % num_shards:
      raise ValueError(f"batch_size={batch_size} is not divisible by the {num_shards} data shards (processes).")
    self.lengths = dict(task_feature_lengths)
    self.batch_size, self.vocab_size, self.model_type = batch_size, vocab_size, model_type
    self.seed = seed + (0 if split == "train" else 1_000_003)
    self.shard_id, self.num_shards = shard_id, num_shards
    self.repeat, self.num_batches = repeat, num_batches
    self.index = 0

  def get_state(self) -> dict[str, Any]:
    return {"index": self.index}

  def set_state(self, state: Mapping[str, Any]) -> None:
    self.index = int(state["index"])

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def _global_batch(self, n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, n])
    lt = self.lengths["targets"]
    li = self.lengths.get("inputs", max(1, lt // 2))
    inputs = rng.integers(2, self.vocab_size, size=(self.batch_size, li), dtype=np.int64)  # [B, Li]
    targets = np.tile(inputs, (1, -(-lt // li)))[:, :lt].copy()  # [B, Lt] copy task
    targets[:, -1] = 1  # EOS
    if self.model_type != "encoder_decoder" and "inputs" not in self.lengths:
      # causal LM: a sequence that repeats its first half, so the second half is predictable
      seq = np.tile(inputs, (1, -(-lt // li) + 1))[:, :lt].copy()  # [B, Lt]
      seq[:, -1] = 1
      dec_in = np.concatenate([np.zeros((self.batch_size, 1), np.int64), seq[:, :-1]], axis=1)
      out = {"decoder_input_tokens": dec_in, "decoder_target_tokens": seq,
             "decoder_loss_weights": np.ones_like(seq)}
    elif self.model_type != "encoder_decoder":
      seq = np.concatenate([inputs, targets], axis=1)  # [B, Li + Lt]
      dec_in = np.concatenate([np.zeros((self.batch_size, 1), np.int64), seq[:, :-1]], axis=1)
      weights = np.concatenate([np.zeros_like(inputs), np.ones_like(targets)], axis=1)
      causal = np.concatenate([np.ones_like(inputs), np.zeros_like(targets)], axis=1)
      out = {"decoder_input_tokens": dec_in, "decoder_target_tokens": seq, "decoder_loss_weights": weights,
             "decoder_causal_attention": causal}
    else:
      dec_in = np.concatenate([np.zeros((self.batch_size, 1), np.int64), targets[:, :-1]], axis=1)
      out = {"encoder_input_tokens": inputs, "decoder_input_tokens": dec_in,
             "decoder_target_tokens": targets, "decoder_loss_weights": np.ones_like(targets)}
    return {k: v.astype(np.int32) for k, v in out.items()}

  def __next__(self) -> dict[str, np.ndarray]:
    if self.num_batches is not None and self.index >= self.num_batches:
      if not self.repeat:
        raise StopIteration
      self.index = 0
    batch = self._global_batch(self.index)
    self.index += 1
    rows = self.batch_size // self.num_shards
    return {k: v[self.shard_id * rows:(self.shard_id + 1) * rows] for k, v in batch.items()}


@gin.configurable
def synthetic_input(mixture_or_task_name: str | None, task_feature_lengths: Mapping[str, int], batch_size: int,
                    *, split: str = "train", model_type: str = "encoder_decoder", shuffle: bool = True,
                    seed: int = 0, shard_id: int = 0, num_shards: int = 1, repeat: bool = True,
                    vocab_size: int = 64, num_batches: int | None = None) -> SyntheticIterator:
  """Deterministic copy-task batches (ignores the task name); eval splits use a different seed."""
  del mixture_or_task_name, shuffle
  return SyntheticIterator(task_feature_lengths, batch_size, vocab_size=vocab_size, model_type=model_type,
                           seed=seed, split=split, shard_id=shard_id, num_shards=num_shards, repeat=repeat,
                           num_batches=num_batches if split == "train" else (num_batches or 1_000_000))
