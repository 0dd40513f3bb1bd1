"""`stmoe vocab`: train a SentencePiece vocabulary with T5's special ids on the user's text files.

The training itself is `stmoe.data.vocab.train_vocabulary`; this module only parses flags, expands the
globs and reports. Select the result with the gin macro VOCABULARY_PATH or $STMOE_VOCABULARY_PATH.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

from stmoe.data.vocab import NUM_EXTRA_IDS, VocabularyError, train_vocabulary
from stmoe.errors import run_command


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="stmoe vocab", description="`stmoe vocab`: train a SentencePiece vocabulary with T5's special ids.")
  parser.add_argument("--input", action="append", required=True,
                      help="glob of text files, one sentence/document per line (repeatable)")
  parser.add_argument("--vocab_size", type=int, required=True,
                      help="number of pieces (the tasks add 100 extra ids on top)")
  parser.add_argument("--output", required=True, help="path of the .model file to write")
  parser.add_argument("--model_type", default="unigram", choices=["unigram", "bpe", "char", "word"])
  parser.add_argument("--character_coverage", type=float, default=1.0)
  parser.add_argument("--max_sentences", type=int, default=0,
                      help="train on a random sample of this many lines (0: all lines, deterministic)")
  parser.add_argument("--num_threads", type=int, default=1)
  return parser


def _main(argv: list[str]) -> int:
  """Trains on the sorted, deduplicated files matching the --input globs; exit status 1 on bad input."""
  args = _parser().parse_args(argv)
  files = sorted({f for pattern in args.input for f in glob.glob(os.path.expanduser(pattern))})
  if not files:
    print(f"stmoe vocab: no files match {args.input}", file=sys.stderr)
    return 1
  t0 = time.time()
  try:
    train_vocabulary(files, args.vocab_size, args.output, model_type=args.model_type,
                     character_coverage=args.character_coverage, num_threads=args.num_threads,
                     max_sentences=args.max_sentences)
  except (VocabularyError, RuntimeError) as e:  # RuntimeError: SentencePiece refusing its inputs
    print(f"stmoe vocab: {e}", file=sys.stderr)
    return 1
  print(f"wrote {args.output}: {args.vocab_size} pieces + {NUM_EXTRA_IDS} extra ids "
        f"(pad 0, eos 1, unk 2, no bos) from {len(files)} files in {time.time() - t0:.1f}s")
  return 0


def main(argv: list[str] | None = None) -> int:
  """`stmoe vocab --input GLOB --vocab_size N --output PATH.model [options]`."""
  return run_command("stmoe vocab", _main, list(argv or []))


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
