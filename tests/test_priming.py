"""Zero/few-shot priming evaluation (stmoe.evaluation.priming) and the bundled `shakespeare_cloze` task.

Scores are checked against an independent reference: the model run on ONE unpadded sequence (the prompt
written out by hand, then the candidate), its logits turned into log-probabilities with NumPy and summed
over the candidate positions by hand. Models are tiny and randomly initialised; every decoder-only call
shares one padded shape (max_length=40), so each model compiles `score_batch` once.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from stmoe.errors import UserError
from stmoe.evaluation import priming, priming_tasks
from stmoe.evaluation.priming_tasks import PrimingExample
from stmoe.special_ids import EOS_ID

from model_fixtures import VOCAB, tiny_config, tiny_sparse_config

ROOT = os.path.join(os.path.dirname(__file__), "..")
SUPERGLUE_FIXTURES = os.path.join(ROOT, "tasks", "fixtures", "super_glue_format")


class CharVocab:
  """Character-level toy vocabulary: each character is one id in [3, 97) (0 pad, 1 EOS, 2 unknown)."""

  def encode(self, text: str) -> list[int]:
    return [3 + ord(c) % (VOCAB - 3) for c in text]


# A toy task: the train split is the demonstration pool. Example 2 of validation has one candidate twice,
# example 3 has three identical candidates (labelled 2: the tie must go to index 0).
TRAIN = [PrimingExample("red apple", ("no", "yes"), 1), PrimingExample("blue sky", ("yes", "no"), 0),
         PrimingExample("green leaf", ("ok", "no"), 0), PrimingExample("grey rock", ("no", "ok"), 1)]
VALIDATION = [PrimingExample("big cat", ("yes", "no", "ok"), 0), PrimingExample("small dog", ("no", "yes"), 1),
              PrimingExample("old tree", ("ok", "yes", "ok"), 1), PrimingExample("wet sand", ("zz", "zz", "zz"), 2)]
TOY = "_toy_priming"
priming_tasks.register_priming_task(TOY, lambda split: {"train": TRAIN, "validation": VALIDATION}[split])


def _documented_demos(seed: int, index: int, k: int) -> list[int]:
  """The documented draw, written out: the first k of default_rng((seed, index)).permutation(pool)."""
  return [int(i) for i in np.random.default_rng((seed, index)).permutation(len(TRAIN))][:k]


def _random_params(model, shapes) -> dict:
  """Parameters of the model's shapes drawn with NumPy (layer-norm scales 1, the rest N(0, 0.05^2)):
  only their shapes come from the model (traced, not compiled), which keeps these tests fast."""
  import jax

  abstract = jax.eval_shape(lambda: model.get_initial_variables(jax.random.PRNGKey(0), shapes)["params"])
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_map_with_path(
      lambda path, a: (np.ones(a.shape, a.dtype) if "scale" in jax.tree_util.keystr(path)
                       else rng.normal(0.0, 0.05, a.shape).astype(a.dtype)), abstract)


def _init(config, shapes):
  from stmoe.models.api import make_model

  model = make_model(config)
  return model, _random_params(model, shapes)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  x = logits.astype(np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _pad(rows: list[list[int]]) -> np.ndarray:
  out = np.zeros((len(rows), max(map(len, rows))), np.int32)  # [rows, longest]
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out


def _shift_right(targets: np.ndarray) -> np.ndarray:
  return np.concatenate([np.zeros((len(targets), 1), np.int32), targets[:, :-1]], axis=1)


def _forward(model, params, batch) -> np.ndarray:
  """The model's plain forward pass (no loss weights, no scoring): logits [rows, length, vocab]."""
  import jax

  return np.asarray(jax.jit(lambda p, b: model._forward(p, b, rng=None)[0])(params, batch))


def _reference_decoder_only(model, params, pairs) -> list[float]:
  """For each (prompt ids, candidate ids): the sum of log p(candidate token | everything before it), from
  the logits of one forward pass over prompt + candidate (right-padded: the LM is causal), in NumPy."""
  seqs = _pad([p + c for p, c in pairs])  # [rows, n]
  logits = _forward(model, params, {"decoder_input_tokens": _shift_right(seqs), "decoder_target_tokens": seqs})
  logp = _log_softmax(logits)  # [rows, n, vocab]
  return [float(sum(logp[i, t, seqs[i, t]] for t in range(len(p), len(p) + len(c))))
          for i, (p, c) in enumerate(pairs)]


def _reference_encoder_decoder(model, params, pairs) -> list[float]:
  """The same for an encoder-decoder: encoder = prompt + EOS, the candidate ids are the decoder targets."""
  enc, targets = _pad([p + [EOS_ID] for p, _ in pairs]), _pad([c for _, c in pairs])
  logits = _forward(model, params, {"encoder_input_tokens": enc, "decoder_input_tokens": _shift_right(targets),
                                    "decoder_target_tokens": targets})
  logp = _log_softmax(logits)
  return [float(sum(logp[i, t, targets[i, t]] for t in range(len(c)))) for i, (_, c) in enumerate(pairs)]


# ----------------------------------------------------------------------------------------------------
# Prompt and demonstrations


def test_the_prompt_is_exactly_the_documented_text():
  a, b, q = TRAIN[0], TRAIN[1], VALIDATION[1]
  assert priming.build_prompt([], q) == "small dog "
  assert priming.build_prompt([a], q) == "red apple yes\n\nsmall dog "
  assert priming.build_prompt([a, b], q) == "red apple yes\n\nblue sky yes\n\nsmall dog "


def test_demonstrations_are_seeded_nested_and_never_the_example_itself():
  draws = [priming.sample_demonstrations(10, 4, seed=3, example_index=i, exclude=i) for i in range(10)]
  assert draws == [priming.sample_demonstrations(10, 4, seed=3, example_index=i, exclude=i) for i in range(10)]
  assert all(i not in d and len(set(d)) == 4 for i, d in enumerate(draws))
  assert priming.sample_demonstrations(10, 1, seed=3, example_index=5, exclude=5) == draws[5][:1]
  assert draws != [priming.sample_demonstrations(10, 4, seed=4, example_index=i, exclude=i) for i in range(10)]
  assert priming.sample_demonstrations(4, 3, seed=0, example_index=1) == _documented_demos(0, 1, 3)
  assert priming.sample_demonstrations(4, 0, seed=0, example_index=1) == []
  with pytest.raises(UserError, match="only 3 examples"):
    priming.sample_demonstrations(4, 4, seed=0, example_index=1, exclude=1)


# ----------------------------------------------------------------------------------------------------
# Scores against the NumPy reference


@pytest.fixture(scope="module")
def decoder_only():
  cfg = tiny_config(decoder_only=True, num_encoder_layers=0)
  return _init(cfg, {"decoder_input_tokens": (1, 8)})


def test_decoder_only_scores_match_a_numpy_reference_with_left_truncation_and_ties(decoder_only):
  model, params = decoder_only
  vocab = CharVocab()
  out = priming.evaluate_priming(model, params, TOY, shots=(0, 1, 3), seed=7, batch_size=8, max_length=40,
                                 vocabulary=vocab)
  assert out["append_eos"] is False and out["model_type"] == "decoder_only"
  records = {(r["shots"], r["index"]): r for r in out["records"]}
  assert len(records) == 3 * len(VALIDATION)
  pairs, truncated = [], {0: 0, 1: 0, 3: 0}
  for (k, i), rec in sorted(records.items()):
    ex = VALIDATION[i]
    demos = _documented_demos(7, i, k)
    assert rec["demonstrations"] == demos
    prompt = "".join(f"{TRAIN[d].context} {TRAIN[d].candidates[TRAIN[d].label]}\n\n" for d in demos)
    prompt_ids = vocab.encode(prompt + ex.context + " ")
    longest = max(len(c) for c in ex.candidates)  # the candidate is never cut: the prompt gives way
    kept = prompt_ids[-(40 - longest):]
    assert rec["truncated"] == (len(kept) < len(prompt_ids))
    truncated[k] += rec["truncated"]
    pairs += [(kept, vocab.encode(c)) for c in ex.candidates]
    assert rec["num_candidate_tokens"] == [len(c) for c in ex.candidates]  # no EOS for a decoder-only LM
  # unconditional scores (empty prompt: the candidate right after the start token) for the calibrated metric
  pairs += [([], vocab.encode(c)) for ex in VALIDATION for c in ex.candidates]
  reference = iter(_reference_decoder_only(model, params, pairs))
  refs = {key: [next(reference) for _ in VALIDATION[key[1]].candidates] for key in sorted(records)}
  unconditional = [[next(reference) for _ in ex.candidates] for ex in VALIDATION]
  for (k, i), rec in sorted(records.items()):
    ref = refs[(k, i)]
    np.testing.assert_allclose(rec["scores"], ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(rec["scores_unconditional"], unconditional[i], rtol=1e-4, atol=1e-4)
    cal = [s - u for s, u in zip(rec["scores"], rec["scores_unconditional"])]
    assert rec["prediction_calibrated"] == min(j for j, s in enumerate(cal) if s == max(cal))
    best = max(rec["scores"])
    assert rec["prediction"] == min(j for j, s in enumerate(rec["scores"]) if s == best)
    if sorted(ref)[-1] - sorted(ref)[-2] > 1e-3:
      assert rec["prediction"] == int(np.argmax(ref))
    norm = [s / n for s, n in zip(rec["scores"], rec["num_candidate_tokens"])]
    assert rec["prediction_length_normalized"] == min(j for j, s in enumerate(norm) if s == max(norm))
  for k in (0, 1, 3):
    # identical candidates tie exactly; all-equal scores go to index 0 although the label is 2
    assert records[(k, 2)]["scores"][0] == records[(k, 2)]["scores"][2]
    assert len(set(records[(k, 3)]["scores"])) == 1 and records[(k, 3)]["prediction"] == 0
    stats = out["shots"][k]
    assert stats["num_truncated"] == truncated[k]
    for metric, field in (("accuracy", "prediction"), ("accuracy_calibrated", "prediction_calibrated"),
                          ("accuracy_length_normalized", "prediction_length_normalized")):
      assert stats[metric] == np.mean([records[(k, i)][field] == ex.label for i, ex in enumerate(VALIDATION)])
    assert stats["chance"] == pytest.approx(np.mean([1 / 3, 1 / 2, 1 / 3, 1 / 3]))
  assert truncated[0] == truncated[1] == 0 and truncated[3] == len(VALIDATION)  # 3 demos never fit in 40


def test_encoder_decoder_scores_match_a_numpy_reference_with_eos():
  cfg = tiny_sparse_config()
  model, params = _init(cfg, {"encoder_input_tokens": (1, 8), "decoder_input_tokens": (1, 4)})
  vocab = CharVocab()
  out = priming.evaluate_priming(model, params, TOY, shots=(0, 1), seed=1, batch_size=8, max_length=40,
                                 vocabulary=vocab)
  assert out["append_eos"] is True and out["model_type"] == "encoder_decoder"
  pairs = []
  for rec in out["records"]:
    ex = VALIDATION[rec["index"]]
    demos = _documented_demos(1, rec["index"], rec["shots"])
    assert rec["demonstrations"] == demos and not rec["truncated"]
    prompt = priming.build_prompt([TRAIN[d] for d in demos], ex)
    pairs += [(vocab.encode(prompt), vocab.encode(c) + [EOS_ID]) for c in ex.candidates]
    assert rec["num_candidate_tokens"] == [len(c) + 1 for c in ex.candidates]
  pairs += [([], vocab.encode(c) + [EOS_ID]) for ex in VALIDATION for c in ex.candidates]  # EOS-only encoder
  reference = iter(_reference_encoder_decoder(model, params, pairs))
  refs = [[next(reference) for _ in VALIDATION[rec["index"]].candidates] for rec in out["records"]]
  unconditional = [[next(reference) for _ in ex.candidates] for ex in VALIDATION]
  for rec, ref in zip(out["records"], refs):
    np.testing.assert_allclose(rec["scores"], ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(rec["scores_unconditional"], unconditional[rec["index"]], rtol=1e-4, atol=1e-4)


def test_bad_arguments_and_unknown_tasks_are_user_errors(decoder_only):
  model, params = decoder_only
  with pytest.raises(UserError, match="shots must be non-negative"):
    priming.evaluate_priming(model, params, TOY, shots=(-1,), vocabulary=CharVocab())
  with pytest.raises(UserError, match="shakespeare_cloze"):  # the message lists the known tasks
    priming.evaluate_priming(model, params, "no_such_task", vocabulary=CharVocab())
  with pytest.raises(UserError, match="leaves no room for a prompt"):
    priming.evaluate_priming(model, params, TOY, max_length=3, vocabulary=CharVocab())
  with pytest.raises(UserError, match="token id 200"):  # ids past the model's embedding table
    priming.evaluate_priming(model, params, TOY, vocabulary=type("V", (), {"encode": lambda s, t: [200]})())


# ----------------------------------------------------------------------------------------------------
# Tasks


def test_shakespeare_cloze_is_deterministic_balanced_and_held_out():
  from stmoe.data.corpora import cloze
  from stmoe.data.corpora.shakespeare import VALIDATION_PLAYS
  from stmoe.data.corpora.shakespeare_texts import shakespeare_works

  val = cloze.shakespeare_cloze_examples("validation")
  assert val == cloze.shakespeare_cloze_examples.__wrapped__("validation")  # rebuilt: identical
  assert len(val) == cloze.MAX_EXAMPLES["validation"] == 400
  assert {e["play"] for e in val} == set(VALIDATION_PLAYS)
  counts = np.bincount([e["label"] for e in val], minlength=4)
  assert counts.min() >= 0.18 * len(val) and counts.max() <= 0.32 * len(val), counts
  works = shakespeare_works()
  for e in val:
    assert e["candidates"][e["label"]] == e["answer"]
    assert len({c.lower() for c in e["candidates"]}) == 4
    assert all(0.8 * len(e["answer"]) - 1 <= len(c) <= 1.2 * len(e["answer"]) + 1 for c in e["candidates"])
  # the answer is the line right after the context's last line in the play (lines as in the text file)
  for e in val[::40]:
    lines = [" ".join(line.split()) for line in works[e["play"]].splitlines()]
    pairs = set(zip(lines, lines[1:]))
    assert any(e["context"].endswith(a) and b == e["answer"] for a, b in pairs), e
  train = priming.priming_examples("shakespeare_cloze", "train")
  assert 1000 <= len(train) <= cloze.MAX_EXAMPLES["train"]
  assert not {c for ex in train for c in ex.candidates} & {e["answer"] for e in val}


def test_task_templates_and_demonstration_pools(monkeypatch, tmp_path):
  assert {"shakespeare_cloze", "shakespeare_genre", "rotten_tomatoes_polarity", "super_glue_copa",
          "super_glue_boolq", "super_glue_cb", "super_glue_rte"} <= set(priming.priming_task_names())
  pol = priming.priming_examples("rotten_tomatoes_polarity", "validation")
  assert len(pol) == 200 and pol[0].candidates == ("negative", "positive")
  assert pol[0].context.startswith("Review: ") and pol[0].context.endswith("\nSentiment:")
  assert priming_tasks.demonstration_pool("rotten_tomatoes_polarity", "validation")[1] is True
  with pytest.raises(UserError, match="no split 'train'"):
    priming.priming_examples("rotten_tomatoes_polarity", "train")

  monkeypatch.setenv("STMOE_SUPERGLUE_DIR", SUPERGLUE_FIXTURES)
  copa = priming.priming_examples("super_glue_copa", "validation")
  assert copa[0] == PrimingExample("The glass fell off the table so",
                                   ("it shattered on the floor.", "it filled with water."), 0)
  assert copa[1].context == "The road was closed because" and copa[1].label == 1
  first = json.loads(open(os.path.join(SUPERGLUE_FIXTURES, "CB", "val.jsonl")).readline())
  cb = priming.priming_examples("super_glue_cb", "validation")[0]
  assert cb.context == (f"{first['premise']}\nquestion: {first['hypothesis']}. true, false, or neither?\nanswer:")
  assert cb.candidates == ("true", "false", "neither") and cb.label == 0  # entailment
  boolq = priming.priming_examples("super_glue_boolq", "validation")[0]
  assert boolq.candidates == ("no", "yes") and boolq.context.endswith("?\nanswer:")
  rte = priming.priming_examples("super_glue_rte", "validation")[0]
  assert rte.candidates == ("true", "false") and rte.context.endswith(" true or false?\nanswer:")
  with pytest.raises(UserError, match="train.jsonl not found"):  # the fixtures have no train split
    priming.priming_examples("super_glue_rte", "train")
  monkeypatch.setenv("STMOE_SUPERGLUE_DIR", str(tmp_path))
  with pytest.raises(UserError, match="SUPERGLUE_DIR"):
    priming.priming_examples("super_glue_copa", "validation")


def test_priming_imports_no_tensorflow():
  code = ("import sys\nimport stmoe.evaluation.priming\n"
          "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'seqio'))\nassert not bad, bad\n")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(__file__))


# ----------------------------------------------------------------------------------------------------
# The command line


@pytest.fixture(scope="module")
def lm_export(tmp_path_factory):
  """An export directory of a tiny random decoder-only MoE LM with a small SentencePiece
  vocabulary trained on the cloze lines (what `stmoe export` writes: params/, config.gin, vocab.model,
  export.json)."""
  import gin
  import orbax.checkpoint as ocp

  from stmoe import gin_utils
  from stmoe.data import vocab
  from stmoe.data.corpora.cloze import shakespeare_cloze_examples

  root = tmp_path_factory.mktemp("priming_cli")
  corpus = root / "lines.txt"
  corpus.write_text("\n".join(c for e in shakespeare_cloze_examples("train")[:600] for c in
                              [e["context"], *e["candidates"]]) + "\n")
  spm_path = vocab.train_vocabulary([str(corpus)], 300, str(root / "tiny.model"))
  export = root / "export"
  export.mkdir()
  gin_utils.parse_gin(["models/moe_lm_tiny.gin"], [
      "VOCAB_SIZE = 512", "NUM_EXPERTS = 4", "EXPERT_D_FF = 32", "GROUP_SIZE = 64",
      "ModelConfig.num_decoder_layers = 2", "ModelConfig.d_model = 32", "ModelConfig.d_ff = 64"])
  model = gin_utils.configured_model()
  (export / "config.gin").write_text(gin.config_str())
  gin.clear_config()
  params = _random_params(model, {"decoder_input_tokens": (1, 8)})
  with ocp.PyTreeCheckpointer() as ckptr:
    ckptr.save(str(export / "params"), params)
  (export / "vocab.model").write_bytes(open(spm_path, "rb").read())
  (export / "export.json").write_text(json.dumps({"format": "stmoe-export", "version": 1, "dtype": "float32",
                                                  "step": 0, "source": "test", "vocab_file": "vocab.model"}))
  yield export, spm_path
  vocab.set_vocabulary_path(None)


def test_sentencepiece_prompt_and_candidate_tokens_are_those_of_the_joined_text(lm_export):
  _, spm_path = lm_export
  encode = priming.text_encoder(spm_path)
  for ex in priming.priming_examples("shakespeare_cloze", "validation")[:20]:
    prompt = priming.build_prompt([ex], ex)
    for c in ex.candidates:
      assert encode(prompt) + encode(c) == encode(prompt + c)


def test_stmoe_eval_num_shots_writes_results_and_predictions(lm_export, tmp_path, capsys):
  from stmoe import cli

  export, _ = lm_export
  out, preds = tmp_path / "priming.json", tmp_path / "preds.jsonl"
  rc = cli.main(["eval", "--checkpoint", str(export), "--task", "shakespeare_cloze", "--num_shots", "0,1",
                 "--max_examples", "4", "--max_length", "64", "--batch_size", "16", "--output", str(out),
                 "--predictions", str(preds), "--no_progress"])
  stdout, stderr = capsys.readouterr()
  assert rc == 0, stderr[-3000:]
  lines = re.findall(r"^shakespeare_cloze/validation k=(\d) accuracy = ([0-9.]+) .*calibrated", stdout, re.M)
  assert [k for k, _ in lines] == ["0", "1"]
  results = json.loads(out.read_text())
  assert results["task"] == "shakespeare_cloze" and results["split"] == "validation"
  assert set(results["shots"]) == {"0", "1"}
  for k, acc in lines:
    stats = results["shots"][k]
    assert stats["num_examples"] == 4 and stats["chance"] == 0.25
    assert float(acc) == pytest.approx(stats["accuracy"], abs=1e-4)
  rows = [json.loads(line) for line in preds.read_text().splitlines()]
  assert len(rows) == 8 and {r["shots"] for r in rows} == {0, 1}
  assert all(len(r["scores"]) == 4 and r["prediction"] == int(np.argmax(r["scores"])) for r in rows)
  assert [r["correct"] for r in rows if r["shots"] == 0] == [
      r["prediction"] == r["label"] for r in rows if r["shots"] == 0]


@pytest.mark.parametrize("flags, message", [
    (["--task", "shakespeare_cloze", "--num_shots", "-1"], "--num_shots"),
    (["--task", "shakespeare_cloze", "--num_shots", "one"], "--num_shots"),
    (["--task", "no_such_task", "--num_shots", "0"], "is not a priming task"),
])
def test_stmoe_eval_num_shots_bad_input_exits_2(lm_export, capsys, flags, message):
  from stmoe import cli

  export, _ = lm_export
  rc = cli.main(["eval", "--checkpoint", str(export), *flags])
  _, stderr = capsys.readouterr()
  assert rc == 2 and message in stderr, stderr
  assert len(stderr.strip().splitlines()) == 1
