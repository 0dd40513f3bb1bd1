"""`stmoe compile`: compile the train step of `stmoe train` ahead of time for a TPU pod (or CPU devices).

    stmoe compile --gin_file models/st_moe_base.gin --gin_file partitioning/expert_parallel.gin \
        --topology v5p:4x4x4 --gin.NUM_EXPERT_PARTITIONS=8 --gin.BATCH_SIZE=256 --json st_moe_base.json
    stmoe compile --gin_file models/st_moe_tiny.gin --topology cpu:8 --gin.NUM_EXPERT_PARTITIONS=4

The same gin files as `stmoe train` (runs/pretrain.gin is added when no runs/ file is given, so its
macros BATCH_SIZE, TASK_FEATURE_LENGTHS, NUM_MICROBATCHES ... apply). Nothing is materialised and no data
is read: the step is lowered from abstract shapes on a mesh of the topology's devices and compiled.
Prints per-chip memory (parameters, optimizer state, temporaries, total vs the chip's HBM), compile time,
the compiler's FLOPs vs the model's, and every collective by kind; exits 1 when the step does not fit,
saying what to change. TPU topologies need libtpu: pip install 'stmoe[tpu]'.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from stmoe import gin_utils
from stmoe.errors import UserError, run_command

GIB = 2 ** 30


def main(argv: list[str] | None = None) -> int:
  """`stmoe compile`: AOT-compile the train step for a topology and report memory, FLOPs, collectives."""
  return run_command("stmoe compile", _main, list(argv or []))


def _gin_files(files: list[str]) -> list[str]:
  """The user's gin files, with runs/pretrain.gin after the first one when no runs/ file is given."""
  if any(f.replace("\\", "/").split("/")[-2:-1] == ["runs"] for f in files):
    return files
  return files[:1] + ["runs/pretrain.gin"] + files[1:]


def _main(argv: list[str]) -> int:
  # Compiling for a described topology never touches a TPU, so another process that holds libtpu (a training
  # run or a second compile on this host) must not make the load fail on libtpu's single-process lock file.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  parser = argparse.ArgumentParser(prog="stmoe compile", description=main.__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--topology", required=True,
                      help="v4:AxBxC, v5e:AxB, v5p:AxBxC, v6e:AxB (TPU, needs libtpu) or cpu:N (simulated devices)")
  parser.add_argument("--json", default=None, help="also write the report as JSON here")
  parser.add_argument("--show_all_gathers", type=int, default=10, help="list this many all-gathers")
  gin_utils.add_gin_flags(parser)
  args, bindings = gin_utils.parse_known_gin_args(parser, argv)
  if not args.gin_file:
    raise UserError("pass the model's gin file, e.g. --gin_file models/st_moe_tiny.gin (and the partitioning "
                    "and run files you train with).")
  kind, _, n = args.topology.partition(":")
  # This host only compiles: jax runs on its CPU (libtpu describes TPU topologies without a TPU backend).
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if kind == "cpu" and "jax" not in sys.modules:  # simulated devices must be requested before jax starts
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
      os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={int(n or 1)}".strip()
  import stmoe.training.trainer  # noqa: F401  (registers train and its run-file configurables)
  gin_utils.parse_gin(_gin_files(list(args.gin_file)), bindings, args.gin_search_paths)

  from stmoe import partitioning
  from stmoe.models.info import model_facts
  from stmoe.training import aot, setup as setup_lib, trainer

  devices, generation = aot.topology_devices(args.topology)
  mesh = partitioning.make_mesh(devices=devices)
  model = setup_lib.default_model()
  step = trainer.train(model, mesh=mesh, compile_only=True)
  lengths = step.setup.task_feature_lengths
  facts = model_facts(model, lengths.get("inputs", 0), lengths["targets"])
  tokens = step.setup.batch_size * (lengths.get("inputs", 0) + lengths["targets"])
  report = aot.analyse(step, hbm_gib=aot.HBM_GIB.get(generation), model_flops_per_step=facts.flops_per_token * tokens,
                       peak_flops_per_chip=aot.PEAK_BF16_FLOPS.get(generation))
  report.update(topology=args.topology, device_kind=str(getattr(devices[0], "device_kind", generation)),
                total_params=facts.total_params)
  _print(report, args.show_all_gathers)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=1, default=str)
    print(f"stmoe compile: wrote {args.json}")
  if report["fits"] is False:
    print(f"stmoe compile: error: does not fit: {aot.advice(report)}", file=sys.stderr)
    return 1
  return 0


def _print(report: dict, show: int) -> None:
  mem = report["memory_per_chip_bytes"]
  hbm = report["hbm_per_chip_bytes"]
  print(f"topology {report['topology']} ({report['num_devices']} x {report['device_kind']}), mesh {report['mesh']}, "
        f"global batch {report['batch_size']} x {report['task_feature_lengths']}, compiled in "
        f"{report['compile_seconds']:.1f}s")
  print("per chip: " + ", ".join(f"{k} {v / GIB:.3f} GiB" for k, v in mem.items() if k not in ("aliased",))
        + (f" of {hbm / GIB:.0f} GiB HBM ({'fits' if report['fits'] else 'DOES NOT FIT'})" if hbm else ""))
  ratio = report["compiler_vs_model_flops"]
  print(f"FLOPs per step: compiler {report['compiler_flops_per_chip'] * report['num_devices']:.4g} (all chips), "
        f"model {report['model_flops_per_step']:.4g}" + (f" (ratio {ratio:.2f})" if ratio else ""))
  for name, p in report["projected"].items():
    print(f"at {float(name[4:]):.0%} MFU of {report['peak_bf16_flops_per_chip'] / 1e12:.0f} TFLOP/s bf16 per chip: "
          f"{p['step_seconds']:.3f} s per step, {p['tokens_per_second']:,.0f} tokens/s")
  print("collectives: " + ", ".join(f"{k} {v['count']} ({v['bytes'] / 2**20:.1f} MiB)"
                                    for k, v in report["collectives"].items()))
  for op in report["all_gathers"][:show]:
    flag = "  <- EXPERT PARAMETERS GATHERED (sharding bug)" if op["expert_parameter"] else ""
    print(f"  all-gather {op['bytes'] / 2**20:.2f} MiB  {op['op_name'] or op['name']}{flag}")
  if len(report["all_gathers"]) > show:
    print(f"  ... {len(report['all_gathers']) - show} more all-gathers (--show_all_gathers N)")
