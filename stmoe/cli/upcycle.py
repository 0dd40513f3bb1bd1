"""`stmoe upcycle`: start a sparse (MoE) model from a dense checkpoint (sparse upcycling).

    stmoe upcycle --checkpoint /tmp/dense_run --gin_file models/st_moe_tiny.gin --output_dir /tmp/upcycled \
        [--optimizer_state reset|carry] [--gin.NAME=VALUE ...]

--checkpoint: a dense stmoe checkpoint (MODEL_DIR, a step directory, MODEL_DIR/best, an export; the dense model
comes from its config.gin) or a Hugging Face T5 directory (config.json). The gin files describe the sparse
model (and, if they include a run file such as runs/pretrain.gin, the optimizer whose state is written;
default Adafactor). Writes OUTPUT_DIR/checkpoints/0 (checksums, config.gin): resume it with
`stmoe train --model_dir OUTPUT_DIR` and the same gin files, or use it as INIT_CHECKPOINT.
Semantics: stmoe.checkpoints.upcycle and docs/interop.md ("Sparse upcycling").
"""

from __future__ import annotations

import argparse

from stmoe import gin_utils
from stmoe.errors import run_command


def main(argv: list[str] | None = None) -> int:
  """`stmoe upcycle`: write a sparse model's step-0 checkpoint upcycled from a dense checkpoint."""
  return run_command("stmoe upcycle", _main, list(argv or []))


def _configured_optimizer():
  """The OptimizerDef bound to train.optimizer by the gin files (e.g. runs/pretrain.gin), else None."""
  import gin

  import stmoe.training.trainer  # noqa: F401  (registers train and the optimizers)

  try:
    ref = gin.query_parameter("train.optimizer")
  except ValueError:
    return None
  return ref.scoped_configurable_fn() if getattr(ref, "evaluate", False) else None


def _main(argv: list[str]) -> int:
  from stmoe.checkpoints import upcycle as upcycle_lib

  parser = argparse.ArgumentParser(prog="stmoe upcycle", description=main.__doc__)
  parser.add_argument("--checkpoint", required=True,
                      help="the dense model: an stmoe checkpoint path or a Hugging Face T5 directory")
  parser.add_argument("--output_dir", required=True, help="where to write the sparse step-0 checkpoint")
  parser.add_argument("--optimizer_state", default="reset", choices=upcycle_lib.OPTIMIZER_STATES,
                      help="reset: fresh optimizer state; carry: the dense one, expert slots repeated")
  parser.add_argument("--seed", type=int, default=0, help="seed of the router init and the train rng")
  parser.add_argument("--router_init_std", type=float, default=0.02,
                      help="std of the normal router init (0: zeros, uniform routing)")
  parser.add_argument("--extra_dense_mlp_init", default="zero_output", choices=upcycle_lib.EXTRA_DENSE_MLP_INITS,
                      help="ST-MoE extra dense MLP: zero_output (function-preserving) or copy")
  gin_utils.add_gin_flags(parser)
  args, bindings = gin_utils.parse_known_gin_args(parser, argv)
  gin_utils.parse_gin(args.gin_file, bindings, args.gin_search_paths)
  import gin

  with gin.config_scope("MODEL"):  # as stmoe.checkpoints.export.configure_model builds a model
    sparse_model = gin_utils.configured_model()
  step_dir = upcycle_lib.upcycle(args.checkpoint, sparse_model, args.output_dir,
                                 optimizer_state=args.optimizer_state, optimizer=_configured_optimizer(),
                                 seed=args.seed, router_init_std=args.router_init_std,
                                 extra_dense_mlp_init=args.extra_dense_mlp_init, config_text=gin.config_str())
  print(f"stmoe upcycle: wrote {step_dir} ({args.optimizer_state} optimizer state); train it with "
        f"stmoe train --model_dir {args.output_dir} and the same gin files.")
  return 0
