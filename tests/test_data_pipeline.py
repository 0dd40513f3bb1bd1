"""Input pipeline: packing correctness, determinism, exact resume, sharding, eval batches, TF-free import."""

import json
import subprocess
import sys

import numpy as np
import pytest

LENGTHS = {"inputs": 32, "targets": 12}
TASK = "shakespeare_span_corruption"


@pytest.fixture(scope="module")
def pipeline():
  from stmoe.data import pipeline as p
  return p


def _take(it, n):
  return [next(it) for _ in range(n)]


def _segments(tokens, segment_ids):
  """{segment id: its tokens} of one packed row."""
  return {s: tokens[segment_ids == s] for s in np.unique(segment_ids) if s > 0}


def test_packing_segments_positions_and_no_token_lost(pipeline):
  import seqio
  # short sentences, long rows: several examples per row
  name, lengths = "rotten_tomatoes_polarity", {"inputs": 96, "targets": 8}
  it = pipeline.DataIterator(name, lengths, 4, split="validation", shuffle=False, seed=0, pack=True)
  batches = _take(it, 3)
  task = seqio.get_mixture_or_task(name)
  examples = list(task.get_dataset(lengths, split="validation", shuffle=False, seed=0)
                  .as_numpy_iterator())
  packed_inputs, packed_targets = [], []
  for b in batches:
    for r in range(4):
      for side, key in (("encoder", "encoder_input_tokens"), ("decoder", "decoder_target_tokens")):
        seg, pos, tok = b[f"{side}_segment_ids"][r], b[f"{side}_positions"][r], b[key][r]
        used = seg > 0
        assert np.all(tok[~used] == 0)  # padding only after the segments
        assert np.all(np.diff(seg[used]) >= 0) and seg[used][0] == 1
        assert np.all(np.diff(np.unique(seg[used])) == 1)  # ids 1, 2, 3, ... contiguous
        for s in np.unique(seg[used]):
          np.testing.assert_array_equal(pos[seg == s], np.arange(np.sum(seg == s)))  # restart at 0
      dseg = b["decoder_segment_ids"][r]
      for s, tgt in _segments(b["decoder_target_tokens"][r], dseg).items():
        inp = b["decoder_input_tokens"][r][dseg == s]
        assert inp[0] == 0 and np.array_equal(inp[1:], tgt[:-1])  # shifted within its own segment
        np.testing.assert_array_equal(b["decoder_loss_weights"][r][dseg == s], 1)
        assert tgt[-1] == 1  # each segment ends with its EOS: nothing crosses a boundary
      assert np.all(b["decoder_loss_weights"][r][dseg == 0] == 0)
      enc = _segments(b["encoder_input_tokens"][r], b["encoder_segment_ids"][r])
      dec = _segments(b["decoder_target_tokens"][r], dseg)
      assert sorted(enc) == sorted(dec)
      packed_inputs += [enc[s].tolist() for s in sorted(enc)]
      packed_targets += [dec[s].tolist() for s in sorted(dec)]
  # every packed segment pair is one whole example, and the examples come out complete and in order
  want = [(e["inputs"].tolist(), e["targets"].tolist()) for e in examples]
  got = list(zip(packed_inputs, packed_targets))
  assert got == want[: len(got)]
  assert len(got) > 2 * 12 - 6  # 12 rows: packing put about two examples in each


def test_same_seed_same_batches_and_exact_resume(pipeline):
  a = pipeline.DataIterator(TASK, LENGTHS, 4, seed=5)
  stream = _take(a, 5)
  b = pipeline.DataIterator(TASK, LENGTHS, 4, seed=5)
  first_two = _take(b, 2)
  for x, y in zip(stream[:2], first_two):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  state = json.loads(json.dumps(b.get_state()))  # JSON round trip, as in a checkpoint
  assert state["position"] == 2
  c = pipeline.DataIterator(TASK, LENGTHS, 4, seed=5)
  c.set_state(state)
  for x, y in zip(stream[2:], _take(c, 3)):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  other = next(pipeline.DataIterator(TASK, LENGTHS, 4, seed=6))
  assert not np.array_equal(other["encoder_input_tokens"], stream[0]["encoder_input_tokens"])
  with pytest.raises(ValueError, match="different one"):
    pipeline.DataIterator(TASK, LENGTHS, 4, seed=6).set_state(state)


def test_per_process_shards(pipeline):
  full = pipeline.DataIterator(TASK, LENGTHS, 4, split="validation", shuffle=False, pack=False,
                               repeat=False)
  shards = [pipeline.DataIterator(TASK, LENGTHS, 4, split="validation", shuffle=False, pack=False,
                                  repeat=False, shard_id=i, num_shards=2) for i in range(2)]
  from stmoe.data import bundled, span_corruption
  batches = [next(s) for s in shards]
  assert batches[0]["encoder_input_tokens"].shape == (2, LENGTHS["inputs"])
  vocab = full.vocabulary
  docs = bundled.shakespeare_documents("validation")
  # sharding is by document: process i reads documents i, i + 2, ... (the first rows: documents 0 and 1)
  for i, b in enumerate(batches):
    text = span_corruption.restore_text_ids(b["encoder_input_tokens"][0], b["decoder_target_tokens"][0],
                                            vocab.vocab_size)
    want = vocab.encode(docs[i])
    assert text == want[: len(text)] and len(text) > 20
  with pytest.raises(ValueError, match="divisible"):
    pipeline.DataIterator(TASK, LENGTHS, 3, num_shards=2)


def test_decoder_only_features(pipeline):
  lm = next(pipeline.DataIterator("shakespeare_lm", {"targets": 16}, 2, model_type="decoder_only"))
  assert set(lm) == {"decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights",
                     "decoder_segment_ids", "decoder_positions"}
  prefix = next(pipeline.DataIterator("shakespeare_prefix_lm", {"inputs": 8, "targets": 8}, 2,
                                      model_type="prefix_lm", pack=False))
  assert prefix["decoder_target_tokens"].shape == (2, 16)
  causal = prefix["decoder_causal_attention"]
  # the prefix (inputs + EOS) attends bidirectionally; the loss starts at the prefix's last position
  # (which predicts the first target token) and covers the targets only
  for row in range(2):
    n_causal = int(causal[row].sum())
    assert np.all(causal[row, :n_causal] == 1) and n_causal >= 2
    loss = prefix["decoder_loss_weights"][row]
    assert np.all(loss[: n_causal - 1] == 0) and loss[n_causal - 1] == 1
  assert all(v.dtype == np.int32 for v in prefix.values())


def test_eval_dataset_targets_and_metrics(pipeline):
  data = pipeline.get_eval_dataset("shakespeare_genre", "validation", {"inputs": 48, "targets": 4}, 8,
                                   max_examples=12)
  assert data.num_examples == 12 and len(data.batches) == 2
  assert data.batches[1]["encoder_input_tokens"].shape == (8, 48)
  assert np.all(data.batches[1]["encoder_input_tokens"][4:] == 0)  # padding rows
  labels = ["comedy", "history", "tragedy"]
  truth = [labels[t] for t in data.targets]
  assert data.compute_metrics(truth) == {"accuracy": 100.0}
  half = truth[:6] + ["comedy" if t != "comedy" else "tragedy" for t in truth[6:]]
  assert data.compute_metrics(half) == {"accuracy": 50.0}


def test_unknown_task_message(pipeline):
  with pytest.raises(ValueError, match="shakespeare_span_corruption"):
    pipeline.DataIterator("no_such_task", LENGTHS, 2)


def test_stmoe_and_stmoe_data_import_without_tensorflow():
  code = ("import sys, stmoe, stmoe.data, stmoe.data.vocab, stmoe.data.bundled, stmoe.data.pipeline, "
          "stmoe.data.superglue, stmoe.data.superglue_metrics, stmoe.data.span_corruption, "
          "stmoe.data.settings; "
          "bad = [m for m in ('tensorflow', 'seqio') if m in sys.modules]; print(bad); "
          "sys.exit(1 if bad else 0)")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
  assert proc.returncode == 0, proc.stdout + proc.stderr
