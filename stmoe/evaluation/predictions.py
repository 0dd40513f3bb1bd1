"""Predictions for your own inputs: read a JSONL/TSV file, encode it, decode with the model, detokenize.

`read_inputs` reads JSON lines (.jsonl/.json/.ndjson: one object per line with an "inputs" / "input" /
"text" field and optional "targets") or TSV (.tsv/.txt: input TAB optional target); a bad file raises a
UserError naming the file, the line and the fix. `predict_file` decodes the rows with a loaded model
(stmoe.checkpoints.export.load) and a SentencePiece vocabulary, no TensorFlow involved. `stmoe infer`
(stmoe/cli/infer.py) drives it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

from stmoe.errors import UserError
from stmoe.special_ids import EOS_ID


JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TSV_SUFFIXES = (".tsv", ".txt")


def read_inputs(path: str, input_key: str | None = None, target_key: str | None = None) -> list[dict[str, str]]:
  """Rows {"input", "target"?} from JSON lines (.jsonl/.json/.ndjson: one object per line) or TSV
  (.tsv/.txt: input[TAB target]). Bad files raise UserError naming the file, the line and the fix."""
  if not os.path.isfile(path):
    raise UserError(f"--input_file {path!r} does not exist or is not a file.")
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in JSONL_SUFFIXES + TSV_SUFFIXES:
    raise UserError(f"--input_file {path!r}: unknown file type {suffix or '(no extension)'!r}; use JSON lines "
                    f"({', '.join(JSONL_SUFFIXES)}) or TSV ({', '.join(TSV_SUFFIXES)}).")
  try:
    with open(path, encoding="utf-8", newline="") as f:
      text = f.read()
  except UnicodeDecodeError as e:
    line = text_line_of_offset(path, e.start)
    raise UserError(f"{path}:{line}: not valid UTF-8 (byte {e.start}); save the file as UTF-8.") from None
  rows: list[dict[str, str]] = []
  if suffix in JSONL_SUFFIXES:
    for n, line in enumerate(text.splitlines(), 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(f"{path}:{n}: not valid JSON ({e.msg}, column {e.colno}); each line must be one JSON "
                        "object such as {\"inputs\": \"...\"}.") from None
      if not isinstance(obj, dict):
        raise UserError(f"{path}:{n}: a JSON {type(obj).__name__} where an object is expected; each line must "
                        "be one JSON object such as {\"inputs\": \"...\"}.")
      keys = [input_key] if input_key else ["inputs", "input", "text"]
      key = next((k for k in keys if k in obj), None)
      if key is None:
        raise UserError(f"{path}:{n}: no input field {keys} in {sorted(obj)}; pass --input_key.")
      row = {"input": str(obj[key])}
      tkeys = [target_key] if target_key else ["targets", "target", "label"]
      tkey = next((k for k in tkeys if k in obj), None)
      if tkey is not None:
        row["target"] = str(obj[tkey])
      rows.append(row)
  else:
    for cols in csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE):
      if not cols or not cols[0].strip():
        continue
      row = {"input": cols[0]}
      if len(cols) > 1:
        row["target"] = cols[1]
      rows.append(row)
  if not rows:
    raise UserError(f"--input_file {path!r} has no inputs (it is empty or blank).")
  return rows


def text_line_of_offset(path: str, offset: int) -> int:
  """1-based line number of a byte offset in a file."""
  with open(path, "rb") as f:
    return f.read(offset).count(b"\n") + 1


class SentencePieceCodec:
  """Text <-> ids with a T5-id SentencePiece model (no TensorFlow): EOS appended, sentinels dropped."""

  def __init__(self, path: str):
    import sentencepiece as spm

    self.sp = spm.SentencePieceProcessor()
    self.sp.Load(path)
    self.size = self.sp.GetPieceSize()

  def encode(self, text: str, length: int) -> list[int]:
    return self.sp.EncodeAsIds(text)[: length - 1] + [EOS_ID]

  def decode(self, ids: Sequence[int]) -> str:
    from stmoe.evaluation.task_metrics import trim_ids

    return self.sp.DecodeIds([i for i in trim_ids(ids) if i < self.size])


def make_batches(model: Any, codec: SentencePieceCodec, texts: Sequence[str], batch_size: int,
                 inputs_length: int, targets_length: int) -> list[dict[str, np.ndarray]]:
  """Model batches for the inputs (the last batch padded with empty rows)."""
  decoder_only = bool(getattr(model.config, "decoder_only", False))
  batches = []
  for start in range(0, len(texts), batch_size):
    chunk = [codec.encode(t, inputs_length) for t in texts[start:start + batch_size]]
    chunk += [[]] * (batch_size - len(chunk))
    if decoder_only:  # prompt [0, x1..xn] under prefix (bidirectional) attention, then continue
      width = inputs_length + 1
      dec = np.zeros((batch_size, width), np.int32)  # [batch, width]
      causal = np.zeros((batch_size, width), np.int32)
      for i, ids in enumerate(chunk):
        dec[i, 1:1 + len(ids)] = ids
        causal[i, :1 + len(ids)] = 1
      batches.append({"decoder_input_tokens": dec, "decoder_target_tokens": dec, "decoder_causal_attention": causal})
    else:
      enc = np.zeros((batch_size, inputs_length), np.int32)  # [batch, inputs_length]
      for i, ids in enumerate(chunk):
        enc[i, :len(ids)] = ids
      dec = np.zeros((batch_size, targets_length), np.int32)  # [batch, targets_length]
      batches.append({"encoder_input_tokens": enc, "decoder_input_tokens": dec, "decoder_target_tokens": dec})
  return batches


def predict_file(loaded: Any, rows: Sequence[dict[str, str]], *, batch_size: int, inputs_length: int,
                 targets_length: int, decode_config: Any, prefix: str = "", seed: int = 0,
                 progress: bool = False) -> list[dict[str, str]]:
  """Decodes the rows' inputs; returns rows with "prediction" added."""
  import jax

  if not loaded.vocab_path:
    raise ValueError("No vocabulary found for this checkpoint: export it with `stmoe export` (which copies "
                     "the vocabulary) or set STMOE_VOCABULARY_PATH.")
  codec = SentencePieceCodec(loaded.vocab_path)
  texts = [prefix + r["input"] for r in rows]
  batches = make_batches(loaded.model, codec, texts, batch_size, inputs_length, targets_length)
  preds: list[str] = []
  t0 = time.time()
  for i, batch in enumerate(batches):
    rng = jax.random.PRNGKey(seed + i) if decode_config.method == "sample" else None
    ids = np.asarray(jax.device_get(loaded.model.predict_batch(loaded.params, batch, rng,
                                                               decode_config=decode_config)))
    preds.extend(codec.decode(row) for row in ids)
    if progress:
      sys.stderr.write(f"\r[infer] batch {i + 1}/{len(batches)} ({time.time() - t0:.0f}s)")
      sys.stderr.flush()
  if progress:
    sys.stderr.write("\n")
  out = []
  for r, p in zip(rows, preds):
    rec = {"input": r["input"], "prediction": p}
    if "target" in r:
      rec["target"] = r["target"]
    out.append(rec)
  return out
