"""The quickstart workflow (`stmoe quickstart`, stmoe/cli/quickstart.py): the whole ST-MoE workflow on
bundled real data, on a CPU, in minutes.

    stmoe quickstart [--output_dir DIR] [--fast] [--gin.NAME=VALUE ...]

1. vocabulary: the bundled SentencePiece vocabulary (trained once on the Shakespeare + Wikipedia train
   splits, then cached in ~/.cache/stmoe);
2. pretrain a tiny ST-MoE (top-2 routing, router z-loss, GEGLU experts) with span corruption on the
   Shakespeare plays (shakespeare_span_corruption; the six validation plays are held out);
3. fine-tune it on shakespeare_genre (80-word passage -> comedy / history / tragedy) with the ST-MoE
   recipe: constant learning rate, dropout 0.1, higher expert dropout, optimizer state kept;
4. evaluate accuracy on the passages of the six unseen plays next to the majority-class baseline;
5. export the final parameters (`stmoe export` format) and plot the curves and the expert load.

Everything goes under DIR (default ./stmoe_quickstart): pretrain/, finetune/ (MODEL_DIRs with checkpoints,
metrics.jsonl, TensorBoard, config.gin), export/, quickstart.png, predictions.jsonl, summary.json.
The settings live in gin/runs/quickstart.gin (and runs/quickstart_fast.gin for --fast); docs/quickstart.md
lists the equivalent `stmoe vocab/train/infer/export` commands to rerun each step on its own.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Mapping, Sequence

import gin

SUMMARY_FILE = "summary.json"
PLOT_FILE = "quickstart.png"


def _stage(name: str) -> None:
  print(f"\n=== {name} ===", flush=True)


def _pretrain_first_final(losses: Mapping[int, float], window: int) -> tuple[float, float]:
  steps = sorted(losses)
  first = losses[steps[0]]
  tail = [losses[s] for s in steps[-window:]]
  return float(first), float(sum(tail) / len(tail))


def _scalars_mean(records: Sequence[dict], key: str, last: int) -> float | None:
  vals = [r[key] for r in records if isinstance(r.get(key), (int, float))]
  return float(sum(vals[-last:]) / len(vals[-last:])) if vals else None


def format_table(rows: Sequence[tuple[str, str]]) -> str:
  width = max(len(k) for k, _ in rows)
  vwidth = max(60, max(len(v) for _, v in rows))
  line = "+" + "-" * (width + 2) + "+" + "-" * (vwidth + 2) + "+"
  out = [line]
  for k, v in rows:
    out.append(f"| {k.ljust(width)} | {v.ljust(vwidth)} |")
  out.append(line)
  return "\n".join(out)


@gin.configurable
def run_quickstart(output_dir: str = "stmoe_quickstart",
                   *,
                   pretrain_task: str = "shakespeare_span_corruption",
                   finetune_task: str = "shakespeare_genre",
                   pretrain_steps: int = 300,
                   finetune_steps: int = 300,
                   pretrain_batch_size: int = 32,
                   finetune_batch_size: int = 32,
                   pretrain_feature_lengths: Mapping[str, int] = gin.REQUIRED,
                   finetune_feature_lengths: Mapping[str, int] = gin.REQUIRED,
                   pretrain_learning_rate: float = 0.01,
                   finetune_learning_rate: float = 1e-3,
                   finetune_dropout_rate: float = 0.1,
                   finetune_expert_dropout_rate: float = 0.2,
                   trainable_params: str = "all",
                   restore_optimizer_state: bool = True,
                   finetune_eval_period: int = 100,
                   eval_batch_size: int = 64,
                   max_eval_examples: int | None = None,
                   log_period: int = 10,
                   random_seed: int = 0,
                   progress: bool = True) -> dict[str, Any]:
  """Runs vocab -> pretrain -> fine-tune -> evaluate -> export -> plot; returns (and writes) the summary.

  Args:
    output_dir: where everything goes.
    pretrain_steps / finetune_steps: steps of each stage (fine-tuning counts from the pretrained step).
    *_feature_lengths: {"inputs", "targets"} token lengths of each stage.
    pretrain_learning_rate: constant Adafactor learning rate of pretraining (T5's rsqrt schedule is flat
      at 0.01 for its 10k warm-up steps, so a short run is a constant-0.01 run).
    finetune_learning_rate, finetune_dropout_rate, finetune_expert_dropout_rate, trainable_params,
      restore_optimizer_state: the ST-MoE fine-tuning recipe (gin/runs/finetune.gin).
    finetune_eval_period: decode the validation split every this many fine-tuning steps (and at the end).
    max_eval_examples: evaluate on the first N validation passages only (None: all of them).
  """
  from stmoe.checkpoints import export as export_lib
  from stmoe import gin_utils, plots
  from stmoe.data import vocab as vocab_lib
  from stmoe.models.api import make_model
  from stmoe.evaluation import task_metrics as task_eval
  from stmoe.training import finetune, optimizers, schedules, trainer

  t_start = time.time()
  output_dir = os.path.abspath(os.path.expanduser(output_dir))
  os.makedirs(output_dir, exist_ok=True)
  timings: dict[str, float] = {}
  model = gin_utils.configured_model()
  config = model.config
  operative = gin.config_str()

  # 1. vocabulary ----------------------------------------------------------------------------------------
  _stage("1/5 vocabulary")
  t0 = time.time()
  vocab_path = vocab_lib.resolve_vocabulary_path()
  vocab_lib.check_vocab_matches_model(vocab_lib.vocabulary_size(vocab_path), config.vocab_size)
  timings["vocab"] = time.time() - t0
  print(f"vocabulary {vocab_path} ({vocab_lib.vocabulary_size(vocab_path)} ids) in {timings['vocab']:.1f}s")

  # 2. pretraining ---------------------------------------------------------------------------------------
  _stage(f"2/5 pretrain a tiny ST-MoE on {pretrain_task} ({pretrain_steps} steps)")
  t0 = time.time()
  pre_dir = os.path.join(output_dir, "pretrain")
  pre = trainer.train(model, model_dir=pre_dir, train_steps=pretrain_steps, batch_size=pretrain_batch_size,
                      task_feature_lengths=dict(pretrain_feature_lengths), mixture_or_task_name=pretrain_task,
                      optimizer=optimizers.adafactor(learning_rate=schedules.constant(pretrain_learning_rate)),
                      random_seed=random_seed, checkpoint_period=pretrain_steps, keep_checkpoints=1,
                      log_period=log_period, eval_period=pretrain_steps, eval_steps=4, progress=progress)
  timings["pretrain"] = time.time() - t0
  pre_records = plots.read_metrics(pre_dir)
  first_loss, final_loss = _pretrain_first_final(pre.losses, window=log_period) if pre.losses else (
      _scalars_mean(pre_records, "loss", 10**9), _scalars_mean(pre_records, "loss", 1))
  pre_tps = _scalars_mean(pre_records, "tokens_per_second", 5)

  # 3. fine-tuning ---------------------------------------------------------------------------------------
  start = int(pre.step) if restore_optimizer_state else 0
  _stage(f"3/5 fine-tune on {finetune_task} ({finetune_steps} steps, trainable: {trainable_params})")
  t0 = time.time()
  ft_config = dataclasses.replace(
      config, dropout_rate=finetune_dropout_rate,
      moe=dataclasses.replace(config.moe, expert_dropout=finetune_expert_dropout_rate) if config.moe else None)
  ft_model = make_model(ft_config)
  ft_dir = os.path.join(output_dir, "finetune")
  eval_cb = finetune.TaskEvalCallback(task=finetune_task, split="validation",
                                      task_feature_lengths=dict(finetune_feature_lengths),
                                      batch_size=eval_batch_size, metric="accuracy", mode="max",
                                      max_examples=max_eval_examples)
  ft = trainer.train(ft_model, model_dir=ft_dir, train_steps=start + finetune_steps,
                     batch_size=finetune_batch_size, task_feature_lengths=dict(finetune_feature_lengths),
                     mixture_or_task_name=finetune_task,
                     optimizer=finetune.finetune_optimizer(finetune_learning_rate, trainable_params),
                     random_seed=random_seed, checkpoint_period=finetune_eval_period, keep_checkpoints=1,
                     log_period=log_period, init_checkpoint=pre_dir,
                     restore_optimizer_state=restore_optimizer_state, callbacks=[eval_cb], progress=progress)
  timings["finetune"] = time.time() - t0
  ft_records = plots.read_metrics(ft_dir)
  ft_tps = _scalars_mean(ft_records, "tokens_per_second", 5)

  # 4. evaluation ----------------------------------------------------------------------------------------
  _stage("4/5 evaluate on the unseen plays")
  t0 = time.time()
  train_labels = task_eval.task_targets(finetune_task, "train")
  eval_labels = task_eval.task_targets(finetune_task, "validation")
  if max_eval_examples is not None:
    eval_labels = eval_labels[:max_eval_examples]
  # The majority-class baseline: the best constant prediction on the evaluated passages (at least as
  # strong as always predicting the most frequent training label, which is also recorded).
  train_majority_label, train_majority_acc = task_eval.majority_baseline(train_labels, eval_labels)
  majority_label, majority_acc = task_eval.majority_baseline(eval_labels, eval_labels)
  # Predictions of the final parameters (the ones exported), decoded once more for the record.
  result = task_eval.run_task_eval(ft_model, ft.state["params"], finetune_task, "validation",
                                   dict(finetune_feature_lengths), batch_size=eval_batch_size,
                                   max_examples=max_eval_examples, progress=progress)
  predictions_path = task_eval.write_predictions(os.path.join(output_dir, "predictions.jsonl"), result.records())
  timings["evaluate"] = time.time() - t0
  accuracy = result.metrics["accuracy"] / 100.0  # seqio/T5 metric fns report accuracy in percent
  print(f"accuracy {accuracy:.4f} on {result.num_examples} passages of unseen plays; "
        f"majority class ({majority_label!r}) {majority_acc:.4f}")

  # 5. export + plot -------------------------------------------------------------------------------------
  _stage("5/5 export and plot")
  t0 = time.time()
  export_dir = export_lib.export(ft_dir, os.path.join(output_dir, "export"))
  plot_path = plots.training_plot(os.path.join(output_dir, PLOT_FILE), pre_records, ft_records,
                                  baseline=majority_acc, accuracy_scale=0.01,
                                  title=f"stmoe quickstart: tiny ST-MoE, {pretrain_steps} pretraining + "
                                        f"{finetune_steps} fine-tuning steps")
  timings["export_and_plot"] = time.time() - t0
  seconds = time.time() - t_start
  best = finetune.read_best(ft_dir)
  summary = {
      "pretrain_first_loss": first_loss,
      "pretrain_final_loss": final_loss,
      "pretrain_eval_loss": pre.eval_scalars.get("eval/loss"),
      "pretrain_steps": int(pretrain_steps),
      "pretrain_tokens_per_second": pre_tps,
      "finetune_steps": int(finetune_steps),
      "finetune_first_loss": ft.losses[min(ft.losses)] if ft.losses else None,
      "finetune_final_loss": _scalars_mean(ft_records, "loss", 1),
      "finetune_tokens_per_second": ft_tps,
      "finetune_accuracy": float(accuracy),
      "finetune_accuracy_history": {str(s): m["accuracy"] / 100.0 for s, m in eval_cb.history},
      "best_accuracy": None if best is None else best["value"] / 100.0,
      "best_step": None if best is None else best.get("step"),
      "majority_baseline_accuracy": majority_acc,
      "majority_label": majority_label,
      "train_majority_label": train_majority_label,
      "train_majority_label_accuracy": train_majority_acc,
      "num_eval_examples": result.num_examples,
      "trainable_params": trainable_params,
      "seconds": seconds,
      "stage_seconds": timings,
      "vocab_path": vocab_path,
      "pretrain_dir": pre_dir,
      "finetune_dir": ft_dir,
      "best_checkpoint": os.path.join(ft_dir, finetune.BEST_SUBDIR) if best else None,
      "export_path": export_dir,
      "plot_path": plot_path,
      "predictions_path": predictions_path,
      "num_parameters": export_lib.num_parameters(ft.state["params"]),
      "devices": _device_description(),
  }
  task_eval.write_results(os.path.join(output_dir, SUMMARY_FILE), summary)
  with open(os.path.join(output_dir, "quickstart_config.gin"), "w", encoding="utf-8") as f:
    f.write(operative)
  rows = [
      ("pretraining loss", f"{first_loss:.3f} -> {final_loss:.3f} ({pretrain_steps} steps)"),
      ("fine-tuning loss", f"{summary['finetune_first_loss']:.3f} -> {summary['finetune_final_loss']:.3f} "
                           f"({finetune_steps} steps)"),
      ("accuracy (unseen plays)", f"{summary['finetune_accuracy']:.4f} on {result.num_examples} passages"),
      ("majority baseline", f"{majority_acc:.4f} (always {majority_label!r})"),
      ("tokens/s", f"pretrain {pre_tps or 0:,.0f}, fine-tune {ft_tps or 0:,.0f}"),
      ("time", f"{seconds:.0f}s (" + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items() if v >= 1) + ")"),
      ("parameters", f"{summary['num_parameters']:,}"),
      ("pretrained checkpoint", pre_dir),
      ("fine-tuned checkpoint", ft_dir),
      ("export", export_dir),
      ("plot", plot_path),
      ("predictions", predictions_path),
      ("summary", os.path.join(output_dir, SUMMARY_FILE)),
  ]
  print("\n" + format_table(rows), flush=True)
  return summary


def _device_description() -> str:
  import jax

  return f"{jax.device_count()} x {jax.devices()[0].platform} ({os.cpu_count()} CPUs visible)"
