"""Reproductions of the papers' findings at toy scale (`stmoe reproduce NAME`; see docs/results.md).

Each experiment is a module here with a gin-configurable `run(ctx)` and a gin file
`gin/experiments/NAME.gin` holding its default budget (`gin/experiments/fast/NAME.gin`: the --fast budget).
The harness (stmoe.reproduce.harness) guards the output directory, runs it and writes results.json,
results.md and the plots. This module only names the experiments, so `stmoe reproduce --list` is instant.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ExperimentInfo:
  module: str
  description: str


EXPERIMENTS: dict[str, ExperimentInfo] = {
    "moe_vs_dense_lm": ExperimentInfo(
        "stmoe.reproduce.moe_vs_dense_lm",
        "Artetxe et al. 2021: top-2 decoder-only MoE LM vs its FLOP-matched dense LM; speedup in and out of domain"),
    "few_shot_priming": ExperimentInfo(
        "stmoe.reproduce.few_shot_priming",
        "Artetxe et al. 2021: zero/few-shot priming accuracy (k = 0, 1, 4) of the MoE and dense LMs"),
    "capacity_grid": ExperimentInfo(
        "stmoe.reproduce.capacity_grid",
        "ST-MoE Table 8 / Switch Table 1: top-1 vs top-2 at train capacity factors 0.75-2.0, eval at 2.0, vs dense"),
    "balance_losses": ExperimentInfo(
        "stmoe.reproduce.balance_losses",
        "Shazeer et al. 2017 Table 6: importance/load loss weights vs perplexity and balance; hierarchical MoE"),
    "router_z_loss": ExperimentInfo(
        "stmoe.reproduce.router_z_loss",
        "ST-MoE Table 4: router z-loss 0 / 1e-4 / 1e-3 / 1e-2 in bfloat16 at a high learning rate: stability"),
    "finetune_subsets": ExperimentInfo(
        "stmoe.reproduce.finetune_subsets",
        "ST-MoE Sec. 4: fine-tune all / non-MoE / MoE-only / attention-only parameters of one pretrained model"),
}
