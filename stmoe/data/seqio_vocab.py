"""The seqio vocabulary of every stmoe task, resolved when first used (imports seqio/TensorFlow).

Tasks are registered at import time, before gin binds VOCABULARY_PATH; this vocabulary looks the path
up (`stmoe.data.vocab.resolve_vocabulary_path`, which refuses non-T5 special ids) each time its model
is needed, and reloads if the selection changed.
"""

from __future__ import annotations

import seqio

from stmoe.data import vocab


class ConfiguredVocabulary(seqio.SentencePieceVocabulary):
  """A SentencePieceVocabulary (100 extra ids) whose model file is chosen by VOCABULARY_PATH."""

  def __init__(self, extra_ids: int = vocab.NUM_EXTRA_IDS):
    super().__init__("", extra_ids=extra_ids)

  def _model_context(self):
    path = vocab.resolve_vocabulary_path()
    if path != self._sentencepiece_model_file:
      self._model = None
      self._sentencepiece_model_file = path
    return super()._model_context()

  @property
  def sentencepiece_model_file(self) -> str:
    self._model_context()
    return self._sentencepiece_model_file

  def __eq__(self, other):
    return isinstance(other, ConfiguredVocabulary) and other.extra_ids == self.extra_ids

  def __hash__(self):
    return hash(("ConfiguredVocabulary", self.extra_ids))


_VOCABULARY = None


def get_vocabulary() -> ConfiguredVocabulary:
  """The shared vocabulary instance of all stmoe tasks."""
  global _VOCABULARY
  if _VOCABULARY is None:
    _VOCABULARY = ConfiguredVocabulary()
  return _VOCABULARY


def output_features(with_inputs: bool = True) -> dict[str, seqio.Feature]:
  feats = {"targets": seqio.Feature(get_vocabulary(), add_eos=True)}
  if with_inputs:
    feats = {"inputs": seqio.Feature(get_vocabulary(), add_eos=True), **feats}
  return feats
