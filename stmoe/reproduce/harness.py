"""The reproduction harness behind `stmoe reproduce NAME`: configure, guard the output directory, run, report.

    stmoe reproduce NAME [--fast] [--seeds N] --output_dir DIR [--gin_file F] [--gin.NAME=VALUE ...]

1. gin: `gin/experiments/NAME.gin` (with --fast also `gin/experiments/fast/NAME.gin`, which includes the
   default file and shrinks the budget), then the user's files and bindings. The experiment is a plain
   gin-configurable function, so `--gin.NAME.train_steps=20000` scales it up on an accelerator.
2. DIR/experiment.json records the experiment, the seeds, --fast and the operative gin config. Rerunning
   the same command resumes: runs that finished are read back, unfinished ones resume from their newest
   checkpoint. A DIR that holds another experiment or another configuration is refused (nothing in it is
   touched); choose a new --output_dir.
3. The experiment returns a `Report`; DIR/results.json (every number, the config, seeds, hardware, wall
   time), DIR/results.md (the markdown tables with the paper's numbers beside ours) and the PNG plots are
   written atomically.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import platform
import sys
import time
from typing import Any, Sequence

from stmoe.errors import UserError
from stmoe.reproduce import EXPERIMENTS
from stmoe.reproduce.runs import write_json_atomic

RESULTS_FILE = "results.json"
TABLE_FILE = "results.md"
EXPERIMENT_FILE = "experiment.json"


@dataclasses.dataclass
class Table:
  """A markdown table: a title, column names and rows of already formatted cells."""
  title: str
  columns: list[str]
  rows: list[list[str]]

  def markdown(self) -> str:
    lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |",
             "|" + "|".join("---" for _ in self.columns) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in self.rows]
    return "\n".join(lines)


@dataclasses.dataclass
class Finding:
  """One claim of the paper, what we measured, and whether the toy scale reproduced it (None: inconclusive)."""
  claim: str
  paper: str
  ours: str
  reproduced: bool | None

  def verdict(self) -> str:
    return {True: "reproduced", False: "not reproduced", None: "inconclusive"}[self.reproduced]


@dataclasses.dataclass
class Report:
  """What an experiment returns: numbers for results.json, tables and plots for people."""
  summary: dict[str, Any]
  runs: list[dict[str, Any]]
  tables: list[Table]
  findings: list[Finding]
  plots: list[str] = dataclasses.field(default_factory=list)  # file names inside the output dir
  paper: dict[str, Any] = dataclasses.field(default_factory=dict)
  notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ExperimentContext:
  """What an experiment function is given: where to write, which seeds, and progress reporting."""
  name: str
  output_dir: str
  seeds: list[int]
  fast: bool = False
  progress: bool = True
  t_start: float = dataclasses.field(default_factory=time.time)

  def path(self, *parts: str) -> str:
    return os.path.join(self.output_dir, *parts)

  def stage(self, index: int, total: int, message: str) -> None:
    """One progress line per unit of work, with the elapsed time and a linear ETA."""
    elapsed = time.time() - self.t_start
    eta = "" if index == 0 else f", ETA {elapsed / index * (total - index):.0f}s"
    print(f"[{self.name}] {index + 1}/{total} {message} (elapsed {elapsed:.0f}s{eta})", flush=True)


def experiment_names() -> list[str]:
  return list(EXPERIMENTS)


def describe_experiments() -> str:
  width = max(len(n) for n in EXPERIMENTS)
  return "\n".join(f"  {n.ljust(width)}  {info.description}" for n, info in EXPERIMENTS.items())


def _check_name(name: str) -> None:
  if name not in EXPERIMENTS:
    import difflib

    close = difflib.get_close_matches(name, list(EXPERIMENTS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UserError(f"unknown experiment {name!r}.{hint} `stmoe reproduce --list` names them:\n"
                    f"{describe_experiments()}")


def experiment_gin_files(name: str, fast: bool) -> list[str]:
  return [f"experiments/fast/{name}.gin" if fast else f"experiments/{name}.gin"]


def configure(name: str, *, fast: bool, gin_files: Sequence[str] = (), bindings: Sequence[str] = (),
              search_paths: str = "") -> str:
  """Parses the experiment's gin (and the user's); returns the operative-to-be config text."""
  import gin

  from stmoe import gin_utils

  _check_name(name)
  importlib.import_module(EXPERIMENTS[name].module)  # registers its configurable
  gin_utils.parse_gin(experiment_gin_files(name, fast) + list(gin_files), list(bindings), search_paths)
  return gin.config_str()


def hardware() -> dict[str, Any]:
  """The machine an experiment ran on (results.json and docs/results.md quote it)."""
  import jax

  devices = jax.devices()
  return {"platform": devices[0].platform, "device_kind": devices[0].device_kind, "num_devices": len(devices),
          "cpu_count": os.cpu_count(), "machine": platform.machine(), "python": sys.version.split()[0],
          "jax": jax.__version__}


def _guard_output_dir(ctx: ExperimentContext, config_text: str) -> None:
  """Refuse a directory that holds another experiment or configuration; record ours otherwise."""
  record = {"experiment": ctx.name, "fast": ctx.fast, "seeds": ctx.seeds, "config": config_text, "invocations": []}
  path = ctx.path(EXPERIMENT_FILE)
  if os.path.exists(path):
    try:
      with open(path) as f:
        previous = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise UserError(f"{path} is unreadable ({e}); it is not ours to overwrite: choose a new --output_dir.") \
          from None
    if previous.get("experiment") != ctx.name or previous.get("fast") != ctx.fast \
        or previous.get("config") != config_text:
      what = ("experiment " + repr(previous.get("experiment"))) if previous.get("experiment") != ctx.name else \
          "a run with --fast" if previous.get("fast") and not ctx.fast else \
          "a run without --fast" if ctx.fast and not previous.get("fast") else "a run with another gin config"
      raise UserError(f"{ctx.output_dir} already holds {what}; rerunning there would mix results. Choose a "
                      f"new --output_dir (or rerun with exactly the same flags to resume that run).")
    # More seeds than last time extend the experiment: the finished seeds are reused.
    record["seeds"] = sorted(set(previous.get("seeds", [])) | set(ctx.seeds))
    record["invocations"] = previous.get("invocations", [])
  elif os.path.isdir(ctx.output_dir) and os.listdir(ctx.output_dir):
    raise UserError(f"{ctx.output_dir} exists and is not empty, but holds no {EXPERIMENT_FILE}: it is not an "
                    f"stmoe reproduce output directory. Choose a new or empty --output_dir.")
  os.makedirs(ctx.output_dir, exist_ok=True)
  write_json_atomic(path, record)


def run_experiment(name: str, output_dir: str, *, fast: bool = False, num_seeds: int | None = None,
                   gin_files: Sequence[str] = (), bindings: Sequence[str] = (), search_paths: str = "",
                   progress: bool = True) -> dict[str, Any]:
  """Configures and runs experiment `name` into `output_dir`; returns what results.json holds."""
  config_text = configure(name, fast=fast, gin_files=gin_files, bindings=bindings, search_paths=search_paths)
  if num_seeds is None:
    num_seeds = 1 if fast else 2
  if num_seeds < 1:
    raise UserError(f"--seeds {num_seeds}: run at least one seed (the reported spread needs two or more).")
  ctx = ExperimentContext(name=name, output_dir=os.path.abspath(os.path.expanduser(output_dir)),
                          seeds=list(range(num_seeds)), fast=fast, progress=progress)
  _guard_output_dir(ctx, config_text)
  module = importlib.import_module(EXPERIMENTS[name].module)
  report: Report = module.run(ctx)
  if fast:  # a smoke-test budget says nothing about the papers: no verdicts
    for f in report.findings:
      f.reproduced = None
    report.notes.insert(0, "--fast: a smoke-test budget that checks the code path and the output files; the "
                           "verdicts are 'inconclusive' by construction. Run without --fast for the science.")
  wall = time.time() - ctx.t_start
  total = _record_invocation(ctx, wall)
  results = {
      "experiment": name, "description": EXPERIMENTS[name].description, "fast": fast, "seeds": ctx.seeds,
      "config": config_text, "hardware": hardware(), "wall_time_s": wall, "total_wall_time_s": total,
      "summary": report.summary, "runs": report.runs, "paper": report.paper,
      "findings": [dataclasses.asdict(f) | {"verdict": f.verdict()} for f in report.findings],
      "tables": [dataclasses.asdict(t) for t in report.tables], "plots": report.plots, "notes": report.notes,
  }
  write_json_atomic(ctx.path(RESULTS_FILE), results)
  _write_text_atomic(ctx.path(TABLE_FILE), markdown_report(results, report))
  return results


def _record_invocation(ctx: ExperimentContext, wall: float) -> float:
  """Appends this invocation's wall time to experiment.json; returns the total over all invocations (a resumed
  experiment's cost is the sum of its sessions, not the last one, which may only read finished runs back)."""
  path = ctx.path(EXPERIMENT_FILE)
  with open(path) as f:
    record = json.load(f)
  record.setdefault("invocations", []).append({"started": time.strftime("%Y-%m-%dT%H:%M:%S",
                                                                        time.localtime(ctx.t_start)),
                                               "wall_time_s": wall, "seeds": ctx.seeds})
  write_json_atomic(path, record)
  return float(sum(i["wall_time_s"] for i in record["invocations"]))


def markdown_report(results: dict[str, Any], report: Report) -> str:
  """results.md: the command's facts, every table, the findings, the plots and the notes."""
  hw = results["hardware"]
  lines = [f"# {results['experiment']}", "", results["description"], "",
           f"- seeds: {results['seeds']}{' (--fast: a smoke-test budget, not science)' if results['fast'] else ''}",
           f"- hardware: {hw['cpu_count']} CPU cores, {hw['num_devices']} x {hw['device_kind']} ({hw['platform']}), "
           f"jax {hw['jax']}",
           f"- wall time: {results['total_wall_time_s']:.0f} s over all invocations (this one: "
           f"{results['wall_time_s']:.0f} s)", ""]
  for t in report.tables:
    lines += [t.markdown(), ""]
  if report.findings:
    lines += ["### Findings", "", "| paper's finding | paper | ours | verdict |", "|---|---|---|---|"]
    lines += [f"| {f.claim} | {f.paper} | {f.ours} | {f.verdict()} |" for f in report.findings]
    lines.append("")
  lines += [f"![{p}]({p})" for p in report.plots]
  if report.notes:
    lines += ["", "### Notes", ""] + [f"- {n}" for n in report.notes]
  return "\n".join(lines) + "\n"


def _write_text_atomic(path: str, text: str) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)
