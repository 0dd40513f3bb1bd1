"""Serving exports (`stmoe export --format stablehlo|saved_model`) compute what the model computes.

The model is a gin-configured ST-MoE with one (MoE) layer per stack and random parameters, written in the
params export format: no training, the programs only have to reproduce the model whatever its weights.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

BATCH, INPUTS, TARGETS, DECODE = 2, 16, 8, 6
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = """\
include 'models/st_moe_tiny.gin'
VOCAB_SIZE = 64
GROUP_SIZE = 16
ModelConfig.num_encoder_layers = 1
ModelConfig.num_decoder_layers = 1
encoder/SparseLayout.every = 1
decoder/SparseLayout.every = 1
"""


def _write_params_export(directory: str, config_text: str) -> None:
  """A params export (config.gin, params/, export.json) of the model with random weights."""
  import jax
  import orbax.checkpoint as ocp

  from stmoe.checkpoints import export as export_lib
  from stmoe.training import layout

  os.makedirs(directory)
  config = os.path.join(directory, export_lib.CONFIG_FILE)
  with open(config, "w", encoding="utf-8") as f:
    f.write(config_text)
  model, _, _ = export_lib.configure_model(config)
  shapes = layout.input_shapes_for(layout.model_type_of(model), 1, {"inputs": 8, "targets": 8})
  # Random weights of the right shapes: nothing to compile (jitting the initialiser costs ~10 s here).
  abstract = jax.eval_shape(lambda: model.get_initial_variables(jax.random.PRNGKey(0), shapes)["params"])
  rng = np.random.RandomState(0)
  params = jax.tree.map(lambda a: rng.normal(0.0, 0.2, a.shape).astype(a.dtype), abstract)  # [shape of a]
  with ocp.PyTreeCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, export_lib.PARAMS_SUBDIR), params)
  with open(os.path.join(directory, export_lib.EXPORT_FILE), "w", encoding="utf-8") as f:
    json.dump({"format": export_lib.FORMAT, "version": 1, "dtype": "float32", "step": 0, "source": "test"}, f)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(params export dir, serving dir written by the CLI, loaded model + params)."""
  from stmoe.checkpoints import export as export_lib
  from stmoe.cli import export as export_cli

  root = tmp_path_factory.mktemp("serving")
  source = str(root / "init_export")
  _write_params_export(source, CONFIG)
  out = str(root / "served")
  rc = export_cli.main(["--checkpoint", source, "--output", out, "--format", "stablehlo", "--batch_size",
                        str(BATCH), "--inputs_length", str(INPUTS), "--targets_length", str(TARGETS),
                        "--max_decode_length", str(DECODE)])
  assert rc == 0
  return out, os.path.join(out, "serving"), export_lib.load(out)


def _batch(seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.RandomState(seed)
  targets = rng.randint(2, 64, (BATCH, TARGETS)).astype(np.int32)
  targets[1, 5:] = 0  # a shorter second row: padding is not scored
  inputs = rng.randint(2, 64, (BATCH, INPUTS)).astype(np.int32)
  inputs[0, 12:] = 0
  shifted = np.zeros_like(targets)
  shifted[:, 1:] = targets[:, :-1]
  return {"encoder_input_tokens": inputs, "decoder_input_tokens": shifted, "decoder_target_tokens": targets,
          "decoder_loss_weights": (targets > 0).astype(np.float32)}


def _model_greedy(loaded, inputs: np.ndarray) -> np.ndarray:
  from stmoe.decoding import DecodeConfig

  batch = {"encoder_input_tokens": inputs, "decoder_input_tokens": np.zeros((inputs.shape[0], DECODE), np.int32)}
  return np.asarray(loaded.model.predict_batch(loaded.params, batch, None,
                                               decode_config=DecodeConfig(method="greedy", max_decode_length=DECODE)))


def test_artifact_outputs_equal_the_models(exported):
  import jax

  from stmoe import serving

  out, serving_dir, loaded = exported
  assert sorted(os.listdir(serving_dir)) == ["greedy.stablehlo", "manifest.json", "params.npz", "score.stablehlo"]
  manifest = json.load(open(os.path.join(serving_dir, "manifest.json")))
  assert manifest["jax_version"] == jax.__version__ and manifest["platforms"] == [jax.default_backend()]
  assert manifest["functions"]["score"]["inputs"]["decoder_loss_weights"] == {"shape": [BATCH, TARGETS],
                                                                              "dtype": "float32"}
  assert manifest["functions"]["greedy"]["inputs"] == {"encoder_input_tokens": {"shape": [BATCH, INPUTS],
                                                                                "dtype": "int32"}}
  assert manifest["functions"]["greedy"]["output"]["shape"] == [BATCH, DECODE]

  model = serving.load(serving_dir)
  batch = _batch()
  expected = np.asarray(jax.jit(loaded.model.score_batch)(loaded.params, batch))
  np.testing.assert_array_equal(model.score(batch), expected)  # bit-identical in float32
  # decoder_input_tokens / decoder_loss_weights default to the unpacked t5x convention.
  np.testing.assert_array_equal(
      model.score({"encoder_input_tokens": batch["encoder_input_tokens"],
                   "decoder_target_tokens": batch["decoder_target_tokens"]}), expected)
  ids = model.greedy({"encoder_input_tokens": batch["encoder_input_tokens"]})
  assert ids.shape == (BATCH, DECODE) and ids.dtype == np.int32
  np.testing.assert_array_equal(ids, _model_greedy(loaded, batch["encoder_input_tokens"]))


def test_loader_runs_without_flax_gin_or_stmoe(exported, tmp_path):
  """stmoe.serving imports only jax + numpy, both as a package module and as a copied standalone file."""
  from stmoe import serving

  _, serving_dir, _ = exported
  batch = _batch(1)
  np.savez(tmp_path / "batch.npz", **batch)
  np.save(tmp_path / "expected.npy", serving.load(serving_dir).score(batch))
  shutil.copyfile(serving.__file__, tmp_path / "serving.py")  # the loader copied on its own
  forbidden = ["flax", "gin", "seqio", "tensorflow", "optax", "orbax", "clu", "sentencepiece"]
  # One process imports both: the package module (stmoe/__init__ + stmoe/serving) and the copied file.
  code = "\n".join([
      "import sys", *(f"sys.modules[{m!r}] = None" for m in forbidden),
      f"sys.path[:0] = [{REPO!r}, {str(tmp_path)!r}]",
      "import numpy as np",
      "import serving as standalone",
      "from stmoe import serving",
      "assert standalone.__file__ != serving.__file__",
      f"batch = dict(np.load({str(tmp_path / 'batch.npz')!r}))",
      f"expected = np.load({str(tmp_path / 'expected.npy')!r})",
      "assert serving.ServingModel.score.__doc__ == standalone.ServingModel.score.__doc__",
      f"model = standalone.load({serving_dir!r})",
      "np.testing.assert_array_equal(model.score(batch), expected)",
      f"assert model.greedy(batch).shape == ({BATCH}, {DECODE})",
      f"loaded = sorted(m for m in sys.modules if sys.modules[m] is not None and m.split('.')[0] in "
      f"{forbidden + ['stmoe']!r} and m not in ('stmoe', 'stmoe.serving'))",
      "assert not loaded, loaded",
      "print('ok')"])
  proc = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_wrong_batch_shape_is_a_clear_error(exported):
  from stmoe import serving

  _, serving_dir, _ = exported
  model = serving.load(serving_dir)
  batch = {k: v[:1] for k, v in _batch().items()}
  with pytest.raises(serving.ShapeMismatchError, match=r"\[1, 16\].*exported for \[2, 16\]"):
    model.greedy(batch)
  assert issubclass(serving.ShapeMismatchError, ValueError)
  long = _batch()
  long["decoder_target_tokens"] = np.ones((BATCH, TARGETS + 1), np.int32)
  with pytest.raises(serving.ShapeMismatchError, match=r"decoder_target_tokens.*\[2, 9\].*\[2, 8\]"):
    model.score(long)
  with pytest.raises(serving.ServingError, match="packed"):
    model.score({**_batch(), "decoder_segment_ids": np.ones((BATCH, TARGETS), np.int32)})


def test_polymorphic_batch_is_refused_for_moe(exported, tmp_path):
  from stmoe.checkpoints import serving_export

  out, _, _ = exported
  shapes = serving_export.ServingShapes(batch_size=None, inputs_length=INPUTS, targets_length=TARGETS,
                                        max_decode_length=DECODE)
  with pytest.raises(serving_export.ServingExportError, match="integer --batch_size"):
    serving_export.write_stablehlo(out, shapes, functions=("greedy",))
  with pytest.raises(serving_export.ServingExportError, match="positive integer or 'poly'"):
    serving_export.parse_batch_size("0")


def test_saved_model_scores_like_the_model(exported):
  tf = pytest.importorskip("tensorflow")
  import jax

  from stmoe.checkpoints import serving_export

  out, _, loaded = exported
  shapes = serving_export.ServingShapes(batch_size=BATCH, inputs_length=INPUTS, targets_length=TARGETS,
                                        max_decode_length=DECODE)
  path = serving_export.write_saved_model(out, shapes)
  reloaded = tf.saved_model.load(path)
  batch = _batch(2)
  got = reloaded.signatures["score"](**{k: tf.constant(v) for k, v in batch.items()})["log_likelihood"].numpy()
  expected = np.asarray(jax.jit(loaded.model.score_batch)(loaded.params, batch))
  np.testing.assert_allclose(got, expected, rtol=1e-5)  # TF's XLA build: the same program, other fusions
  ids = reloaded.signatures["greedy"](encoder_input_tokens=tf.constant(batch["encoder_input_tokens"]))["ids"]
  np.testing.assert_array_equal(ids.numpy(), _model_greedy(loaded, batch["encoder_input_tokens"]))
