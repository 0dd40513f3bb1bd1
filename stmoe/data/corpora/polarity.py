"""The Rotten Tomatoes polarity sentences of Pang & Lee (200, shipped in gensim's test data).

An evaluation set only (`rotten_tomatoes_polarity`): too small to train on, and from the same source as
SST-2, so a model fine-tuned on glue_sst2 can be evaluated on it directly.
"""

from __future__ import annotations

import functools
import os

from stmoe.data.corpora.fetch import DataUnavailableError
from stmoe.data.corpora.gensim_data import POLARITY_FILE, gensim_test_data_dir

_LABELS = {"__label__pos": "positive", "__label__neg": "negative"}


@functools.lru_cache(maxsize=None)
def rotten_tomatoes_examples() -> tuple[dict[str, str], ...]:
  """The 200 sentences of `pang_lee_polarity.cor`: lines '__label__pos|neg <lower-cased sentence>'."""
  path = os.path.join(gensim_test_data_dir(), POLARITY_FILE)
  out = []
  with open(path, encoding="cp1252") as f:  # the file is Windows-1252 (e.g. 0x97 is an em dash)
    for line in f:
      line = line.strip()
      if not line:
        continue
      label, _, sentence = line.partition(" ")
      if label not in _LABELS:
        raise DataUnavailableError(f"Unexpected label {label!r} in {path}.")
      out.append({"sentence": sentence.strip(), "label": _LABELS[label]})
  return tuple(out)
