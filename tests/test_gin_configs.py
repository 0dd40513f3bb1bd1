"""Every shipped gin file parses and binds; published configurations have their published sizes."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

import stmoe
from stmoe import gin_utils
from stmoe.models.info import model_facts

GIN_DIR = stmoe.gin_dir()
MODEL_FILES = sorted(os.path.relpath(p, GIN_DIR) for p in glob.glob(os.path.join(GIN_DIR, "models", "*.gin")))

# Published total parameter counts (Switch: Fedus et al. 2021 Table 9; ST-MoE: Zoph et al. 2022 Table 2;
# T5.1.1: the released checkpoints).
PUBLISHED = {
    "models/switch_base.gin": 7.4e9,
    "models/switch_large.gin": 26.3e9,
    "models/st_moe_l.gin": 4.1e9,
    "models/st_moe_32b.gin": 269e9,
    "models/t5_1_1_small.gin": 77e6,
    "models/t5_1_1_base.gin": 248e6,
}


@pytest.mark.parametrize("path", MODEL_FILES)
def test_model_gin_parses_and_binds(path):
  gin_utils.parse_gin([path], [])
  model = gin_utils.configured_model()
  assert model.config.vocab_size > 0
  facts = model_facts(model, 64, 16)
  assert facts.total_params >= facts.active_params_per_token > 0


@pytest.mark.parametrize("path,published", sorted(PUBLISHED.items()))
def test_published_sizes(path, published):
  gin_utils.parse_gin([path], [])
  facts = model_facts(gin_utils.configured_model())
  assert abs(facts.total_params - published) / published < 0.03, facts.total_params


def test_sparse_layouts_of_published_configs():
  gin_utils.parse_gin(["models/switch_base.gin"], [])
  cfg = gin_utils.configured_model().config
  assert cfg.moe.num_experts == 128 and cfg.moe.num_selected_experts == 1
  assert cfg.encoder_sparse.sparse_indices(12) == (1, 3, 5, 7, 9, 11)
  gin_utils.parse_gin(["models/st_moe_32b.gin"], [])
  cfg = gin_utils.configured_model().config
  assert cfg.moe.num_experts == 64 and cfg.moe.num_selected_experts == 2 and cfg.moe.extra_dense_mlp
  assert cfg.decoder_sparse.sparse_indices(24) == (3, 7, 11, 15, 19, 23)
  gin_utils.parse_gin(["models/moe_lm_tiny.gin"], [])
  cfg = gin_utils.configured_model().config
  assert cfg.decoder_only and cfg.moe.capacity_convention == "gshard"


def test_dense_baselines_are_flop_matched():
  """The *_dense baselines take the same forward FLOPs per token as their sparse models."""
  for sparse, dense in (("switch_tiny", "switch_tiny_dense"), ("st_moe_tiny", "st_moe_tiny_dense"),
                        ("moe_lm_tiny", "moe_lm_tiny_dense")):
    gin_utils.parse_gin([f"models/{sparse}.gin"], [])
    fs = model_facts(gin_utils.configured_model(), 64, 16)
    gin_utils.parse_gin([f"models/{dense}.gin"], [])
    fd = model_facts(gin_utils.configured_model(), 64, 16)
    # Only the router (d_model x E per sparse layer) differs.
    assert abs(fs.forward_flops_per_token - fd.forward_flops_per_token) / fs.forward_flops_per_token < 0.01


def test_unknown_binding_fails_with_hint():
  with pytest.raises(gin_utils.GinConfigError, match="ModelConfig"):
    gin_utils.parse_gin(["models/t5_1_1_tiny.gin"], ["ModelConfg.d_model = 3"])
  with pytest.raises(gin_utils.GinConfigError, match="not found"):
    gin_utils.parse_gin(["models/no_such_model.gin"], [])


def test_info_cli_json():
  out = subprocess.run([sys.executable, "-m", "stmoe.cli", "info", "--gin_file", "models/st_moe_32b.gin", "--json"],
                       check=True, capture_output=True, text=True).stdout
  facts = json.loads(out)
  assert {"total_params", "active_params_per_token", "flops_per_token"} <= set(facts)
  assert 2.6e11 < facts["total_params"] < 2.8e11
  table = subprocess.run([sys.executable, "-m", "stmoe.cli", "info", "--gin_file", "models/st_moe_tiny.gin",
                          "--gin.NUM_EXPERTS=4"], check=True, capture_output=True, text=True).stdout
  assert "encoder/moe_experts" in table and "sparse at [1, 3]" in table


@pytest.mark.parametrize("name", ["st_moe_32b", "st_moe_tiny", "moe_lm_tiny"])
def test_scanned_layers_count_the_same_parameters_and_flops(name):
  """Scanned stacks put a `layers` axis before the experts axis of stacked expert weights: the counts (and
  the model FLOPs `stmoe compile` projects step times from) must not read it as the expert axis."""
  facts = {}
  for scan in (False, True):
    gin_utils.parse_gin([f"models/{name}.gin"], [f"ModelConfig.scan_layers = {scan}"])
    facts[scan] = model_facts(gin_utils.configured_model(), 64, 16)
  assert facts[True].total_params == facts[False].total_params
  assert facts[True].active_params_per_token == facts[False].active_params_per_token
  assert facts[True].flops_per_token == facts[False].flops_per_token
