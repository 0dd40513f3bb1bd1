"""SentencePiece vocabularies with T5's special ids: training, validation, selection (no TensorFlow).

Our models use T5's id conventions: pad 0, eos 1, unk 2, no bos, and 100 extra ids ("<extra_id_0>" ..
"<extra_id_99>") appended at the TOP of the vocabulary in descending order (extra_id_0 is the last id);
span corruption uses them as sentinels. A SentencePiece model with different special ids would silently
scramble padding and end-of-sequence, so `check_special_ids` refuses it with a message.

Which vocabulary the tasks use, first match wins:
1. `set_vocabulary_path(path)` from Python;
2. the gin macro `VOCABULARY_PATH = "/path/to/spm.model"` (e.g. T5's cc_all.32000 if you have it);
3. the environment variable `STMOE_VOCABULARY_PATH`;
4. the default bundled vocabulary: 8,000 pieces trained on the train splits of the bundled Shakespeare
   and Wikipedia corpora, trained once on demand (~10-30 s) and cached in $STMOE_CACHE_DIR (~/.cache/stmoe).

`stmoe vocab --input GLOB --vocab_size N --output PATH.model` (`stmoe.cli.vocab`) trains a vocabulary on
your own text with `train_vocabulary`. The special ids themselves are defined once, in `stmoe.special_ids`.
"""

from __future__ import annotations

import os
import tempfile

from stmoe.data.corpora.fetch import cache_dir
from stmoe.data.corpora.shakespeare import shakespeare_documents
from stmoe.data.corpora.wikipedia import wikipedia_documents
from stmoe.errors import UserError
from stmoe.special_ids import EOS_ID, NUM_EXTRA_IDS, PAD_ID, UNK_ID

DEFAULT_BUNDLED_VOCAB_SIZE = 8000  # + 100 extra ids = 8,100 ids: a model needs vocab_size >= 8100
_BUNDLED_VOCAB_VERSION = "v1"  # bump when the recipe below changes: a new cache file is trained

_explicit_path: str | None = None


class VocabularyError(UserError):
  """A vocabulary file that is missing, unreadable or has ids our models can't use."""


def set_vocabulary_path(path: str | None) -> None:
  """Selects the vocabulary of all stmoe tasks from Python (None: back to gin / env / bundled)."""
  global _explicit_path
  _explicit_path = path


def resolve_vocabulary_path() -> str:
  """The path of the SentencePiece model the tasks use (see the module docstring for the order)."""
  from stmoe.data.settings import setting

  path = _explicit_path or setting("VOCABULARY_PATH", "STMOE_VOCABULARY_PATH")
  if path:
    check_special_ids(path)
    return path
  return default_vocabulary_path()


def _load_processor(path: str):
  import sentencepiece as spm

  if not os.path.exists(path):
    raise VocabularyError(
        f"Vocabulary file {path!r} does not exist. Point VOCABULARY_PATH (gin) or STMOE_VOCABULARY_PATH "
        "at a SentencePiece .model file, train one with `stmoe vocab --input 'corpus/*.txt' "
        "--vocab_size 32000 --output my.model`, or leave it unset to use the bundled vocabulary.")
  sp = spm.SentencePieceProcessor()
  try:
    sp.Load(path)
  except (OSError, RuntimeError) as e:
    raise VocabularyError(f"{path!r} is not a readable SentencePiece model ({e}).") from e
  return sp


_checked: dict[tuple[str, float], int] = {}


def check_special_ids(path: str) -> int:
  """Refuses a SentencePiece model whose special ids differ from T5's; returns its number of pieces.

  T5 / stmoe: pad 0, eos 1, unk 2 and no bos. Models trained with SentencePiece's defaults (unk 0,
  bos 1, eos 2, no pad) are the common mistake this catches.
  """
  key = (path, os.path.getmtime(path) if os.path.exists(path) else -1.0)
  if key in _checked:
    return _checked[key]
  sp = _load_processor(path)
  got = {"pad": sp.pad_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "bos": sp.bos_id()}
  want = {"pad": PAD_ID, "eos": EOS_ID, "unk": UNK_ID, "bos": -1}
  if got != want:
    diff = ", ".join(f"{k} id {got[k]} (need {want[k]})" for k in want if got[k] != want[k])
    raise VocabularyError(
        f"Vocabulary {path!r} has special ids our models can't use: {diff}. stmoe needs T5's ids "
        "(pad 0, eos 1, unk 2, no bos; bos -1 means none). Retrain it with `stmoe vocab` (which sets "
        "them) or with SentencePiece options --pad_id=0 --eos_id=1 --unk_id=2 --bos_id=-1.")
  _checked[key] = sp.get_piece_size()
  return _checked[key]


def vocabulary_size(path: str, extra_ids: int = NUM_EXTRA_IDS) -> int:
  """Number of ids the tasks produce with this model: its pieces plus the extra ids (sentinels)."""
  return check_special_ids(path) + extra_ids


def check_vocab_matches_model(vocab_size: int, model_vocab_size: int) -> None:
  """Raises unless a model's embedding table covers every id of the vocabulary (incl. extra ids).

  `vocab_size` is the vocabulary's size with its extra ids (seqio's `vocabulary.vocab_size`).
  Padding the model's table to a multiple of 128 (T5: 32100 ids, 32128 rows) is fine.
  """
  if model_vocab_size < vocab_size:
    raise VocabularyError(
        f"the data's vocabulary has {vocab_size} ids (including {NUM_EXTRA_IDS} sentinel extra ids at the top) "
        f"but the model's VOCAB_SIZE (ModelConfig.vocab_size) is {model_vocab_size}: ids >= {model_vocab_size} "
        f"would index past the embedding table. Set ModelConfig.vocab_size >= {vocab_size} (e.g. "
        f"{-(-vocab_size // 128) * 128}) with --gin.VOCAB_SIZE={-(-vocab_size // 128) * 128}, or use a "
        "smaller vocabulary.")


def train_vocabulary(input_files: list[str], vocab_size: int, output: str, *,
                     model_type: str = "unigram", character_coverage: float = 1.0,
                     num_threads: int = 1, max_sentences: int = 0) -> str:
  """Trains a SentencePiece model with T5's special ids; writes `output` (a .model path); returns it.

  Each input line is one sentence. Deterministic for the same inputs and settings when all sentences
  are used (max_sentences=0, the default) and the thread count is fixed; for large corpora set
  `max_sentences` (e.g. 10_000_000) to train on a random sample of that many lines.
  """
  import sentencepiece as spm

  if not input_files:
    raise VocabularyError("No input files to train a vocabulary on.")
  if not output.endswith(".model"):
    raise VocabularyError(f"--output must end in .model, got {output!r}.")
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  prefix = output[: -len(".model")]
  spm.SentencePieceTrainer.train(
      input=",".join(input_files), model_prefix=prefix, vocab_size=vocab_size, model_type=model_type,
      character_coverage=character_coverage, pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
      input_sentence_size=max_sentences, shuffle_input_sentence=max_sentences > 0,
      num_threads=num_threads,
      max_sentence_length=16384, minloglevel=2)
  check_special_ids(output)
  return output


def _strip_temp_paths(model_path: str) -> None:
  """Blanks the training-time temp paths SentencePiece records, so the file's bytes are reproducible."""
  from sentencepiece import sentencepiece_model_pb2

  proto = sentencepiece_model_pb2.ModelProto()
  with open(model_path, "rb") as f:
    proto.ParseFromString(f.read())
  del proto.trainer_spec.input[:]
  proto.trainer_spec.model_prefix = ""
  with open(model_path, "wb") as f:
    f.write(proto.SerializeToString(deterministic=True))


def default_vocabulary_path() -> str:
  """The bundled vocabulary, trained on first use and cached (atomic; deterministic contents)."""
  vocab_dir = os.path.join(cache_dir(), "vocab")
  path = os.path.join(vocab_dir, f"bundled_sp{DEFAULT_BUNDLED_VOCAB_SIZE}_{_BUNDLED_VOCAB_VERSION}.model")
  if os.path.exists(path):
    return path
  os.makedirs(vocab_dir, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=vocab_dir, prefix=".train-") as tmp:
    corpus = os.path.join(tmp, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
      for doc in shakespeare_documents("train") + wikipedia_documents("train"):
        f.write(doc.replace("\n", " ").strip() + "\n")
    model = train_vocabulary([corpus], DEFAULT_BUNDLED_VOCAB_SIZE, os.path.join(tmp, "v.model"))
    _strip_temp_paths(model)
    os.replace(model, path)  # atomic: concurrent processes never read half a file
  return path

