"""seqio data sources of the stmoe tasks (imports seqio/TensorFlow; used by `stmoe.tasks`).

Every source looks its data up when a dataset is built (see `stmoe.data.settings`), and fails with a
message that says what to install or where to put the data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import seqio
import tensorflow as tf

from stmoe.data import settings, superglue
from stmoe.errors import UserError


class MissingDataError(UserError, FileNotFoundError):
  """A dataset that isn't where stmoe looked; the message says how to provide it."""


def _shuffled(ds: tf.data.Dataset, n: int, shuffle: bool, seed: int | None) -> tf.data.Dataset:
  return ds.shuffle(max(n, 1), seed=seed, reshuffle_each_iteration=True) if shuffle else ds


def columns_source(examples_fn: Callable[[str], dict[str, Sequence]], splits: Sequence[str],
                   ) -> seqio.FunctionDataSource:
  """A source over in-memory columns: `examples_fn(split) -> {feature: list of values}`.

  Strings become tf.string, ints int64, lists of strings ragged tf.string. Shuffling (when asked)
  permutes whole examples with the pipeline's seed.
  """
  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    cols = examples_fn(split)
    n = len(next(iter(cols.values())))
    tensors = {}
    for key, values in cols.items():
      if values and isinstance(values[0], (list, tuple)):
        tensors[key] = tf.ragged.constant([list(v) for v in values], dtype=tf.string)
      elif values and isinstance(values[0], (int, np.integer)):
        tensors[key] = tf.constant(values, tf.int64)
      else:
        tensors[key] = tf.constant(list(values), tf.string)
    ds = tf.data.Dataset.from_tensor_slices(tensors)
    if any(isinstance(t, tf.RaggedTensor) for t in tensors.values()):
      ds = ds.map(lambda ex: {k: v.to_tensor() if isinstance(v, tf.RaggedTensor) else v
                              for k, v in ex.items()})
    return _shuffled(ds, n, shuffle_files, seed)

  return seqio.FunctionDataSource(dataset_fn, splits=tuple(splits))


def text_source(documents_fn: Callable[[str], list[str]], splits: Sequence[str]) -> seqio.FunctionDataSource:
  """A source of {"text": document} examples from a Python function of the split."""
  return columns_source(lambda split: {"text": documents_fn(split)}, splits)


# ----------------------------------------------------------------------------------------------------
# TFDS


def check_tfds(name: str) -> str | None:
  """Raises MissingDataError unless TFDS dataset `name` is prepared; returns the data dir used."""
  import tensorflow_datasets as tfds

  data_dir = settings.tfds_data_dir()
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    raise MissingDataError(
        f"TFDS dataset {name!r} is not prepared in {builder.data_dir}. Build it once with "
        f"`tfds build {name.split(':')[0]} --data_dir DIR` (needs network access and, for c4, a lot "
        "of time and disk), then bind `TFDS_DATA_DIR = 'DIR'` in gin or export TFDS_DATA_DIR=DIR.")
  return data_dir


class CheckedTfdsDataSource(seqio.TfdsDataSource):
  """seqio's TFDS source (file-level sharding) that first checks the data exists, clearly."""

  def __init__(self, tfds_name: str, **kwargs):
    super().__init__(tfds_name=tfds_name, **kwargs)
    self._name = tfds_name

  def _check(self) -> None:
    data_dir = check_tfds(self._name)
    if data_dir:
      seqio.utils.set_tfds_data_dir_override(data_dir)

  def get_dataset(self, *args, **kwargs):
    self._check()
    return super().get_dataset(*args, **kwargs)

  def list_shards(self, split: str):
    self._check()
    return super().list_shards(split)


# ----------------------------------------------------------------------------------------------------
# SuperGLUE


def _decode(x):
  if isinstance(x, bytes):
    return x.decode("utf-8")
  if isinstance(x, dict):
    return {k: _decode(v) for k, v in x.items()}
  if isinstance(x, np.ndarray):
    return [_decode(v) for v in x.tolist()]
  if isinstance(x, (list, tuple)):
    return [_decode(v) for v in x]
  if isinstance(x, np.integer):
    return int(x)
  return x


TFDS_SUPERGLUE_VERSION = "1.0.2"


def superglue_records(task: str, split: str) -> list[dict]:
  """Records of a SuperGLUE task split: SUPERGLUE_DIR's JSONL when bound, else TFDS, else an error."""
  data_dir = settings.superglue_dir()
  if data_dir:
    return list(superglue.read_jsonl_records(data_dir, task, split))
  name = f"super_glue/{task}:{TFDS_SUPERGLUE_VERSION}"
  try:
    tfds_dir = check_tfds(name)
  except MissingDataError as e:
    raise MissingDataError(
        f"No SuperGLUE data for {task!r}: SUPERGLUE_DIR is not bound and {e} Or download the official "
        "distribution (https://super.gluebenchmark.com/tasks, combined.zip), unzip it and bind "
        "`SUPERGLUE_DIR = '/path/to/combined'` (folders BoolQ/, CB/, ...).") from None
  import tensorflow_datasets as tfds

  ds = tfds.load(name, split=split, data_dir=tfds_dir, shuffle_files=False)
  return [_decode(ex) for ex in tfds.as_numpy(ds)]


def superglue_examples(task: str, split: str) -> dict[str, list]:
  """T5 text-to-text columns of a SuperGLUE task split (see `superglue.format_example`)."""
  examples = [ex for rec in superglue_records(task, split)
              for ex in superglue.format_example(task, rec, split)]
  if not examples:
    raise MissingDataError(f"SuperGLUE {task} {split}: the data has no examples.")
  return {key: [ex[key] for ex in examples] for key in examples[0]}


def superglue_source(task: str) -> seqio.FunctionDataSource:
  return columns_source(lambda split: superglue_examples(task, split), superglue.splits(task))
