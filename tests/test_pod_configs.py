"""The shipped pod files (gin/partitioning/pods/): each one's mesh fits its model, its batch and its topology.

`stmoe compile` proves each file fits its pod (docs/scaling.md, minutes per compile); this cheap check, run
on every file without compiling, catches what a later edit to a model or pod file could break: partition
counts that do not divide the topology's chips, the experts, heads, d_ff or vocab; a batch that does not
split over data x expert (its token groups would then be gathered across devices); and a file name that no
longer says the topology it was checked for.
"""

from __future__ import annotations

import glob
import math
import os

import gin
import pytest

import stmoe.training.trainer  # noqa: F401  (registers the run-file configurables)
from stmoe import gin_utils, partitioning
from stmoe.moe.grouping import plan_groups
from stmoe.training import setup as setup_lib

POD_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin", "partitioning", "pods")
POD_FILES = sorted(f for f in glob.glob(os.path.join(POD_DIR, "*.gin")) if not f.endswith("pod_common.gin"))
MODELS = ("switch_base", "switch_large", "st_moe_base", "st_moe_l", "st_moe_32b")


@pytest.fixture(autouse=True)
def _clean_gin():
  yield
  gin.clear_config()


def test_every_published_config_has_a_pod_file():
  assert sorted(os.path.basename(f).split("_v")[0] for f in POD_FILES) == sorted(MODELS)


@pytest.mark.parametrize("path", POD_FILES, ids=os.path.basename)
def test_pod_file_fits_its_model_batch_and_topology(path):
  name = os.path.basename(path)[:-len(".gin")]
  model_name, _, topology = name.partition("_v")
  generation, *dims = ("v" + topology).split("_")
  num_chips = math.prod(int(d) for d in dims[0].split("x"))
  text = open(path).read()
  assert f"--topology {generation}:{dims[0]}" in text  # the header's command names the same topology

  gin_utils.parse_gin([f"models/{model_name}.gin", "runs/pretrain.gin", f"partitioning/pods/{name}.gin"], [])
  model = setup_lib.default_model()
  batch = gin.query_parameter("%BATCH_SIZE")
  lengths = gin.query_parameter("%TASK_FEATURE_LENGTHS")
  shape = partitioning.mesh_shape_for(num_chips, gin.query_parameter("%NUM_EXPERT_PARTITIONS"),
                                      gin.query_parameter("%NUM_MODEL_PARTITIONS"))
  partitioning.validate_mesh(shape, model.config, batch)  # raises, saying what to change
  assert shape.expert > 1 and model.config.moe.num_experts % shape.expert == 0
  # The token groups of every MoE layer split evenly over the devices holding the batch (no gathers).
  shards = shape.data * shape.expert
  for length in lengths.values():
    assert plan_groups(batch * length, model.config.moe.group_size, shards).num_shards == shards
  # Long runs on pods: bfloat16 activations, scanned and rematerialised layers (pod_common.gin).
  assert model.config.dtype == "bfloat16" and model.config.scan_layers and model.config.remat
