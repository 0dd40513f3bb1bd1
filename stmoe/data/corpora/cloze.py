"""`shakespeare_cloze`: which line comes next? A 4-way cloze task built from the bundled plays (pure Python).

Each example is three consecutive spoken lines of one speech (the context), the line that really follows
them in that speech, and three distractor lines drawn from elsewhere in the same play, in the style of
HellaSwag's endings. The validation split is built from the six held-out plays
(`shakespeare.VALIDATION_PLAYS`) and the train split from the other plays, so a model pretrained on the
train split of the Shakespeare corpus has never seen a validation example. Chance is 25 %.

How a play becomes spoken lines (the layout of `shksprdata/texts/*_gut.txt`): everything before the first
"ACT" / "SCENE" / "INDUCTION" / "PROLOGUE" heading (title block, list of persons) is skipped; the rest is
cut into blank-line separated blocks, and a block is a speech when its first line is a speaker name (a
short line ending in "." such as "HAMLET." or "Hor.", or a name in capitals such as "THESEUS"). The
speech's other lines are its spoken lines. A stage direction ("[Exit.]", possibly over several lines), a
line with a bracket in it, a line in capitals, a line of fewer than MIN_WORDS words or more than
MAX_CHARS characters ends the run of usable lines, so every context and answer is verse or prose the
character speaks, and the answer always directly follows the context in the text.

Examples are non-overlapping windows of WINDOW = CONTEXT_LINES + 1 usable lines of one speech. Distractors:
lines of the same play at least MIN_DISTANCE usable lines away from the answer, with a character length
within ±LENGTH_TOLERANCE of the true line's (widened to ±2x, then to any length, if a play had too few),
distinct from each other and from the true line; matching lengths limits the length bias of a summed
log-likelihood. The candidates are shuffled, so the label (the true line's index) is uniform over 0..3.
Everything is drawn with `numpy.random.default_rng((CLOZE_SEED, split index, window index))`, and a split
holding more windows than its cap (MAX_EXAMPLES) keeps a uniformly random subset of them in text order
(drawn with `default_rng((CLOZE_SEED, split index))`): the same examples on every machine.
"""

from __future__ import annotations

import functools
import re

import numpy as np

from stmoe.data.corpora.shakespeare import FIRST_FOLIO_GENRE, NOT_IN_FIRST_FOLIO, SPLITS, shakespeare_split_works
from stmoe.data.corpora.shakespeare_texts import shakespeare_works

CONTEXT_LINES = 3
WINDOW = CONTEXT_LINES + 1
NUM_CANDIDATES = 4
MIN_WORDS = 4  # shorter lines ("O!", "Good night.") say too little to tell apart
MAX_CHARS = 100  # prose "lines" in a few editions run on; keep lines a verse line long
MIN_DISTANCE = 20  # distractors come from at least this many usable lines away from the example
LENGTH_TOLERANCE = 0.2  # distractor length within ±20 % of the true line's (in characters)
MAX_EXAMPLES = {"train": 4000, "validation": 400}
CLOZE_SEED = 1623  # the First Folio's year

_HEADING = re.compile(r"^\s*(ACT|Act|SCENE|Scene|INDUCTION|Induction|PROLOGUE|Prologue)\b", re.MULTILINE)
_SPEAKER = re.compile(r"^[A-Z][A-Za-z'&,\- ]{0,40}$")


def _is_speaker(line: str) -> bool:
  """A speaker-name line of at most 4 words: 'HAMLET.', 'FIRST WITCH.', 'Hor.', or in capitals without the
  period ('THESEUS', as A Midsummer Night's Dream has them)."""
  name = line[:-1] if line.endswith(".") else line
  if not _SPEAKER.match(name) or len(name.split()) > 4:
    return False
  return line.endswith(".") or name.isupper()


def spoken_lines(text: str) -> list[list[str | None]]:
  """The speeches of a play as lists of lines; None marks a line that breaks a run (see module doc)."""
  start = _HEADING.search(text)
  body = text[start.start():] if start else text
  speeches = []
  for block in re.split(r"\n\s*\n", body):
    lines = [line.strip() for line in block.strip("\n").splitlines()]
    if len(lines) < 2 or not _is_speaker(lines[0]):
      continue
    out: list[str | None] = []
    depth = 0  # inside a [stage direction] that spans lines
    for line in lines[1:]:
      if depth or "[" in line or "]" in line:
        depth = max(0, depth + line.count("[") - line.count("]"))
        out.append(None)
      elif len(line.split()) < MIN_WORDS or len(line) > MAX_CHARS or line.isupper():
        out.append(None)
      else:
        out.append(" ".join(line.split()))
    speeches.append(out)
  return speeches


def _windows(speeches: list[list[str | None]]) -> list[tuple[list[str], int]]:
  """Non-overlapping runs of WINDOW usable lines: ([context..., answer], index of the answer in the play's
  usable lines)."""
  out, position = [], 0
  for speech in speeches:
    run: list[str] = []
    for line in speech:
      if line is None:
        run = []
        continue
      run.append(line)
      position += 1
      if len(run) == WINDOW:
        out.append((run, position - 1))
        run = []
  return out


def _usable(speeches: list[list[str | None]]) -> list[str]:
  return [line for speech in speeches for line in speech if line is not None]


def _distractors(pool: list[str], answer_pos: int, answer: str, rng: np.random.Generator) -> list[str]:
  """NUM_CANDIDATES - 1 distinct lines of `pool` far from answer_pos, with a length close to the answer's."""
  far = [i for i in range(len(pool)) if abs(i - answer_pos) >= MIN_DISTANCE]
  chosen: list[str] = []
  seen = {answer.lower()}
  for tolerance in (LENGTH_TOLERANCE, 2 * LENGTH_TOLERANCE, None):
    lo, hi = len(answer) * (1 - (tolerance or 0)), len(answer) * (1 + (tolerance or 0))
    candidates = [i for i in far if tolerance is None or lo <= len(pool[i]) <= hi]
    for i in rng.permutation(len(candidates)):
      line = pool[candidates[int(i)]]
      if line.lower() not in seen:
        seen.add(line.lower())
        chosen.append(line)
      if len(chosen) == NUM_CANDIDATES - 1:
        return chosen
  raise ValueError(f"a play has too few lines for {NUM_CANDIDATES - 1} distractors")


def cloze_plays(split: str) -> list[str]:
  """The plays of a split that the cloze task uses (the split's works minus the poems)."""
  plays = set(FIRST_FOLIO_GENRE) | set(NOT_IN_FIRST_FOLIO)
  return [w for w in shakespeare_split_works(split) if w in plays]


@functools.lru_cache(maxsize=None)
def shakespeare_cloze_examples(split: str) -> tuple[dict, ...]:
  """({'context', 'candidates', 'label', 'answer', 'play'}, ...) of a split, in play and text order.

  'context' is the three lines joined by single spaces (how the pretraining documents join the lines of a
  speech), 'candidates' a tuple of four lines, 'label' the index of 'answer' (the true next line).
  """
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r} for shakespeare_cloze; use 'train' or 'validation'.")
  works = shakespeare_works()
  windows = []  # (play, lines, answer position, usable lines of the play)
  for play in cloze_plays(split):
    speeches = spoken_lines(works[play])
    pool = _usable(speeches)
    windows += [(play, lines, pos, pool) for lines, pos in _windows(speeches)]
  split_index = SPLITS.index(split)
  keep = range(len(windows))
  if len(windows) > MAX_EXAMPLES[split]:
    pick = np.random.default_rng((CLOZE_SEED, split_index)).choice(len(windows), MAX_EXAMPLES[split],
                                                                   replace=False)
    keep = sorted(int(i) for i in pick)
  out = []
  for i in keep:
    play, lines, pos, pool = windows[i]
    rng = np.random.default_rng((CLOZE_SEED, split_index, i))
    answer = lines[-1]
    options = [answer] + _distractors(pool, pos, answer, rng)
    order = rng.permutation(NUM_CANDIDATES)
    candidates = tuple(options[int(j)] for j in order)
    out.append({"context": " ".join(lines[:-1]), "candidates": candidates,
                "label": int(np.flatnonzero(order == 0)[0]), "answer": answer, "play": play})
  return tuple(out)
