"""Print docs/scaling.md's table of published configs from `stmoe compile --json` reports.

    python tools/scaling_table.py REPORT.json [REPORT.json ...]

One markdown row per report, in the order given: model, topology, mesh, global batch, per-chip memory by
kind against the chip's HBM, collectives per step, compile time, model FLOPs per step, and the step time
and tokens/s projected at each MFU the report carries (`stmoe.training.aot.PROJECTED_MFUS`). Every number
is read from the report, so the docs hold what the compiler said; the model name is the report file's
stem up to its first "." (st_moe_32b.json -> st_moe_32b).
"""

from __future__ import annotations

import argparse
import json
import os

GIB = 2 ** 30
_SHORT = {"all-gather": "AG", "all-reduce": "AR", "reduce-scatter": "RS", "all-to-all": "A2A",
          "ragged-all-to-all": "RA2A", "collective-permute": "CP"}


def _gib(n: float) -> str:
  return f"{n / GIB:.1f}" if n >= 10 * GIB else f"{n / GIB:.2f}"


def _projection(r: dict) -> dict:
  """The projections of a report written before `stmoe compile` carried them (same formula)."""
  from stmoe.training import aot  # only needed for such older reports

  tokens = r["batch_size"] * sum(r["task_feature_lengths"].values())
  peak = aot.PEAK_BF16_FLOPS.get(r["topology"].split(":")[0])
  return aot.projection(r["model_flops_per_step"], tokens, r["num_devices"], peak)


def row(path: str) -> str:
  with open(path) as f:
    r = json.load(f)
  name = os.path.basename(path).split(".")[0]
  mesh = r["mesh"]
  lengths = r["task_feature_lengths"]
  mem = r["memory_per_chip_bytes"]
  hbm = r["hbm_per_chip_bytes"]
  memory = (f"{_gib(mem['parameters'])} / {_gib(mem['optimizer_state'])} / {_gib(mem['temporaries'])} / "
            f"**{_gib(mem['total'])}** of {hbm / GIB:.0f} ({mem['total'] / hbm:.0%})")
  colls = ", ".join(f"{v['count']} {_SHORT.get(k, k)} ({v['bytes'] / 2 ** 20:,.0f} MiB)"
                    for k, v in r["collectives"].items() if v["count"])
  expert_gathers = len(r.get("expert_parameter_all_gathers", []))
  if expert_gathers:
    colls += f"; **{expert_gathers} expert-parameter all-gathers**"
  proj = r.get("projected") or _projection(r)
  step = " / ".join(f"{p['step_seconds']:.2f} s" for p in proj.values())
  tps = " / ".join(f"{p['tokens_per_second'] / 1e6:.2f}M" for p in proj.values())
  batch = f"{r['batch_size']} x ({' + '.join(str(v) for v in lengths.values())})"
  return (f"| {name} | {r['topology']} ({r['num_devices']} chips) | {mesh['data']}, {mesh['expert']}, {mesh['model']} "
          f"| {batch} | {memory} | {colls} | {r['compile_seconds']:.0f} s | {r['model_flops_per_step']:.3g} "
          f"| {step} | {tps} |")


HEADER = ("| model | topology | mesh (data, expert, model) | global batch | per chip GiB: params / opt state / "
          "temporaries / **total** of HBM | collectives per step (static count, bytes) | compile | model FLOPs "
          "per step | step time at 40% / 55% MFU | tokens/s at 40% / 55% MFU |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("reports", nargs="+", help="`stmoe compile --json` outputs")
  args = parser.parse_args()
  print(HEADER)
  for path in args.reports:
    print(row(path))


if __name__ == "__main__":
  main()
