"""Cutting running text into paragraphs and pretraining documents (shared by the bundled corpora).

A pretraining document is a run of consecutive paragraphs of about DOCUMENT_CHARS characters: long
enough for span corruption at the usual lengths, short enough that a split has many documents.
"""

from __future__ import annotations

import re

DOCUMENT_CHARS = 2000  # pretraining documents: consecutive paragraphs up to about this many characters


def paragraphs(text: str) -> list[str]:
  """Blank-line separated paragraphs, each with its lines joined by single spaces."""
  out = []
  for block in re.split(r"\n\s*\n", text):
    joined = " ".join(line.strip() for line in block.splitlines() if line.strip())
    if joined:
      out.append(joined)
  return out


def group_paragraphs(paras: list[str], max_chars: int = DOCUMENT_CHARS) -> list[str]:
  """Consecutive paragraphs joined (by newlines) into documents of at most ~max_chars characters."""
  docs, cur, size = [], [], 0
  for p in paras:
    if cur and size + len(p) > max_chars:
      docs.append("\n".join(cur))
      cur, size = [], 0
    cur.append(p)
    size += len(p) + 1
  if cur:
    docs.append("\n".join(cur))
  return docs
