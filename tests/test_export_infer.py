"""`stmoe export` and `stmoe infer`: an export scores exactly like its checkpoint; infer writes predictions."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

FEATURES = {"inputs": 16, "targets": 8}
SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "to be or not to be", "all the world is a stage",
             "the king is dead", "long live the king", "now is the winter of our discontent"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A gin-configured tiny ST-MoE trained 2 steps (so MODEL_DIR/config.gin describes it) + a tiny vocab."""
  from stmoe import gin_utils
  from stmoe.data import vocab
  from stmoe.training import inputs, trainer

  root = tmp_path_factory.mktemp("export")
  corpus = root / "corpus.txt"
  corpus.write_text("\n".join(SENTENCES * 20) + "\n")
  spm_path = vocab.train_vocabulary([str(corpus)], 40, str(root / "tiny.model"))
  vocab.set_vocabulary_path(spm_path)
  gin_utils.parse_gin(["models/st_moe_tiny.gin"], ["VOCAB_SIZE = 64", "GROUP_SIZE = 32"])
  model = gin_utils.configured_model()
  model_dir = str(root / "run")
  trainer.train(model, model_dir=model_dir, train_steps=2, batch_size=4, task_feature_lengths=FEATURES,
                input_fn=inputs.synthetic_input, log_period=1, checkpoint_period=2, progress=False)
  yield root, model_dir, spm_path
  vocab.set_vocabulary_path(None)
  gin_utils.parse_gin([], [])


def _batch():
  from stmoe.training.inputs import synthetic_input

  return next(synthetic_input(None, FEATURES, 4, split="validation"))


def test_export_scores_like_its_checkpoint(run):
  import jax

  from stmoe import checkpoints
  from stmoe import export as export_lib

  root, model_dir, spm_path = run
  ckpt = export_lib.load(model_dir)
  out = export_lib.export(model_dir, str(root / "exp"))
  assert sorted(os.listdir(out)) == ["config.gin", "export.json", "params", "vocab.model"]
  info = json.load(open(os.path.join(out, "export.json")))
  assert info["dtype"] == "float32" and info["step"] == 2 and info["format"] == "stmoe-export"
  assert open(os.path.join(out, "vocab.model"), "rb").read() == open(spm_path, "rb").read()
  # No optimizer state in the export: only parameter arrays are stored.
  assert not os.path.exists(os.path.join(out, "params", "opt_state"))
  exp = export_lib.load(out)
  assert exp.is_export and not ckpt.is_export
  # Parameters bit-identical to the checkpoint's (read independently through restore_train_state's tree).
  flat_ckpt = jax.tree_util.tree_flatten_with_path(ckpt.params)[0]
  flat_exp = dict(jax.tree_util.tree_flatten_with_path(exp.params)[0])
  assert len(flat_ckpt) == len(flat_exp)
  for path, x in flat_ckpt:
    np.testing.assert_array_equal(np.asarray(flat_exp[path]), np.asarray(x))
  batch = _batch()
  s_ckpt = np.asarray(ckpt.model.score_batch(ckpt.params, batch))
  s_exp = np.asarray(exp.model.score_batch(exp.params, batch))
  np.testing.assert_array_equal(s_exp, s_ckpt)
  assert np.all(np.isfinite(s_ckpt))
  del checkpoints

  bf = export_lib.export(model_dir, str(root / "exp_bf16"), bfloat16=True)
  assert json.load(open(os.path.join(bf, "export.json")))["dtype"] == "bfloat16"
  exp_bf = export_lib.load(bf)
  for path, x in flat_ckpt:  # bfloat16 rounding: 8 bits of mantissa
    np.testing.assert_allclose(np.asarray(dict(jax.tree_util.tree_flatten_with_path(exp_bf.params)[0])[path]),
                               np.asarray(x), rtol=2 ** -8, atol=0)
  s_bf = np.asarray(exp_bf.model.score_batch(exp_bf.params, batch))
  np.testing.assert_allclose(s_bf, s_ckpt, rtol=2e-2)
  assert not np.array_equal(s_bf, s_ckpt)  # it really is a rounded copy


def test_infer_on_jsonl_file(run, tmp_path):
  from stmoe import inference

  root, model_dir, _ = run
  from stmoe import export as export_lib

  exp_dir = str(root / "exp_infer")
  export_lib.export(model_dir, exp_dir)
  src = tmp_path / "in.jsonl"
  with open(src, "w") as f:
    for i, s in enumerate(SENTENCES[:5]):
      f.write(json.dumps({"inputs": s, **({"targets": "x"} if i % 2 == 0 else {})}) + "\n")
  outs = {}
  for name, ckpt in (("export", exp_dir), ("checkpoint", model_dir)):
    out = tmp_path / f"{name}.jsonl"
    rc = inference.main(["--checkpoint", ckpt, "--input_file", str(src), "--output", str(out),
                         "--inputs_length", "16", "--targets_length", "8", "--batch_size", "2", "--no_progress"])
    assert rc == 0
    outs[name] = [json.loads(line) for line in open(out)]
  rows = outs["export"]
  assert [r["input"] for r in rows] == SENTENCES[:5]
  assert [("target" in r) for r in rows] == [True, False, True, False, True]
  assert all(isinstance(r["prediction"], str) for r in rows)
  # The export and the checkpoint it came from decode identically (greedy).
  assert [r["prediction"] for r in rows] == [r["prediction"] for r in outs["checkpoint"]]

  # Predictions match decoding the same tokens directly with the model. The batch must be the same as in
  # `infer` (rows 0 and 1): MoE capacity is shared by the tokens of a group, so outputs depend on the batch.
  import sentencepiece as spm

  loaded = export_lib.load(exp_dir)
  sp = spm.SentencePieceProcessor()
  sp.Load(os.path.join(exp_dir, "vocab.model"))
  enc = np.zeros((2, 16), np.int32)
  for i, r in enumerate(rows[:2]):
    ids = sp.EncodeAsIds(r["input"])[:15] + [1]
    enc[i, :len(ids)] = ids
  dec = np.zeros((2, 8), np.int32)
  pred = np.asarray(loaded.model.predict_batch(loaded.params, {"encoder_input_tokens": enc,
                                                              "decoder_input_tokens": dec,
                                                              "decoder_target_tokens": dec}))
  for i, r in enumerate(rows[:2]):
    kept = []
    for t in pred[i].tolist():
      if t == 1:
        break
      if 0 < t < sp.GetPieceSize():
        kept.append(t)
    assert sp.DecodeIds(kept) == r["prediction"]


def test_infer_tsv_and_errors(run, tmp_path):
  from stmoe import inference

  src = tmp_path / "in.tsv"
  src.write_text("to be or not to be\tcomedy\nthe king is dead\n")
  rows = inference.read_inputs(str(src))
  assert rows == [{"input": "to be or not to be", "target": "comedy"}, {"input": "the king is dead"}]
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"question": "x"}) + "\n")
  with pytest.raises(ValueError, match="--input_key"):
    inference.read_inputs(str(bad))
  assert inference.main(["--checkpoint", str(tmp_path / "missing"), "--input_file", str(src),
                         "--output", str(tmp_path / "o.jsonl")]) == 2

