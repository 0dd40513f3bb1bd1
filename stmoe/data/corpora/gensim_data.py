"""Where gensim's test data lives: the Wikipedia excerpt and the Rotten Tomatoes polarity sentences.

gensim is an install requirement of stmoe only for these two real, human-written files.
"""

from __future__ import annotations

import importlib.util
import os

from stmoe.data.corpora.fetch import DataUnavailableError

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
POLARITY_FILE = "pang_lee_polarity.cor"


def gensim_test_data_dir() -> str:
  """gensim's bundled test data directory, checked to hold both files we read from it."""
  spec = importlib.util.find_spec("gensim")
  if spec is None or not spec.submodule_search_locations:
    raise DataUnavailableError("gensim is not installed; the Wikipedia and Rotten Tomatoes corpora ship "
                               "with its test data: `pip install gensim`.")
  path = os.path.join(list(spec.submodule_search_locations)[0], "test", "test_data")
  for name in (WIKI_FILE, POLARITY_FILE):
    if not os.path.exists(os.path.join(path, name)):
      raise DataUnavailableError(f"{os.path.join(path, name)} is missing from the gensim install; "
                                 "reinstall gensim (`pip install --force-reinstall gensim`).")
  return path
