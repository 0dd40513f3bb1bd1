"""SuperGLUE: reading the official JSONL distribution and T5's text-to-text format (pure Python).

Both sources end up as the same records, the field layout of TFDS `super_glue/*` (labels as class
indices, -1 for unlabelled test examples):
* the official distribution: a directory with per-task folders `BoolQ/`, `CB/`, `COPA/`, `MultiRC/`,
  `ReCoRD/`, `RTE/`, `WiC/`, `WSC/`, `AX-b/`, `AX-g/` of `train.jsonl`, `val.jsonl`, `test.jsonl`
  (`AX-b.jsonl`, `AX-g.jsonl` for the diagnostics), bound in gin as SUPERGLUE_DIR;
* TFDS `super_glue/<task>` (read in `stmoe.data.sources`, decoded to Python).

`format_example` turns a record into T5's text-to-text examples ({"inputs", "targets", ...}), the
format T5 used for its SuperGLUE results: the task name followed by "key: value" pairs, e.g.
"cb hypothesis: ... premise: ..." -> "entailment". The postprocessors turn decoded text back into
label indices (and MultiRC question groups / ReCoRD answer lists) for `superglue_metrics`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator

from stmoe.errors import UserError

# name -> (official folder, label classes or None for ReCoRD)
TASKS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "boolq": ("BoolQ", ("False", "True")),
    "cb": ("CB", ("entailment", "contradiction", "neutral")),
    "copa": ("COPA", ("choice1", "choice2")),
    "multirc": ("MultiRC", ("False", "True")),
    "record": ("ReCoRD", None),
    "rte": ("RTE", ("entailment", "not_entailment")),
    "wic": ("WiC", ("False", "True")),
    "wsc": ("WSC", ("False", "True")),
    "wsc.fixed": ("WSC", ("False", "True")),
    "axb": ("AX-b", ("entailment", "not_entailment")),
    "axg": ("AX-g", ("entailment", "not_entailment")),
}
DIAGNOSTICS = ("axb", "axg")  # test-only sets, evaluated with an RTE-trained model (T5 prefixes "rte")

# Text fields in the order T5 joins them: sorted keys, except MultiRC and WiC which name theirs.
_TEXT_FIELDS = {
    "boolq": ("passage", "question"),
    "cb": ("hypothesis", "premise"),
    "copa": ("choice1", "choice2", "premise", "question"),
    "multirc": ("question", "answer", "paragraph"),
    "rte": ("hypothesis", "premise"),
    "wic": ("sentence1", "sentence2", "word"),
    "axb": ("sentence1", "sentence2"),
    "axg": ("hypothesis", "premise"),
}
_SPLIT_FILES = {"train": "train.jsonl", "validation": "val.jsonl", "test": "test.jsonl"}


class SuperGlueDataError(UserError, FileNotFoundError):
  """The SuperGLUE data for a task/split is not where it was looked for; the message says where."""


def splits(task: str) -> tuple[str, ...]:
  return ("test",) if task in DIAGNOSTICS else ("train", "validation", "test")


def jsonl_path(data_dir: str, task: str, split: str) -> str:
  folder = TASKS[task][0]
  if task in DIAGNOSTICS:
    if split != "test":
      raise ValueError(f"{task} only has a 'test' split (the diagnostic set), not {split!r}.")
    return os.path.join(data_dir, folder, f"{folder}.jsonl")
  return os.path.join(data_dir, folder, _SPLIT_FILES[split])


def _label_index(task: str, label) -> int:
  if label is None:
    return -1
  if isinstance(label, bool):
    return int(label)
  if isinstance(label, int):
    return label
  return TASKS[task][1].index(label)


def read_jsonl_records(data_dir: str, task: str, split: str) -> Iterator[dict]:
  """Records of one task split from the official JSONL files, in TFDS `super_glue` field layout."""
  path = jsonl_path(data_dir, task, split)
  if not os.path.exists(path):
    raise SuperGlueDataError(
        f"SuperGLUE file {path} not found. SUPERGLUE_DIR must be the directory of the official "
        "distribution (https://super.gluebenchmark.com/tasks, 'combined.zip', unzipped) with folders "
        "BoolQ/, CB/, COPA/, MultiRC/, ReCoRD/, RTE/, WiC/, WSC/, AX-b/, AX-g/.")
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.strip():
        yield from _official_to_records(task, json.loads(line))


def _official_to_records(task: str, row: dict) -> Iterator[dict]:
  if task == "multirc":
    passage = row["passage"]
    for q in passage["questions"]:
      for a in q["answers"]:
        yield {"paragraph": passage["text"], "question": q["question"], "answer": a["text"],
               "idx": {"paragraph": row["idx"], "question": q["idx"], "answer": a["idx"]},
               "label": _label_index(task, a.get("label"))}
  elif task == "record":
    text = row["passage"]["text"]
    entities = sorted({text[e["start"]:e["end"] + 1] for e in row["passage"]["entities"]})
    for qa in row["qas"]:
      yield {"passage": text, "query": qa["query"], "entities": entities,
             "answers": sorted({a["text"] for a in qa.get("answers", [])}),
             "idx": {"passage": row["idx"], "query": qa["idx"]}}
  elif task in ("wsc", "wsc.fixed"):
    t = row["target"]
    rec = {"text": row["text"], "span1_index": t["span1_index"], "span2_index": t["span2_index"],
           "span1_text": t["span1_text"], "span2_text": t["span2_text"], "idx": row["idx"],
           "label": _label_index(task, row.get("label"))}
    yield fix_wsc_spans(rec) if task == "wsc.fixed" else rec
  else:
    rec = {k: row[k] for k in _TEXT_FIELDS[task] if k in row}
    if task == "copa":
      rec["question"] = row["question"]
    if task == "wic":
      rec.update({k: row[k] for k in ("start1", "end1", "start2", "end2") if k in row})
    rec["idx"] = row["idx"]
    rec["label"] = _label_index(task, row.get("label"))
    yield rec


def fix_wsc_spans(rec: dict) -> dict:
  """`wsc.fixed`: where a span index doesn't point at its text, move it to the nearest occurrence.

  Some official WSC rows index the wrong word; TFDS's wsc.fixed corrects them the same way in spirit.
  """
  words = rec["text"].split(" ")
  out = dict(rec)
  for key in ("span1", "span2"):
    span = rec[f"{key}_text"].split(" ")
    idx = rec[f"{key}_index"]
    def matches(i: int) -> bool:
      return [w.strip(".,;:!?\"'").lower() for w in words[i:i + len(span)]] == [
          w.strip(".,;:!?\"'").lower() for w in span]
    if not matches(idx):
      hits = [i for i in range(len(words)) if matches(i)]
      if hits:
        out[f"{key}_index"] = min(hits, key=lambda i: abs(i - idx))
  return out


# ----------------------------------------------------------------------------------------------------
# T5 text-to-text format


def _join(*parts: str) -> str:
  return re.sub(r" +", " ", " ".join(p for p in parts)).strip()


def _label_text(task: str, label: int) -> str:
  return "<unk>" if label < 0 else TASKS[task][1][label]


def _mark_span(text: str, span: str, index: int, mark: str) -> str:
  """Surrounds `span` with `mark` if it starts at whitespace-separated word `index` (else unchanged).

  Matching the span as a prefix of the text after `index` words keeps trailing punctuation outside the
  marks ("# himself #,"), as T5's WSC format does.
  """
  pattern = r"^((?:\S+\s){%d})(%s)" % (index, re.escape(span))
  return re.sub(pattern, lambda m: f"{m.group(1)}{mark} {m.group(2)} {mark}", text, count=1)


def _record_passage(passage: str) -> str:
  # The "@highlight" bullet lines become sentences.
  passage = re.sub(r"([.?!\"'])\n@highlight\n", r"\1 ", passage)
  return re.sub(r"\n@highlight\n", ". ", passage)


def format_example(task: str, rec: dict, split: str) -> list[dict]:
  """T5 text-to-text examples of one record: {"inputs", "targets", "idx", ...} (ReCoRD train: one per answer).

  Extra keys the metrics need: MultiRC "group" (the question's global id), ReCoRD "answers".
  """
  if task == "record":
    inputs = _join("record query:", rec["query"], "entities:", ", ".join(rec["entities"]),
                   "passage:", _record_passage(rec["passage"]))
    answers = list(rec["answers"])
    idx = rec["idx"]["passage"] * 1000 + rec["idx"]["query"]
    if split == "train" and answers:
      return [{"inputs": inputs, "targets": a, "idx": idx, "answers": answers} for a in answers]
    return [{"inputs": inputs, "targets": answers[0] if answers else "<unk>", "idx": idx,
             "answers": answers}]
  if task in ("wsc", "wsc.fixed"):
    text = _mark_span(rec["text"], rec["span1_text"], rec["span1_index"], "*")
    i2 = rec["span2_index"] + (2 if rec["span1_index"] < rec["span2_index"] else 0)  # two marks added
    text = _mark_span(text, rec["span2_text"], i2, "#")
    return [{"inputs": _join("wsc text:", text), "targets": _label_text(task, rec["label"]),
             "idx": rec["idx"]}]
  fields = dict(rec)
  if task == "multirc":
    fields["paragraph"] = re.sub(r"<(/)?b>", "", re.sub(r"<br>", " ", fields["paragraph"]))
  prefix = "rte" if task in DIAGNOSTICS else task
  parts = [prefix]
  for key in _TEXT_FIELDS[task]:
    parts += [f"{key}:", str(fields[key])]
  ex = {"inputs": _join(*parts), "targets": _label_text(task, rec["label"])}
  if task == "multirc":
    ex["idx"] = rec["idx"]["answer"]
    ex["group"] = rec["idx"]["paragraph"] * 1000 + rec["idx"]["question"]
  else:
    ex["idx"] = rec["idx"]
  return [ex]


# ----------------------------------------------------------------------------------------------------
# Postprocessors (decoded text -> what the metrics compare)


def label_postprocessor(task: str):
  """Decoded class name -> class index; anything else -> -1 (always counted wrong)."""
  classes = TASKS[task][1]

  def postprocess(output: str, example: dict | None = None, is_target: bool = False):
    del is_target
    text = output.strip()
    index = classes.index(text) if text in classes else -1
    if task == "multirc":
      return {"group": int(example["group"]) if example is not None else -1, "value": index}
    return index

  return postprocess


def record_postprocessor(output: str, example: dict | None = None, is_target: bool = False):
  """ReCoRD: a target becomes the list of all correct answers; a prediction stays its text."""
  if is_target and example is not None:
    return [_as_str(a) for a in example["answers"]]
  return output.strip()


def _as_str(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)
