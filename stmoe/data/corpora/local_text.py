"""The user's own text files as documents (`text_span_corruption`, `text_prefix_lm`, `text_lm`).

Files have no split of their own, so each document is assigned to train or validation by a hash of its
text: stable across runs, processes and file order.
"""

from __future__ import annotations

import glob
import os
import re
import zlib

from stmoe.data.corpora.fetch import DataUnavailableError


def read_text_documents(pattern: str, split_by: str = "line") -> list[str]:
  """Documents from the files matching `pattern` (sorted): one per non-empty line, or per paragraph."""
  if split_by not in ("line", "paragraph"):
    raise ValueError(f"split_by must be 'line' or 'paragraph', got {split_by!r}.")
  files = sorted(glob.glob(os.path.expanduser(pattern)))
  if not files:
    raise DataUnavailableError(
        f"No text files match {pattern!r}. Bind the glob of your corpus in gin, e.g. "
        "`TEXT_FILES = '/data/my_corpus/*.txt'` (see docs/data.md).")
  docs = []
  for path in files:
    with open(path, encoding="utf-8", errors="replace") as f:
      text = f.read()
    if split_by == "line":
      docs += [line.strip() for line in text.splitlines() if line.strip()]
    else:
      docs += [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
  return docs


def split_of(doc: str, validation_percent: int) -> str:
  """Deterministic train/validation assignment of a document by a hash of its text."""
  return "validation" if zlib.crc32(doc.encode("utf-8")) % 100 < validation_percent else "train"
