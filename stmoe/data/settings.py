"""Where the data lives: gin macros with environment-variable fallbacks (no TensorFlow).

The task registrations run when `stmoe.tasks` is imported, usually before gin has parsed the macros, so
data locations are looked up when a dataset is built, not when a task is registered:

| gin macro        | environment variable   | what                                                        |
|------------------|------------------------|-------------------------------------------------------------|
| VOCABULARY_PATH  | STMOE_VOCABULARY_PATH  | SentencePiece model (default: bundled, see stmoe.data.vocab) |
| SUPERGLUE_DIR    | STMOE_SUPERGLUE_DIR    | the official SuperGLUE distribution (BoolQ/train.jsonl, ...)  |
| TFDS_DATA_DIR    | TFDS_DATA_DIR          | TensorFlow Datasets data dir (c4/en, super_glue/*)           |
| TEXT_FILES       | STMOE_TEXT_FILES       | glob of local text files for text_span_corruption / text_lm  |
| TEXT_SPLIT_BY    | STMOE_TEXT_SPLIT_BY    | 'line' (default) or 'paragraph' (blank-line separated)       |
| TEXT_VALIDATION_PERCENT | -               | percent of text documents held out for validation (5)        |
"""

from __future__ import annotations

import os
from typing import Any


def setting(macro: str, env: str | None = None, default: Any = None) -> Any:
  """The value of gin macro `macro` if bound, else of environment variable `env`, else `default`."""
  try:
    import gin
    value = gin.query_parameter(f"%{macro}")
  except (ImportError, ValueError):
    value = None
  if value is None and env:
    value = os.environ.get(env) or None
  return default if value is None else value


def superglue_dir() -> str | None:
  return setting("SUPERGLUE_DIR", "STMOE_SUPERGLUE_DIR")


def tfds_data_dir() -> str | None:
  return setting("TFDS_DATA_DIR", "TFDS_DATA_DIR")


def text_files() -> str | None:
  return setting("TEXT_FILES", "STMOE_TEXT_FILES")


def text_split_by() -> str:
  return setting("TEXT_SPLIT_BY", "STMOE_TEXT_SPLIT_BY", "line")


def text_validation_percent() -> int:
  return int(setting("TEXT_VALIDATION_PERCENT", None, 5))
