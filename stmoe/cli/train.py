"""`stmoe train`: flags -> gin -> `train()` (pretraining or fine-tuning; resumes from MODEL_DIR).

    stmoe train --gin_file models/st_moe_tiny.gin --gin_file runs/pretrain.gin \
        --gin.MIXTURE_OR_TASK_NAME="'shakespeare_span_corruption'" --gin.TRAIN_STEPS=1000 --model_dir /tmp/run

Flags: --gin_file (repeatable), --gin.NAME=VALUE and --gin_bindings 'NAME=VALUE' (repeatable),
--gin_search_paths (the shipped gin/ folder is always searched), --model_dir (binds MODEL_DIR),
--coordinator_address/--num_processes/--process_id (multi-process), --no_progress, --debug.
Errors a user can fix (stmoe.errors.UserError: unknown gin names, impossible meshes, missing tasks, a
checkpoint that does not fit the model, ...) print one line and exit with status 2 instead of a traceback
(--debug shows it); a diverged run exits 1.
"""

from __future__ import annotations

from typing import Sequence

from stmoe.cli import common
from stmoe.errors import run_command

TRAIN_EXAMPLES = """examples:
  # pretrain a tiny ST-MoE with span corruption on the bundled Shakespeare text
  stmoe train --gin_file models/st_moe_tiny.gin --gin_file runs/pretrain.gin \\
      --gin.MIXTURE_OR_TASK_NAME="'shakespeare_span_corruption'" --gin.TRAIN_STEPS=200 \\
      --gin.BATCH_SIZE=16 "--gin.TASK_FEATURE_LENGTHS={'inputs': 128, 'targets': 32}" --model_dir /tmp/st_moe_tiny
  # a decoder-only top-2 MoE language model (the feature layout follows the model)
  stmoe train --gin_file models/moe_lm_tiny.gin --gin_file runs/pretrain.gin \\
      --gin.MIXTURE_OR_TASK_NAME="'shakespeare_lm'" "--gin.TASK_FEATURE_LENGTHS={'targets': 64}" --model_dir /tmp/lm
  # rerunning the same command resumes from the newest checkpoint in --model_dir

errors you can fix print one line and exit 2 (a diverged run: 1); --debug shows the traceback.
See docs/training.md ("What happens when things go wrong")."""


def main(argv: Sequence[str] | None = None) -> int:
  """`stmoe train`: parse flags and gin, print the config, run train() (which writes MODEL_DIR/config.gin
  only once everything validated)."""
  return run_command("stmoe train", _main, list(argv or []))


def _main(argv: list[str]) -> int:
  prog = "stmoe train"
  args = common.start_run(prog, "Train (pretrain or fine-tune) a model from gin files.", argv, TRAIN_EXAMPLES)
  import gin
  import jax

  from stmoe.training import finetune, trainer

  if jax.process_index() == 0:
    print("# gin config (the operative config is written to MODEL_DIR/config.gin once the run validated)")
    print(gin.config_str())
  # Hooks from gin (e.g. runs/finetune.gin: train_callbacks.callbacks = [@TaskEvalCallback()]).
  result = common.call_configured(trainer.train, progress=not args.no_progress,
                                  callbacks=finetune.train_callbacks())
  if jax.process_index() == 0:
    final = {k: v for k, v in result.last_scalars.items() if k in ("loss", "accuracy", "tokens_per_second")}
    print(f"{prog}: finished at step {result.step}: {final}")
  return 0
