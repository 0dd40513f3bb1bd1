"""Zero/few-shot priming evaluation: score each candidate answer after k demonstrations, predict the best.

Works on any model (decoder-only or encoder-decoder, dense or MoE) and any priming task (a task whose
examples have candidate answers: stmoe.evaluation.priming_tasks). For every example of a split and every
k in `shots`:

1. **Demonstrations.** The k demonstrations are the first k indices of
   `numpy.random.default_rng((seed, example_index)).permutation(len(pool))`, in that order, where the pool
   is the task's train split (for a task with only a validation split: the evaluated split, and the
   example itself is skipped). Same seed, same demonstrations; the demonstrations of a smaller k are the
   first ones of a larger k; the example being scored is never among them.
2. **The prompt** (`build_prompt`), exactly::

       d1.context + " " + d1.answer + "\\n\\n" + ... + dk.context + " " + dk.answer + "\\n\\n" + x.context + " "

   where answer = candidates[label]; for k = 0 it is just `x.context + " "`. The model scores the text
   `prompt + candidate`.
3. **Tokens.** prompt ids = encode(prompt) and candidate ids = encode(candidate), encoded on its own. With
   SentencePiece (whitespace is the "▁" that starts a piece, trailing whitespace is dropped, every encoded
   string starts a new word, newlines are whitespace) this is exactly encode(prompt + candidate).
4. **Batches.** Decoder-only: one sequence, prompt ids + candidate ids, as `decoder_target_tokens`;
   `decoder_input_tokens` is it shifted right behind the start token 0; `decoder_loss_weights` is 1 on the
   candidate tokens only. Causal attention, or prefix attention over the prompt (`decoder_causal_attention`)
   when ModelConfig.prefix_lm or `prefix_attention=True`. Encoder-decoder: `encoder_input_tokens` = prompt
   ids + EOS (seqio's tasks end their inputs with EOS), decoder targets = candidate ids (+ EOS).
5. **EOS** is appended to the candidate for encoder-decoder models, whose targets always end in EOS: the
   score is then that of the complete answer ("yes" is not also credited as the start of "yes, but").
   Not for decoder-only models: the candidate continues running text, where a language model meets EOS
   only at the end of a document. `append_eos` overrides either default.
6. **Scores.** `model.score_batch`: the summed log-likelihood of the candidate tokens (EOS included when
   appended). The prediction is the argmax; **ties go to the lowest candidate index**. Candidates with
   identical tokens are scored once and share the score, so they tie exactly. `accuracy` uses the summed
   score. Two secondary metrics predict the same way from other scores: `accuracy_length_normalized`
   from the mean log-likelihood per candidate token, and `accuracy_calibrated` from the summed score
   minus the candidate's unconditional score (the same candidate after an empty prompt: decoder-only,
   just the start token; encoder-decoder, an encoder input of EOS alone): log p(c | prompt) - log p(c),
   in the spirit of GPT-3's unconditional normalisation (Brown et al. 2020, sec. 2.4, which conditions on
   "Answer:" instead) and of PMI scoring (Holtzman et al. 2021). A summed score also rewards candidates
   that are likely anywhere; the calibrated one keeps what the prompt adds.
7. **Truncation.** When the prompt and the longest candidate of an example do not fit in `max_length`
   tokens (decoder-only: the whole sequence; encoder-decoder: the encoder input with its EOS), prompt
   tokens are dropped from the LEFT, keeping the query and the latest demonstrations; a candidate is never
   cut, and all candidates of an example see the same prompt. `num_truncated` counts those examples.

One row per (example, distinct candidate); rows are padded to a width that is a multiple of 64 (at most
`max_length`) fitting the longest row of that k (and of the unconditional pass, scored once for all k),
so each distinct width compiles `score_batch` once. MoE layers run
deterministically with the eval capacity factor; as in any MoE evaluation, whether a token finds room in
its expert depends on the other tokens of its routing group, so MoE scores can depend slightly on which
rows share a batch. Library only: `stmoe eval --checkpoint DIR --task T --num_shots 0,1,4` is the command.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

from stmoe.errors import UserError
from stmoe.evaluation.priming_tasks import (PrimingExample, demonstration_pool, priming_examples,
                                            priming_task, priming_task_names)
from stmoe.special_ids import EOS_ID

__all__ = ["PrimingExample", "build_prompt", "evaluate_priming", "priming_examples", "priming_task_names",
           "sample_demonstrations", "text_encoder", "ANSWER_SEPARATOR", "DEMONSTRATION_SEPARATOR"]

ANSWER_SEPARATOR = " "  # between a context and its answer (and after the query's context)
DEMONSTRATION_SEPARATOR = "\n\n"  # after each demonstration
WIDTH_MULTIPLE = 64  # rows are padded to a multiple of this many tokens (fewer compilations)


def build_prompt(demonstrations: Sequence[PrimingExample], example: PrimingExample) -> str:
  """The prompt text: each demonstration's context, " ", its right answer, "\\n\\n"; then the example's
  context and " " (the candidate follows)."""
  shown = "".join(d.context + ANSWER_SEPARATOR + d.candidates[d.label] + DEMONSTRATION_SEPARATOR
                  for d in demonstrations)
  return shown + example.context + ANSWER_SEPARATOR


def sample_demonstrations(pool_size: int, k: int, *, seed: int, example_index: int,
                          exclude: int | None = None) -> list[int]:
  """Indices of the k demonstrations of example `example_index`: the first k of
  default_rng((seed, example_index)).permutation(pool_size), skipping `exclude` (the example itself when
  the pool is the evaluated split)."""
  if k == 0:
    return []
  order = [int(i) for i in np.random.default_rng((seed, example_index)).permutation(pool_size) if i != exclude]
  if len(order) < k:
    raise UserError(f"{k} demonstrations were asked for but the pool has only {len(order)} examples; use "
                    "fewer shots.")
  return order[:k]


def text_encoder(vocabulary: Any = None) -> Callable[[str], list[int]]:
  """text -> token ids. `vocabulary`: None (the configured vocabulary, stmoe.data.vocab), the path of a
  SentencePiece model, a SentencePieceProcessor, or anything with `encode(text) -> ids` (seqio)."""
  if vocabulary is None:
    from stmoe.data.vocab import resolve_vocabulary_path

    vocabulary = resolve_vocabulary_path()
  if isinstance(vocabulary, str):
    import sentencepiece as spm

    from stmoe.data.vocab import check_special_ids

    check_special_ids(vocabulary)  # T5 ids, else a UserError that says how to fix the vocabulary
    processor = spm.SentencePieceProcessor()
    processor.Load(vocabulary)
    vocabulary = processor
  if hasattr(vocabulary, "EncodeAsIds"):
    return lambda text: [int(i) for i in vocabulary.EncodeAsIds(text)]
  if hasattr(vocabulary, "encode"):
    return lambda text: [int(i) for i in vocabulary.encode(text)]
  raise TypeError(f"vocabulary must be a path, a SentencePieceProcessor or have .encode(text); got {vocabulary!r}.")


@dataclasses.dataclass
class _Query:
  """One example ready to score: its (possibly cut) prompt ids and each candidate's ids."""

  prompt: list[int]
  candidates: list[list[int]]
  truncated: bool
  demonstrations: list[int]


def _fit_prompt(prompt: list[int], longest_candidate: int, max_length: int,
                decoder_only: bool) -> tuple[list[int], bool]:
  """Drops prompt tokens from the left until the row fits (see the module doc, item 7)."""
  budget = max_length - longest_candidate if decoder_only else max_length - 1  # enc-dec: room for EOS
  if budget < 1:
    raise UserError(f"a candidate of {longest_candidate} tokens leaves no room for a prompt in "
                    f"max_length={max_length} tokens; raise max_length (--max_length).")
  if len(prompt) <= budget:
    return prompt, False
  return prompt[len(prompt) - budget:], True


def _round_width(n: int, max_length: int) -> int:
  return min(max_length, -(-max(n, 1) // WIDTH_MULTIPLE) * WIDTH_MULTIPLE)


def _decoder_only_rows(rows: Sequence[tuple[list[int], list[int]]], width: int,
                       prefix_attention: bool) -> dict[str, np.ndarray]:
  """(prompt ids, candidate ids) rows -> decoder-only features [rows, width] (see the module doc, item 4)."""
  n = len(rows)
  targets = np.zeros((n, width), np.int32)  # [rows, width]
  weights = np.zeros((n, width), np.float32)
  causal = np.zeros((n, width), np.int32)
  for i, (prompt, candidate) in enumerate(rows):
    seq = prompt + candidate
    targets[i, :len(seq)] = seq
    weights[i, len(prompt):len(seq)] = 1.0
    causal[i, :len(prompt) + 1] = 1  # the start token and the prompt (seqio's prefix-LM convention)
  inputs = np.zeros_like(targets)
  inputs[:, 1:] = targets[:, :-1]  # shifted right behind the start token 0
  batch = {"decoder_input_tokens": inputs, "decoder_target_tokens": targets, "decoder_loss_weights": weights}
  if prefix_attention:
    batch["decoder_causal_attention"] = causal
  return batch


def _encoder_decoder_rows(rows: Sequence[tuple[list[int], list[int]]], enc_width: int,
                          dec_width: int) -> dict[str, np.ndarray]:
  """(prompt ids, candidate ids) rows -> encoder-decoder features (encoder gets prompt + EOS)."""
  n = len(rows)
  enc = np.zeros((n, enc_width), np.int32)  # [rows, enc_width]
  targets = np.zeros((n, dec_width), np.int32)  # [rows, dec_width]
  for i, (prompt, candidate) in enumerate(rows):
    enc[i, :len(prompt) + 1] = prompt + [EOS_ID]
    targets[i, :len(candidate)] = candidate
  inputs = np.zeros_like(targets)
  inputs[:, 1:] = targets[:, :-1]
  return {"encoder_input_tokens": enc, "decoder_input_tokens": inputs, "decoder_target_tokens": targets,
          "decoder_loss_weights": (targets > 0).astype(np.float32)}


@functools.lru_cache(maxsize=16)
def _jitted_score(model: Any) -> Callable:
  import jax

  return jax.jit(model.score_batch)


def _score_rows(model: Any, params: Any, features: dict[str, np.ndarray], batch_size: int,
                progress: str | None) -> np.ndarray:
  """score_batch over the rows in batches of batch_size (the last one padded with empty rows) -> [rows]."""
  import jax

  score = _jitted_score(model)
  n = len(next(iter(features.values())))
  out = []
  t0 = time.time()
  num_batches = -(-n // batch_size)
  for b, start in enumerate(range(0, n, batch_size)):
    batch = {k: v[start:start + batch_size] for k, v in features.items()}
    pad = batch_size - len(batch["decoder_target_tokens"])
    if pad:
      batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
    out.append(np.asarray(jax.device_get(score(params, batch)), np.float64)[:batch_size - pad])
    if progress and (sys.stderr.isatty() or b + 1 == num_batches):
      sys.stderr.write(f"\r[{progress}] batch {b + 1}/{num_batches} ({time.time() - t0:.0f}s)")
      sys.stderr.write("\n" if b + 1 == num_batches else "")
      sys.stderr.flush()
  return np.concatenate(out) if out else np.zeros((0,), np.float64)


def _first_argmax(values: Sequence[float]) -> int:
  """Index of the largest value; the lowest index among equal ones."""
  best = max(values)
  return next(i for i, v in enumerate(values) if v == best)


def _check_ids(queries: Sequence[_Query], model: Any) -> None:
  largest = max(max(q.prompt + [c for cand in q.candidates for c in cand] + [0]) for q in queries)
  vocab_size = int(model.config.vocab_size)
  if largest >= vocab_size:
    raise UserError(f"the vocabulary produces token id {largest} but the model has only {vocab_size} ids "
                    "(ModelConfig.vocab_size): use the vocabulary the model was trained with (an export's "
                    "vocab.model, or VOCABULARY_PATH / $STMOE_VOCABULARY_PATH).")


def _validate(shots: Sequence[int], batch_size: int, max_length: int, seed: int,
              max_examples: int | None) -> list[int]:
  ks = [int(k) for k in shots]
  if not ks or any(k < 0 for k in ks) or any(int(k) != k for k in shots):
    raise UserError(f"shots must be non-negative integers such as 0,1,4; got {list(shots)!r}.")
  if batch_size < 1:
    raise UserError(f"batch_size must be at least 1, got {batch_size}.")
  if max_length < 2:
    raise UserError(f"max_length must be at least 2 tokens, got {max_length}.")
  if seed < 0:
    raise UserError(f"seed must be a non-negative integer, got {seed}.")
  if max_examples is not None and max_examples < 1:
    raise UserError(f"max_examples must be at least 1, got {max_examples}.")
  return list(dict.fromkeys(ks))  # in the order given, without repeats


def _score_queries(model: Any, params: Any, queries: Sequence[_Query], *, decoder_only: bool, prefix: bool,
                   batch_size: int, max_length: int, label: str | None) -> list[list[float]]:
  """Each query's candidate scores; candidates with identical tokens share one row (and so one score)."""
  _check_ids(queries, model)
  rows: list[tuple[list[int], list[int]]] = []
  row_of: list[list[int]] = []  # [query][candidate] -> row
  for q in queries:
    seen: dict[tuple[int, ...], int] = {}
    for cand in q.candidates:
      if tuple(cand) not in seen:
        seen[tuple(cand)] = len(rows)
        rows.append((q.prompt, cand))
    row_of.append([seen[tuple(c)] for c in q.candidates])
  if decoder_only:
    width = _round_width(max(len(p) + len(c) for p, c in rows), max_length)
    features = _decoder_only_rows(rows, width, prefix)
  else:
    enc_width = _round_width(max(len(p) + 1 for p, _ in rows), max_length)
    dec_width = _round_width(max(len(c) for _, c in rows), 1 << 30)
    features = _encoder_decoder_rows(rows, enc_width, dec_width)
  row_scores = _score_rows(model, params, features, batch_size, label)
  return [[float(row_scores[r]) for r in rows_of_query] for rows_of_query in row_of]


def evaluate_priming(model: Any, params: Any, task: str, *, split: str = "validation",
                     shots: Sequence[int] = (0,), seed: int = 0, max_examples: int | None = None,
                     batch_size: int = 32, max_length: int = 512, vocabulary: Any = None,
                     append_eos: bool | None = None, prefix_attention: bool | None = None,
                     progress: bool = False) -> dict[str, Any]:
  """Priming accuracy of `model` on `task`/`split` for each k in `shots` (see the module doc).

  Returns {"task", "split", "seed", "max_length", "append_eos", "prefix_attention", "model_type",
  "shots": {k: {"accuracy", "accuracy_length_normalized", "accuracy_calibrated", "num_examples",
  "num_truncated", "chance", "seconds"}}, "records": [one per example and k: {"task", "split", "shots",
  "index", "label", "prediction", "prediction_length_normalized", "prediction_calibrated", "correct",
  "scores", "scores_unconditional", "num_candidate_tokens", "truncated", "demonstrations"}]}; chance is
  the mean of 1 / number of candidates.
  """
  from stmoe.training import layout

  ks = _validate(shots, batch_size, max_length, seed, max_examples)
  priming_task(task)  # an unknown task fails before anything is read
  examples = priming_examples(task, split)
  if max_examples is not None:
    examples = examples[:max_examples]
  pool, same_split = demonstration_pool(task, split) if max(ks) > 0 else ([], False)
  encode = text_encoder(vocabulary)
  decoder_only = layout.model_type_of(model) == "decoder_only"
  eos = (not decoder_only) if append_eos is None else bool(append_eos)
  prefix = bool(getattr(model.config, "prefix_lm", False)) if prefix_attention is None else bool(prefix_attention)
  prefix = prefix and decoder_only
  candidate_ids = []
  for i, ex in enumerate(examples):
    ids = [encode(c) + ([EOS_ID] if eos else []) for c in ex.candidates]
    if any(not c for c in ids):
      raise UserError(f"{task}/{split} example {i} has a candidate with no tokens: {ex.candidates!r}.")
    candidate_ids.append(ids)
  score = functools.partial(_score_queries, model, params, decoder_only=decoder_only, prefix=prefix,
                            batch_size=batch_size, max_length=max_length)
  for ids in candidate_ids:
    _fit_prompt([], max(map(len, ids)), max_length, decoder_only)  # a candidate too long fails here
  # The candidates' unconditional scores (empty prompt), for the calibrated metric: the same for every k.
  unconditional = score([_Query([], ids, False, []) for ids in candidate_ids],
                        label=f"{task} unconditional" if progress else None)

  result: dict[str, Any] = {"task": task, "split": split, "seed": seed, "max_length": max_length,
                            "append_eos": eos, "prefix_attention": prefix,
                            "model_type": "decoder_only" if decoder_only else "encoder_decoder",
                            "shots": {}, "records": []}
  for k in ks:
    t0 = time.time()
    queries = []
    for i, ex in enumerate(examples):
      demos = sample_demonstrations(len(pool), k, seed=seed, example_index=i, exclude=i if same_split else None)
      prompt = encode(build_prompt([pool[d] for d in demos], ex))
      prompt, cut = _fit_prompt(prompt, max(len(c) for c in candidate_ids[i]), max_length, decoder_only)
      queries.append(_Query(prompt, candidate_ids[i], cut, demos))
    all_scores = score(queries, label=f"{task} k={k}" if progress else None)

    correct, correct_norm, correct_cal = [], [], []
    for i, (ex, q, scores) in enumerate(zip(examples, queries, all_scores)):
      lengths = [len(c) for c in q.candidates]
      pred = _first_argmax(scores)
      pred_norm = _first_argmax([s / n for s, n in zip(scores, lengths)])
      pred_cal = _first_argmax([s - u for s, u in zip(scores, unconditional[i])])
      correct.append(pred == ex.label)
      correct_norm.append(pred_norm == ex.label)
      correct_cal.append(pred_cal == ex.label)
      result["records"].append({"task": task, "split": split, "shots": k, "index": i, "label": ex.label,
                                "prediction": pred, "prediction_length_normalized": pred_norm,
                                "prediction_calibrated": pred_cal, "correct": pred == ex.label,
                                "scores": scores, "scores_unconditional": unconditional[i],
                                "num_candidate_tokens": lengths, "truncated": q.truncated,
                                "demonstrations": q.demonstrations})
    result["shots"][k] = {"accuracy": float(np.mean(correct)),
                          "accuracy_length_normalized": float(np.mean(correct_norm)),
                          "accuracy_calibrated": float(np.mean(correct_cal)),
                          "num_examples": len(examples), "num_truncated": sum(q.truncated for q in queries),
                          "chance": float(np.mean([1.0 / len(ex.candidates) for ex in examples])),
                          "seconds": time.time() - t0}
  return result
