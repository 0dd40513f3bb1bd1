"""`stmoe data`: fetch and check the bundled real corpora, print their split sizes, optionally the vocab.

Nothing needs this command (whatever uses the data fetches it on first use); it is the way to fetch
everything up front, e.g. while the package registry is reachable, and to see what the corpora hold.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

from stmoe.data import vocab
from stmoe.data.corpora.fetch import DataUnavailableError
from stmoe.data.corpora.gensim_data import gensim_test_data_dir
from stmoe.data.corpora.shakespeare_texts import NUM_SHAKESPEARE_WORKS, shakespeare_texts_dir
from stmoe.data.corpora.sizes import split_sizes
from stmoe.errors import run_command

DESCRIPTION = "fetch the Shakespeare texts, check gensim's data, optionally train the vocabulary"


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="stmoe data", description=f"`stmoe data`: {DESCRIPTION}.")
  parser.add_argument("--vocab", action="store_true",
                      help="also train (or find in the cache) the default bundled SentencePiece vocabulary")
  return parser


def _main(argv: list[str]) -> int:
  """Fetches / locates the raw files, then reads every corpus (printing its sizes) as the check."""
  args = _parser().parse_args(argv)
  t0 = time.time()
  try:
    texts = shakespeare_texts_dir()
    gensim_dir = gensim_test_data_dir()
  except DataUnavailableError as e:  # exit status 1, as `stmoe data` always had for missing data
    print(f"stmoe data: {e}", file=sys.stderr)
    return 1
  total = sum(os.path.getsize(p) for p in glob.glob(os.path.join(texts, "*_gut.txt")))
  print(f"shakespeare texts: {texts} ({NUM_SHAKESPEARE_WORKS} works, {total:,} bytes) "
        f"[{time.time() - t0:.1f}s]")
  print(f"gensim test data:  {gensim_dir}")
  for s in split_sizes():
    print(f"  {s.corpus:40s} {s.split:10s} {s.examples:7,d} examples {s.chars:11,d} chars")
  if args.vocab:
    t1 = time.time()
    path = vocab.default_vocabulary_path()
    print(f"bundled vocabulary: {path} [{time.time() - t1:.1f}s]")
  return 0


def main(argv: list[str] | None = None) -> int:
  """`stmoe data [--vocab]`; other user errors print one line and exit 2 (see stmoe.errors)."""
  return run_command("stmoe data", _main, list(argv or []))


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
