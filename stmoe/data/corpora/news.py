"""The Lee news corpus: 300 Australian news articles (Lee, Pincombe & Welsh 2005) shipped in gensim's test data.

`lee_background.cor` holds one article per line. We use it only as out-of-domain evaluation text for
models trained on the bundled Shakespeare (and Wikipedia) text, so it has a single 'validation' split.
"""

from __future__ import annotations

import functools
import os

from stmoe.data.corpora.fetch import DataUnavailableError
from stmoe.data.corpora.gensim_data import gensim_test_data_dir

LEE_FILE = "lee_background.cor"
NEWS_SPLITS = ("validation",)


@functools.lru_cache(maxsize=None)
def lee_news_articles() -> tuple[str, ...]:
  """The articles of lee_background.cor, whitespace-normalised, in file order."""
  path = os.path.join(gensim_test_data_dir(), LEE_FILE)
  if not os.path.exists(path):
    raise DataUnavailableError(f"{path} is missing from the gensim install; reinstall gensim "
                               "(`pip install --force-reinstall gensim`).")
  with open(path, encoding="utf-8", errors="replace") as f:
    return tuple(" ".join(line.split()) for line in f if line.strip())


def lee_news_documents(split: str) -> list[str]:
  """The news articles as documents; only the 'validation' split exists (evaluation text)."""
  if split not in NEWS_SPLITS:
    raise ValueError(f"the Lee news corpus is evaluation text: it only has a 'validation' split, not {split!r}.")
  return list(lee_news_articles())
