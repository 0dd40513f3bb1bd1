"""How big each bundled split is: examples and characters per corpus and split (`stmoe data` prints them).

Computing them reads every corpus, so this doubles as the check that all bundled data is usable.
"""

from __future__ import annotations

import dataclasses

from stmoe.data.corpora.cloze import shakespeare_cloze_examples
from stmoe.data.corpora.news import lee_news_documents
from stmoe.data.corpora.polarity import rotten_tomatoes_examples
from stmoe.data.corpora.shakespeare import SPLITS, shakespeare_documents, shakespeare_genre_examples
from stmoe.data.corpora.wikipedia import wikipedia_documents


@dataclasses.dataclass
class SplitSize:
  """One split of one bundled corpus: what it counts as an example, and how much text it holds."""

  corpus: str
  split: str
  examples: int
  chars: int


def split_sizes() -> list[SplitSize]:
  """Number of examples (documents / passages / sentences) and characters per bundled split."""
  sizes = []
  for split in SPLITS:
    docs = shakespeare_documents(split)
    sizes.append(SplitSize("shakespeare (pretraining documents)", split, len(docs), sum(map(len, docs))))
  for split in SPLITS:
    docs = wikipedia_documents(split)
    sizes.append(SplitSize("wikipedia (pretraining documents)", split, len(docs), sum(map(len, docs))))
  for split in SPLITS:
    ex = shakespeare_genre_examples(split)
    sizes.append(SplitSize("shakespeare_genre (80-word passages)", split, len(ex),
                           sum(len(e["passage"]) for e in ex)))
  for split in SPLITS:
    ex = shakespeare_cloze_examples(split)
    sizes.append(SplitSize("shakespeare_cloze (3-line contexts, 4 candidate lines)", split, len(ex),
                           sum(len(e["context"]) + sum(map(len, e["candidates"])) for e in ex)))
  docs = lee_news_documents("validation")
  sizes.append(SplitSize("lee_news (news articles, evaluation only)", "validation", len(docs), sum(map(len, docs))))
  ex = rotten_tomatoes_examples()
  sizes.append(SplitSize("rotten_tomatoes_polarity (sentences)", "validation", len(ex),
                         sum(len(e["sentence"]) for e in ex)))
  return sizes
