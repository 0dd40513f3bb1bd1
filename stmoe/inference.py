"""`stmoe infer`: decode predictions for a task split or for a JSONL/TSV file of inputs, written as JSONL.

    # a task split (also prints and writes the task's metrics: OUTPUT.metrics.json)
    stmoe infer --checkpoint /tmp/qs/export --task shakespeare_genre --split validation --output preds.jsonl
    # your own inputs: JSONL with an "inputs" (or "input"/"text") field and optional "targets", or TSV
    # (input TAB optional target); the text is used as is (add the task's prefix, e.g. --prefix 'genre passage: ')
    stmoe infer --checkpoint /tmp/qs/export --input_file my.jsonl --output preds.jsonl --prefix 'genre passage: '

--checkpoint takes an export directory (`stmoe export`) or a training checkpoint (MODEL_DIR, a step dir,
MODEL_DIR/best). Each output line is {"input", "prediction"[, "target"]}. Decoding: --method greedy (default),
sample (--temperature, --top_k, --seed) or beam (--beam_size, --length_penalty); MoE layers run with the
eval capacity factor.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

from stmoe.errors import UserError, run_command

EOS_ID = 1


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
    from stmoe.training.task_eval import trim_ids

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


def decode_config_from_args(args: argparse.Namespace, targets_length: int):
  from stmoe.decoding import DecodeConfig

  return DecodeConfig(method=args.method, max_decode_length=targets_length, temperature=args.temperature,
                      top_k=args.top_k, beam_size=args.beam_size, length_penalty=args.length_penalty)


def add_decode_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--method", default="greedy", choices=["greedy", "sample", "beam"])
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--top_k", type=int, default=0)
  parser.add_argument("--beam_size", type=int, default=4)
  parser.add_argument("--length_penalty", type=float, default=0.6)
  parser.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> int:
  """`stmoe infer`: decode predictions for a task split or a JSONL/TSV file; write JSONL."""
  return run_command("stmoe infer", _main, list(argv or []))


def _check_output(output: str, input_file: str | None) -> None:
  """The predictions file must not be the input file, nor an existing directory."""
  if os.path.isdir(output):
    raise UserError(f"--output {output!r} is a directory; pass a file path such as preds.jsonl.")
  if input_file and os.path.exists(output) and os.path.samefile(output, input_file):
    raise UserError(f"--output {output!r} is the --input_file: writing would destroy the inputs. Pass another "
                    "--output path.")


def _main(argv: list[str]) -> int:
  from stmoe import export as export_lib
  from stmoe import gin_utils

  parser = argparse.ArgumentParser(prog="stmoe infer", description=main.__doc__)
  parser.add_argument("--checkpoint", required=True, help="export directory or training checkpoint/MODEL_DIR")
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument("--task", help="a registered seqio task to decode (metrics are computed too)")
  src.add_argument("--input_file", help="JSONL ({'inputs': ..., 'targets'?: ...}) or TSV (input<TAB>target?)")
  parser.add_argument("--split", default="validation")
  parser.add_argument("--input_key", default=None)
  parser.add_argument("--target_key", default=None)
  parser.add_argument("--prefix", default="", help="text prepended to every file input (the task's prefix)")
  parser.add_argument("--output", required=True, help="predictions JSONL to write")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--inputs_length", type=int, default=512)
  parser.add_argument("--targets_length", type=int, default=64, help="maximum decode length")
  parser.add_argument("--max_examples", type=int, default=None)
  parser.add_argument("--no_progress", action="store_true")
  add_decode_flags(parser)
  gin_utils.add_gin_flags(parser)
  args, bindings = gin_utils.parse_known_gin_args(parser, argv)
  _check_output(args.output, args.input_file)
  rows = None
  if args.input_file:  # read the inputs before the (slow) model load: a bad file fails at once
    rows = read_inputs(args.input_file, args.input_key, args.target_key)
  loaded = export_lib.load(args.checkpoint, args.gin_file, bindings)
  cfg = decode_config_from_args(args, args.targets_length)
  from stmoe.training import task_eval

  if args.task:
    if loaded.vocab_path:
      from stmoe.data import vocab

      vocab.set_vocabulary_path(loaded.vocab_path)
    result = task_eval.run_task_eval(loaded.model, loaded.params, args.task, args.split,
                                     {"inputs": args.inputs_length, "targets": args.targets_length},
                                     batch_size=args.batch_size, max_examples=args.max_examples,
                                     decode_config=cfg, seed=args.seed, progress=not args.no_progress)
    task_eval.write_predictions(args.output, result.records())
    metrics_path = os.path.splitext(args.output)[0] + ".metrics.json"
    task_eval.write_results(metrics_path, {"task": args.task, "split": args.split, "metrics": result.metrics,
                                           "num_examples": result.num_examples, "checkpoint": loaded.source,
                                           "step": loaded.step})
    for k, v in sorted(result.metrics.items()):
      print(f"{args.task}/{args.split} {k} = {v:.6g}")
    print(f"stmoe infer: wrote {result.num_examples} predictions to {args.output} and metrics to {metrics_path}")
    return 0
  if args.max_examples is not None:
    rows = rows[: args.max_examples]
  records = predict_file(loaded, rows, batch_size=args.batch_size, inputs_length=args.inputs_length,
                         targets_length=args.targets_length, decode_config=cfg, prefix=args.prefix,
                         seed=args.seed, progress=not args.no_progress)
  task_eval.write_predictions(args.output, records)
  print(f"stmoe infer: wrote {len(records)} predictions to {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
