"""Pretraining tasks: span corruption, prefix LM and causal LM over the bundled corpora, text, C4."""

from __future__ import annotations

import functools

import seqio

from stmoe.data import preprocessors, settings, sources
from stmoe.data.corpora import local_text
from stmoe.data.corpora.fetch import DataUnavailableError
from stmoe.data.corpora.news import NEWS_SPLITS, lee_news_documents
from stmoe.data.corpora.shakespeare import shakespeare_documents
from stmoe.data.corpora.wikipedia import wikipedia_documents
from stmoe.data.seqio_vocab import output_features

C4_TFDS_NAME = "c4/en:3.1.0"


def _text_documents(split: str) -> list[str]:
  pattern = settings.text_files()
  if not pattern:
    raise DataUnavailableError(
        "text_span_corruption / text_prefix_lm / text_lm read local text files: bind their glob in gin, "
        "e.g. `TEXT_FILES = '/data/corpus/*.txt'` (and TEXT_SPLIT_BY = 'paragraph' for blank-line "
        "separated documents), or export STMOE_TEXT_FILES.")
  docs = local_text.read_text_documents(pattern, settings.text_split_by())
  percent = settings.text_validation_percent()
  return [d for d in docs if local_text.split_of(d, percent) == split]


SOURCES = {
    "shakespeare": lambda: sources.text_source(shakespeare_documents, ("train", "validation")),
    "wikipedia": lambda: sources.text_source(wikipedia_documents, ("train", "validation")),
    # Out-of-domain evaluation text only (a 'validation' split): lee_news_lm etc.
    "lee_news": lambda: sources.text_source(lee_news_documents, NEWS_SPLITS),
    "text": lambda: sources.text_source(_text_documents, ("train", "validation")),
    "c4": lambda: sources.CheckedTfdsDataSource(C4_TFDS_NAME, splits=("train", "validation")),
}

_TOKENIZE = [
    functools.partial(seqio.preprocessors.rekey, key_map={"inputs": None, "targets": "text"}),
    seqio.preprocessors.tokenize,
]


# (task suffix, objective preprocessor, whether the examples have an "inputs" feature)
_OBJECTIVES = (
    ("span_corruption", preprocessors.span_corruption, True),
    ("prefix_lm", preprocessors.prefix_lm, True),
    ("lm", preprocessors.causal_lm, False),
)


def register(corpus: str) -> None:
  """Registers {corpus}_span_corruption, {corpus}_prefix_lm and {corpus}_lm."""
  for suffix, objective, with_inputs in _OBJECTIVES:
    seqio.TaskRegistry.add(
        f"{corpus}_{suffix}",
        source=SOURCES[corpus](),
        preprocessors=_TOKENIZE + [objective, seqio.preprocessors.append_eos_after_trim],
        output_features=output_features(with_inputs=with_inputs),
        metric_fns=[])


for _corpus in SOURCES:
  if f"{_corpus}_span_corruption" not in seqio.TaskRegistry.names():
    register(_corpus)
