"""Fine-tuning / evaluation tasks on the bundled real data: shakespeare_genre, rotten_tomatoes_polarity,
shakespeare_cloze (its seqio form: context in, next line out; its candidates are scored by stmoe eval
--num_shots, see docs/priming.md)."""

from __future__ import annotations

import seqio

from stmoe.data import sources, superglue_metrics
from stmoe.data.corpora import cloze, polarity, shakespeare
from stmoe.data.seqio_vocab import output_features


def label_postprocessor(labels: tuple[str, ...]):
  """Decoded text -> label index (-1 when the text is no label: always counted wrong)."""
  def postprocess(output: str, example=None, is_target: bool = False) -> int:
    del example, is_target
    text = output.strip()
    return labels.index(text) if text in labels else -1
  return postprocess


def _genre_columns(split: str) -> dict[str, list]:
  ex = shakespeare.shakespeare_genre_examples(split)
  return {"inputs": [f"genre passage: {e['passage']}" for e in ex], "targets": [e["genre"] for e in ex],
          "play": [e["play"] for e in ex]}


def _polarity_columns(split: str) -> dict[str, list]:
  if split != "validation":
    raise ValueError("rotten_tomatoes_polarity is an evaluation set: it only has a 'validation' split.")
  ex = polarity.rotten_tomatoes_examples()
  # T5's SST-2 format (the sentences come from the same Rotten Tomatoes source as SST-2), so a model
  # fine-tuned on glue_sst2 can be evaluated on it directly.
  return {"inputs": [f"sst2 sentence: {e['sentence']}" for e in ex], "targets": [e["label"] for e in ex]}


def _cloze_columns(split: str) -> dict[str, list]:
  # Generation form of the cloze task (the priming evaluation scores its candidates instead: stmoe eval
  # --num_shots, docs/priming.md): the three context lines in, the true next line out.
  ex = cloze.shakespeare_cloze_examples(split)
  return {"inputs": [f"cloze context: {e['context']}" for e in ex], "targets": [e["answer"] for e in ex],
          "play": [e["play"] for e in ex]}


if "shakespeare_cloze" not in seqio.TaskRegistry.names():
  seqio.TaskRegistry.add(
      "shakespeare_cloze",
      source=sources.columns_source(_cloze_columns, ("train", "validation")),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
      output_features=output_features())


if "shakespeare_genre" not in seqio.TaskRegistry.names():
  seqio.TaskRegistry.add(
      "shakespeare_genre",
      source=sources.columns_source(_genre_columns, ("train", "validation")),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
      output_features=output_features(),
      postprocess_fn=label_postprocessor(shakespeare.GENRES),
      metric_fns=[superglue_metrics.accuracy])
  seqio.TaskRegistry.add(
      "rotten_tomatoes_polarity",
      source=sources.columns_source(_polarity_columns, ("validation",)),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
      output_features=output_features(),
      postprocess_fn=label_postprocessor(("negative", "positive")),
      metric_fns=[superglue_metrics.accuracy])
