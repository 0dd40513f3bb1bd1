"""The tasks that zero/few-shot priming evaluation can score: examples with candidate answers (no TensorFlow).

A priming task maps a split to `PrimingExample`s (a context, the candidate answers, the index of the right
one). `stmoe.evaluation.priming` builds the prompts, scores every candidate with the model and reports the
accuracy. Templates (the context; the scored text is `context + " " + candidate`, see docs/priming.md):

* `shakespeare_cloze` (stmoe.data.corpora.cloze): context = three consecutive spoken lines of a speech;
  candidates = the line that follows and three length-matched lines from elsewhere in the play.
* `shakespeare_genre`: "Passage: <80 words>\\nGenre:" -> "comedy" / "history" / "tragedy".
* `rotten_tomatoes_polarity` (validation only): "Review: <sentence>\\nSentiment:" -> "negative" / "positive".
  With no train split, demonstrations come from the same split, never the example itself.
* `super_glue_copa`: "<premise without its final period> because" (question "cause") or "... so"
  ("effect") -> the two choices with their first letter lower-cased (the sentence goes on).
* `super_glue_boolq`: "<passage>\\nquestion: <question>?\\nanswer:" -> "no" / "yes".
* `super_glue_cb`: "<premise>\\nquestion: <hypothesis>. true, false, or neither?\\nanswer:"
  -> "true" (entailment) / "false" (contradiction) / "neither" (neutral).
* `super_glue_rte`: "<premise>\\nquestion: <hypothesis> true or false?\\nanswer:" -> "true" (entailment) /
  "false" (not_entailment).

SuperGLUE records are read as the seqio tasks read them: the official JSONL under SUPERGLUE_DIR (gin) or
$STMOE_SUPERGLUE_DIR, else TFDS `super_glue/<task>` (which imports TensorFlow); missing data raises the
same `UserError` the seqio tasks raise, saying where to put it. Only train and validation are offered (the
test splits have no labels).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from stmoe.errors import UserError


@dataclasses.dataclass(frozen=True)
class PrimingExample:
  """One example: the context, the candidate answers, and the index of the right one in `candidates`."""

  context: str
  candidates: tuple[str, ...]
  label: int


@dataclasses.dataclass(frozen=True)
class PrimingTask:
  """A registered priming task: its splits, where its demonstrations come from, and its examples.

  demonstration_split: the split demonstrations are drawn from ("train"), or None for "the evaluated
  split itself" (a task with only a validation split); the example being scored is never one of them.
  """

  name: str
  splits: tuple[str, ...]
  demonstration_split: str | None
  examples: Callable[[str], list[PrimingExample]]


_TASKS: dict[str, PrimingTask] = {}


def register_priming_task(name: str, examples: Callable[[str], list[PrimingExample]], *,
                          splits: tuple[str, ...] = ("train", "validation"),
                          demonstration_split: str | None = "train") -> None:
  """Adds (or replaces) a priming task: `examples(split)` -> list of PrimingExample."""
  _TASKS[name] = PrimingTask(name, tuple(splits), demonstration_split, examples)


def priming_task_names() -> list[str]:
  """The registered priming tasks, sorted."""
  return sorted(_TASKS)


def priming_task(name: str) -> PrimingTask:
  """The task called `name`; an unknown name raises a UserError listing the known ones."""
  if name not in _TASKS:
    raise UserError(f"{name!r} is not a priming task (a task with candidate answers); use one of "
                    f"{', '.join(priming_task_names())}.")
  return _TASKS[name]


def priming_examples(task: str, split: str) -> list[PrimingExample]:
  """The examples of a task split, in the split's order; checked to have labels and distinct candidates."""
  spec = priming_task(task)
  if split not in spec.splits:
    raise UserError(f"priming task {task!r} has no split {split!r}; use one of {', '.join(spec.splits)}.")
  examples = spec.examples(split)
  if not examples:
    raise UserError(f"{task}/{split} has no examples.")
  if any(not 0 <= ex.label < len(ex.candidates) for ex in examples):
    raise UserError(f"{task}/{split} has examples without a label (a test split?): priming accuracy needs "
                    "labelled examples; use the validation split.")
  return examples


def demonstration_pool(task: str, split: str) -> tuple[list[PrimingExample], bool]:
  """(the examples demonstrations are drawn from, whether that is the evaluated split itself)."""
  spec = priming_task(task)
  source = spec.demonstration_split or split
  return priming_examples(task, source), source == split


# ----------------------------------------------------------------------------------------------------
# The bundled tasks


def _cloze(split: str) -> list[PrimingExample]:
  from stmoe.data.corpora.cloze import shakespeare_cloze_examples

  return [PrimingExample(e["context"], tuple(e["candidates"]), e["label"])
          for e in shakespeare_cloze_examples(split)]


def _genre(split: str) -> list[PrimingExample]:
  from stmoe.data.corpora.shakespeare import GENRES, shakespeare_genre_examples

  return [PrimingExample(f"Passage: {e['passage']}\nGenre:", GENRES, GENRES.index(e["genre"]))
          for e in shakespeare_genre_examples(split)]


def _polarity(split: str) -> list[PrimingExample]:
  from stmoe.data.corpora.polarity import rotten_tomatoes_examples

  labels = ("negative", "positive")
  return [PrimingExample(f"Review: {e['sentence']}\nSentiment:", labels, labels.index(e["label"]))
          for e in rotten_tomatoes_examples()]


# ----------------------------------------------------------------------------------------------------
# SuperGLUE


def superglue_records(task: str, split: str) -> list[dict]:
  """Raw records (TFDS `super_glue` field layout) of a SuperGLUE task split, from where the seqio tasks
  read them: SUPERGLUE_DIR's JSONL (pure Python), else TFDS (imports TensorFlow)."""
  from stmoe.data import settings, superglue

  data_dir = settings.superglue_dir()
  if data_dir:
    return list(superglue.read_jsonl_records(data_dir, task, split))
  from stmoe.data.sources import superglue_records as tfds_or_error  # TensorFlow only on this path

  return tfds_or_error(task, split)


def _sentence_end(text: str) -> str:
  return text.strip().rstrip(".!?").rstrip()


def copa_example(rec: dict) -> PrimingExample:
  """COPA: '<premise> because' / '<premise> so' -> the two choices, continuing the sentence."""
  joiner = {"cause": "because", "effect": "so"}[rec["question"]]
  choices = tuple(c.strip()[:1].lower() + c.strip()[1:] for c in (rec["choice1"], rec["choice2"]))
  return PrimingExample(f"{_sentence_end(rec['premise'])} {joiner}", choices, int(rec["label"]))


def boolq_example(rec: dict) -> PrimingExample:
  """BoolQ: passage, question, 'answer:' -> 'no' (False) / 'yes' (True)."""
  question = rec["question"].strip().rstrip("?")
  return PrimingExample(f"{rec['passage'].strip()}\nquestion: {question}?\nanswer:", ("no", "yes"),
                        int(rec["label"]))


def cb_example(rec: dict) -> PrimingExample:
  """CB: premise, hypothesis -> 'true' (entailment) / 'false' (contradiction) / 'neither' (neutral)."""
  return PrimingExample(f"{rec['premise'].strip()}\nquestion: {_sentence_end(rec['hypothesis'])}. true, false, "
                        "or neither?\nanswer:", ("true", "false", "neither"), int(rec["label"]))


def rte_example(rec: dict) -> PrimingExample:
  """RTE: premise, hypothesis -> 'true' (entailment) / 'false' (not_entailment)."""
  return PrimingExample(f"{rec['premise'].strip()}\nquestion: {rec['hypothesis'].strip()} true or false?\n"
                        "answer:", ("true", "false"), int(rec["label"]))


_SUPERGLUE_TEMPLATES: dict[str, Callable[[dict], PrimingExample]] = {
    "copa": copa_example, "boolq": boolq_example, "cb": cb_example, "rte": rte_example}


def _superglue(task: str) -> Callable[[str], list[PrimingExample]]:
  def examples(split: str) -> list[PrimingExample]:
    return [_SUPERGLUE_TEMPLATES[task](r) for r in superglue_records(task, split)]
  return examples


register_priming_task("shakespeare_cloze", _cloze)
register_priming_task("shakespeare_genre", _genre)
register_priming_task("rotten_tomatoes_polarity", _polarity, splits=("validation",), demonstration_split=None)
for _name in _SUPERGLUE_TEMPLATES:
  register_priming_task(f"super_glue_{_name}", _superglue(_name))
