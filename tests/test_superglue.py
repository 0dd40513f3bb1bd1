"""SuperGLUE: official metrics vs hand-computed values, T5 formatting of the format fixtures, sources."""

import os

import pytest

from stmoe.data import superglue as sg
from stmoe.data import superglue_metrics as m

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "tasks", "fixtures", "super_glue_format")


# ---------------------------------------------------------------------------- metrics, by hand


def test_accuracy():
  assert m.accuracy([0, 1, 1, 0], [0, 1, 0, -1]) == {"accuracy": 50.0}


def test_cb_macro_f1():
  targets = [0, 0, 1, 2, 2, 2]
  preds = [0, 1, 1, 2, 2, 0]
  # class 0: tp1 fp1 fn1 -> 0.5; class 1: tp1 fp1 fn0 -> 2/3; class 2: tp2 fp0 fn1 -> 0.8
  got = m.cb_metrics(targets, preds)
  assert got["accuracy"] == pytest.approx(400 / 6)
  assert got["f1_macro"] == pytest.approx(100 * (0.5 + 2 / 3 + 0.8) / 3)


def test_multirc_groups_and_f1a():
  targets = [{"group": 1, "value": 1}, {"group": 1, "value": 0}, {"group": 2, "value": 1},
             {"group": 2, "value": 1}, {"group": 3, "value": 0}]
  preds = [{"group": 1, "value": 1}, {"group": 1, "value": 0}, {"group": 2, "value": 1},
           {"group": 2, "value": 0}, {"group": 3, "value": 1}]
  got = m.multirc_metrics(targets, preds)
  assert got["exact_match"] == pytest.approx(100 / 3)  # only question 1 is all right
  # answers: tp 2, fp 1 (group 3), fn 1 (group 2) -> F1a = 4 / 6
  assert got["f1a"] == pytest.approx(100 * 4 / 6)


def test_record_max_over_answers():
  targets = [["Tom Hale", "Thomas Hale"], ["the Elmford library"], ["Paris"]]
  preds = ["Thomas Hale", "Elmford", "London"]
  got = m.record_metrics(targets, preds)
  assert got["exact_match"] == pytest.approx(100 / 3)
  # query 1: exact -> F1 1; query 2: "elmford library" vs "elmford" -> p 1, r 1/2, F1 2/3; query 3: 0
  assert got["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)


def test_matthews():
  targets = [1, 1, 1, 0, 0, 0, 1, 0]
  preds = [1, 1, 0, 0, 0, 1, 1, -1]  # -1 (unparseable) counts as the wrong class
  tp, tn, fp, fn = 3, 2, 2, 1
  want = (tp * tn - fp * fn) / ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5
  assert m.matthews_corrcoef(targets, preds)["matthews_corrcoef"] == pytest.approx(100 * want)


# ---------------------------------------------------------------------------- formatting fixtures


def _examples(task, split="validation"):
  split_name = "test" if task in sg.DIAGNOSTICS else split
  return [ex for rec in sg.read_jsonl_records(FIXTURES, task, split_name)
          for ex in sg.format_example(task, rec, split_name)]


def test_fixture_formats():
  boolq = _examples("boolq")
  assert boolq[0]["inputs"] == ("boolq passage: River and canal -- The river runs for forty miles, while "
                                "the canal is only six miles long. question: is the river longer than the canal")
  assert [e["targets"] for e in boolq] == ["True", "False"]
  cb = _examples("cb")
  assert cb[0]["inputs"] == ("cb hypothesis: the train had already left premise: She said the train had "
                             "already left when she reached the platform.")
  assert [e["targets"] for e in cb] == ["entailment", "contradiction", "neutral"]
  copa = _examples("copa")
  assert copa[1]["inputs"] == ("copa choice1: The sun came out. choice2: A tree had fallen across it. "
                               "premise: The road was closed. question: cause")
  assert [e["targets"] for e in copa] == ["choice1", "choice2"]
  rte = _examples("rte")
  assert rte[1]["inputs"] == ("rte hypothesis: The museum is open in February. premise: The museum is "
                              "closed for repairs until March.")
  assert [e["targets"] for e in rte] == ["entailment", "not_entailment"]
  wic = _examples("wic")
  assert wic[0]["inputs"] == ("wic sentence1: She sat on the bank of the river. sentence2: He deposited "
                              "the cheque at the bank. word: bank")
  assert [e["targets"] for e in wic] == ["False", "True"]
  axb = _examples("axb")
  assert axb[1]["inputs"] == "rte sentence1: No dogs barked. sentence2: Some dogs barked."
  assert axb[1]["targets"] == "not_entailment"
  axg = _examples("axg")
  assert axg[0]["inputs"] == ("rte hypothesis: The patient was kind. premise: The nurse thanked the "
                              "patient because she was kind.")


def test_multirc_fixture_one_example_per_answer_grouped_by_question():
  ex = _examples("multirc")
  assert len(ex) == 5
  assert ex[0]["inputs"] == ("multirc question: What did Anna plant? answer: Tomatoes and beans "
                             "paragraph: Sent 1: Anna planted tomatoes and beans in May. Sent 2: By August "
                             "the beans were ready to pick.")
  assert [e["targets"] for e in ex] == ["True", "False", "True", "True", "False"]
  assert [e["group"] for e in ex] == [0, 0, 0, 1, 1]


def test_record_fixture():
  val = _examples("record")
  assert val[0]["inputs"] == ("record query: Residents of @placeholder queued before dawn. entities: "
                              "Elmford, Jane Ross, Monday passage: The village of Elmford opened a new "
                              "library on Monday. Elmford library opens. Mayor Jane Ross cut the ribbon")
  assert val[0]["targets"] == "Elmford" and val[0]["answers"] == ["Elmford"]
  train = _examples("record", "train")
  assert [e["targets"] for e in train] == ["Elmford", "Thomas Hale", "Tom Hale"]  # one per answer
  assert sg.record_postprocessor("x", example={"answers": [b"Tom Hale"]}, is_target=True) == ["Tom Hale"]


def test_wsc_fixture_marks_spans():
  ex = _examples("wsc")
  assert ex[0]["inputs"] == ("wsc text: * The trophy * would not fit in the suitcase because # it # was "
                             "too big.")
  assert ex[1]["inputs"] == ("wsc text: Mark told * Pete * many lies about # himself #, which Pete "
                             "included in his book.")
  assert [e["targets"] for e in ex] == ["True", "False"]


def test_wsc_fixed_moves_a_wrong_index():
  rec = {"text": "Mark told Pete many lies about himself, which Pete included in his book.",
         "span1_index": 6, "span1_text": "Pete", "span2_index": 6, "span2_text": "himself",
         "idx": 1, "label": 0}
  fixed = sg.fix_wsc_spans(rec)
  assert fixed["span1_index"] == 8  # nearest "Pete" to the wrong index 6 (words 2 and 8)
  assert fixed["span2_index"] == 6


def test_postprocessors():
  pp = sg.label_postprocessor("cb")
  assert pp("neutral") == 2 and pp(" entailment ") == 0 and pp("maybe") == -1
  mpp = sg.label_postprocessor("multirc")
  assert mpp("True", example={"group": 7}) == {"group": 7, "value": 1}


# ---------------------------------------------------------------------------- seqio tasks and sources


def test_tasks_run_on_fixtures_and_metrics(monkeypatch):
  monkeypatch.setenv("STMOE_SUPERGLUE_DIR", FIXTURES)
  from stmoe.data import pipeline
  data = pipeline.get_eval_dataset("super_glue_cb_v102", "validation", {"inputs": 64, "targets": 4}, 2)
  assert data.targets == [0, 1, 2] and data.num_examples == 3
  assert data.compute_metrics(["entailment", "contradiction", "contradiction"])["accuracy"] == pytest.approx(
      200 / 3)
  mrc = pipeline.get_eval_dataset("super_glue_multirc_v102", "validation", {"inputs": 64, "targets": 4}, 8)
  assert [t["group"] for t in mrc.targets] == [0, 0, 0, 1, 1]
  assert mrc.compute_metrics(["True", "False", "True", "True", "False"]) == {"exact_match": 100.0,
                                                                              "f1a": 100.0}
  rec = pipeline.get_eval_dataset("super_glue_record_v102", "validation", {"inputs": 64, "targets": 8}, 8)
  assert rec.targets == [["Elmford"]]
  assert rec.compute_metrics(["elmford"])["exact_match"] == 100.0
  import seqio
  import stmoe.tasks  # noqa: F401
  mixture = seqio.get_mixture_or_task("super_glue_v102")
  assert {t.name for t in mixture.tasks} == {f"super_glue_{t}_v102" for t in
                                             ("boolq", "cb", "copa", "multirc", "record", "rte", "wic",
                                              "wsc.fixed")}


def test_missing_data_messages(monkeypatch, tmp_path):
  from stmoe.data import sources
  monkeypatch.setenv("STMOE_SUPERGLUE_DIR", str(tmp_path))
  with pytest.raises(sg.SuperGlueDataError, match="SUPERGLUE_DIR.*BoolQ"):
    sources.superglue_examples("boolq", "train")
  monkeypatch.delenv("STMOE_SUPERGLUE_DIR")
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  with pytest.raises(sources.MissingDataError, match="tfds build super_glue/boolq.*SUPERGLUE_DIR"):
    sources.superglue_examples("boolq", "train")
  with pytest.raises(sources.MissingDataError, match="tfds build c4.*TFDS_DATA_DIR"):
    sources.check_tfds("c4/en:3.1.0")
  import seqio
  import stmoe.tasks  # noqa: F401
  with pytest.raises(sources.MissingDataError, match="tfds build c4/en"):  # through the task itself
    seqio.get_mixture_or_task("c4_span_corruption").get_dataset({"inputs": 32, "targets": 8})


def test_every_task_runs_through_seqio_on_its_fixture(monkeypatch):
  monkeypatch.setenv("STMOE_SUPERGLUE_DIR", FIXTURES)
  import seqio
  import stmoe.tasks  # noqa: F401
  for task in sg.TASKS:
    split = "test" if task in sg.DIAGNOSTICS else "validation"
    want = _examples(task)
    t = seqio.get_mixture_or_task(f"super_glue_{task}_v102")
    examples = list(t.get_dataset({"inputs": 128, "targets": 8}, split=split, shuffle=False)
                    .as_numpy_iterator())
    assert [ex["inputs_pretokenized"].decode() for ex in examples] == [w["inputs"] for w in want], task
    assert [ex["targets_pretokenized"].decode() for ex in examples] == [w["targets"] for w in want], task
    vocab = t.output_features["inputs"].vocabulary
    assert vocab.decode(examples[0]["inputs"].tolist()).startswith(want[0]["inputs"][:20]), task
    assert examples[0]["inputs"][-1] == 1 and examples[0]["targets"][-1] == 1  # EOS
