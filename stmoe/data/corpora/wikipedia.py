"""The Wikipedia corpus: gensim's real English Wikipedia export excerpt, markup removed, split by article.

Every 10th article (in file order) is validation, so no article is split across train and validation.
"""

from __future__ import annotations

import bz2
import functools
import os
import re

from stmoe.data.corpora.documents import group_paragraphs
from stmoe.data.corpora.gensim_data import WIKI_FILE, gensim_test_data_dir

MIN_PARAGRAPH_WORDS = 10  # shorter lines are captions, list items or leftovers of templates


def _clean_wiki_paragraph(line: str) -> str:
  """Removes the quote markup filter_wiki leaves and the space it leaves before punctuation."""
  line = re.sub(r"'{2,}", "", line)  # bold / italic quotes
  line = re.sub(r"\s+([,.;:])", r"\1", line)
  return re.sub(r"\s+", " ", line).strip()


@functools.lru_cache(maxsize=None)
def wikipedia_articles() -> tuple[tuple[str, str], ...]:
  """((title, prose), ...) for the real articles of the excerpt (redirects dropped), in file order.

  Markup is removed with gensim's `filter_wiki`; headings, lists, tables and lines of fewer than ten
  words are dropped, so what remains is running prose, one paragraph per line.
  """
  from gensim.corpora.wikicorpus import extract_pages, filter_wiki  # lazy: gensim import is slow

  path = os.path.join(gensim_test_data_dir(), WIKI_FILE)
  articles = []
  with bz2.open(path) as f:
    for title, text, _ in extract_pages(f, filter_namespaces=("0",)):
      if text.lstrip().upper().startswith("#REDIRECT"):
        continue
      paras = []
      for line in filter_wiki(text).splitlines():
        line = line.strip()
        if not line or line.startswith(("=", "*", "#", "|", "{", "!")):  # headings, lists, tables
          continue
        line = _clean_wiki_paragraph(line)
        if len(line.split()) >= MIN_PARAGRAPH_WORDS:
          paras.append(line)
      if paras:
        articles.append((title, "\n".join(paras)))
  return tuple(articles)


def wikipedia_split_articles(split: str) -> list[tuple[str, str]]:
  """Every 10th article (by file order) is validation, the rest train."""
  arts = wikipedia_articles()
  if split == "train":
    return [a for i, a in enumerate(arts) if i % 10 != 0]
  if split == "validation":
    return [a for i, a in enumerate(arts) if i % 10 == 0]
  raise ValueError(f"Unknown split {split!r} for the Wikipedia corpus; use 'train' or 'validation'.")


def wikipedia_documents(split: str) -> list[str]:
  """Pretraining documents: each article's paragraphs grouped into ~2000-character documents."""
  return [doc for _, prose in wikipedia_split_articles(split)
          for doc in group_paragraphs(prose.split("\n"))]
