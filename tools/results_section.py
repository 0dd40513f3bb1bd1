"""Print the docs/results.md section of a finished `stmoe reproduce` output directory and copy its plots.

    python tools/results_section.py OUTPUT_DIR [--command "stmoe reproduce ..."] [--docs docs]

The section holds the command, hardware, wall time, every table, the findings with their verdicts and the
plots (copied to DOCS/results/NAME_<plot>.png), all read from OUTPUT_DIR/results.json, so the numbers in
the docs are the ones the experiment wrote. The interpretation around it is written by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil


def _wall(r: dict) -> float:
  return float(r.get("total_wall_time_s", r["wall_time_s"]))


def section(output_dir: str, command: str | None, docs: str) -> str:
  with open(os.path.join(output_dir, "results.json")) as f:
    r = json.load(f)
  name, hw = r["experiment"], r["hardware"]
  lines = [f"### Measured: `{name}`", "",
           f"- command: `{command or f'stmoe reproduce {name} --output_dir DIR'}`",
           f"- seeds: {r['seeds']}; hardware: {hw['cpu_count']} CPU cores ({hw['machine']}), "
           f"{hw['num_devices']} x {hw['device_kind']}, jax {hw['jax']}",
           f"- wall time: {_wall(r):.0f} s ({_wall(r) / 60:.1f} min)", ""]
  for t in r["tables"]:
    lines += [f"**{t['title']}**", "", "| " + " | ".join(t["columns"]) + " |",
              "|" + "|".join("---" for _ in t["columns"]) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in t["rows"]]
    lines.append("")
  if r["findings"]:
    lines += ["| paper's finding | paper | ours | verdict |", "|---|---|---|---|"]
    lines += [f"| {f['claim']} | {f['paper']} | {f['ours']} | **{f['verdict']}** |" for f in r["findings"]]
    lines.append("")
  os.makedirs(os.path.join(docs, "results"), exist_ok=True)
  for plot in r["plots"]:
    target = f"{name}_{plot}" if not plot.startswith(name) else plot
    shutil.copyfile(os.path.join(output_dir, plot), os.path.join(docs, "results", target))
    lines += [f"![{name}: {plot}](results/{target})", ""]
  if r.get("notes"):
    lines += [f"- {n}" for n in r["notes"]] + [""]
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("output_dir")
  parser.add_argument("--command", default=None)
  parser.add_argument("--docs", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                     "docs"))
  args = parser.parse_args()
  print(section(args.output_dir, args.command, args.docs))


if __name__ == "__main__":
  main()
