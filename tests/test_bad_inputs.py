"""Bad inputs through the command line: each ends in a one-line message and exit 2 (a diverged run: 1), and
MODEL_DIR is left byte-identical wherever nothing should have been written (docs/training.md, "What
happens when things go wrong").

The commands run in-process (`stmoe.cli.main`, exactly what the `stmoe` script calls) on a tiny synthetic
copy task, so most cases fail before anything is compiled; one shared trained run serves every case that
needs a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from stmoe import cli

TINY = ["--gin.ModelConfig.num_encoder_layers=2", "--gin.ModelConfig.num_decoder_layers=2",
        "--gin.ModelConfig.d_model=32", "--gin.EXPERT_D_FF=32", "--gin.ModelConfig.d_ff=64",
        "--gin.VOCAB_SIZE=64", "--gin.NUM_EXPERTS=4", "--gin.GROUP_SIZE=32", "--gin.BATCH_SIZE=8",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 8}", "--gin.train.input_fn=@synthetic_input",
        "--gin.synthetic_input.vocab_size=64", "--no_progress"]
ST_MOE = ["--gin_file", "models/st_moe_tiny.gin", "--gin_file", "runs/pretrain.gin"]
SWITCH = ["--gin_file", "models/switch_tiny.gin", "--gin_file", "runs/pretrain.gin"]
STEPS = ["--gin.TRAIN_STEPS=4", "--gin.CHECKPOINT_PERIOD=2", "--gin.LOG_PERIOD=1"]
HELPER = os.path.join(os.path.dirname(__file__), "helpers_train.py")


@pytest.fixture(autouse=True)
def _clean_gin():
  """The commands parse gin into the global config; leave nothing behind for other tests."""
  yield
  import gin

  gin.clear_config()


def snapshot(directory) -> dict[str, str]:
  """{relative path: sha256} of every file under `directory` (empty if it does not exist)."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      out[os.path.relpath(path, directory)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
  return out


def stmoe(argv, capsys) -> tuple[int, str, str]:
  rc = cli.main(list(map(str, argv)))
  out, err = capsys.readouterr()
  return rc, out, err


def assert_one_line_error(err: str, *fragments: str, prog: str = "stmoe train") -> str:
  """The last stderr line is `prog: error: ...` naming every fragment, and there is no traceback."""
  assert "Traceback" not in err, err[-3000:]
  line = err.strip().splitlines()[-1]
  assert line.startswith(f"{prog}: error: "), err[-2000:]
  for fragment in fragments:
    assert fragment in line, (fragment, line)
  return line


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny ST-MoE trained 4 steps from the CLI: checkpoints 2 and 4, metrics of steps 1-4."""
  model_dir = tmp_path_factory.mktemp("bad_inputs") / "run"
  rc = cli.main(["train"] + ST_MOE + TINY + STEPS + ["--model_dir", str(model_dir)])
  assert rc == 0
  import gin

  gin.clear_config()
  return model_dir


@pytest.fixture
def run_copy(trained, tmp_path):
  """A private copy of the trained run to break."""
  dst = tmp_path / "run"
  shutil.copytree(trained, dst)
  return dst


def _steps(model_dir) -> list[int]:
  return sorted(int(n) for n in os.listdir(os.path.join(model_dir, "checkpoints")) if n.isdigit())


# ---------------------------------------------------------------------------------------------------------
# 1. A resume that does not fit the configured model: refused, nothing written, nothing moved.


def test_resume_into_a_different_model_is_refused_and_changes_nothing(run_copy, capsys):
  before = snapshot(run_copy)
  rc, _, err = stmoe(["train"] + SWITCH + TINY + ["--gin.TRAIN_STEPS=6", "--model_dir", run_copy], capsys)
  assert rc == 2
  line = assert_one_line_error(err, "cannot resume from", "does not fit the configured model",
                               "point --model_dir at a new directory", "Nothing was changed")
  assert "params/" in line  # names what differs, parameters first
  assert snapshot(run_copy) == before
  assert not os.path.exists(run_copy / "corrupt_checkpoints")


def test_export_with_a_mismatched_gin_names_the_difference(run_copy, tmp_path, capsys):
  rc, _, err = stmoe(["export", "--checkpoint", run_copy, "--output", tmp_path / "exp", "--gin_file",
                      "models/st_moe_tiny.gin", "--gin.VOCAB_SIZE=128"], capsys)
  assert rc == 2
  assert_one_line_error(err, "does not fit", "params/", prog="stmoe export")
  assert not os.path.exists(tmp_path / "exp")


# ---------------------------------------------------------------------------------------------------------
# 2. Integrity: checksums, quarantine under unique names, never delete.


def _flip_a_bit(step_dir) -> str:
  data = os.path.join(step_dir, "state", "ocdbt.process_0", "d")
  path = max((os.path.join(data, n) for n in os.listdir(data)), key=os.path.getsize)
  raw = bytearray(open(path, "rb").read())
  raw[len(raw) // 2] ^= 0x01
  open(path, "wb").write(bytes(raw))
  return path


def test_flipped_bit_is_detected_and_quarantine_never_overwrites(run_copy):
  """Each checkpoint records sha256 sums; a flipped bit (same size) makes it unreadable: it is moved aside
  under a fresh name, and an older quarantined copy of the same step is never deleted."""
  import jax

  from stmoe import checkpoints

  ckpt = run_copy / "checkpoints"
  manifest = json.load(open(ckpt / "4" / checkpoints.INTEGRITY_FILE))
  assert manifest["algorithm"] == "sha256" and "state/_METADATA" in manifest["files"]
  assert (ckpt / "4" / "config.gin").read_text() and "ModelConfig" in (ckpt / "4" / "config.gin").read_text()

  # An earlier quarantined copy of step 4 (e.g. from a previous incident) must survive.
  earlier = run_copy / "corrupt_checkpoints" / "4"
  shutil.copytree(ckpt / "4", earlier)
  earlier_files = snapshot(earlier)
  _flip_a_bit(ckpt / "4")
  moved_files = snapshot(ckpt / "4")
  with pytest.raises(checkpoints.CorruptCheckpointError, match="sha256"):
    checkpoints.verify_integrity(str(ckpt / "4"))

  mgr = checkpoints.CheckpointManager(str(run_copy))
  abstract = _abstract_state_of(run_copy)
  with pytest.warns(checkpoints.CheckpointWarning, match="step 4.*corrupt or incomplete.*sha256"):
    step, state, _ = mgr.restore_latest(abstract)
  assert step == 2 and int(jax.device_get(state["step"])) == 2
  assert snapshot(earlier) == earlier_files  # untouched
  assert snapshot(run_copy / "corrupt_checkpoints" / "4.1") == moved_files  # moved whole, fresh name
  assert _steps(run_copy) == [2]


def test_every_checkpoint_unreadable_is_refused_without_moving_anything(run_copy):
  from stmoe import checkpoints
  from stmoe.errors import CorruptCheckpointError

  for step in (2, 4):
    _flip_a_bit(run_copy / "checkpoints" / str(step))
  before = snapshot(run_copy)
  with pytest.raises(CorruptCheckpointError, match="every checkpoint .* is unreadable"):
    checkpoints.CheckpointManager(str(run_copy)).restore_latest(_abstract_state_of(run_copy))
  assert snapshot(run_copy) == before


def test_truncated_checkpoint_falls_back_to_the_previous_one(run_copy):
  from stmoe import checkpoints

  state_dir = run_copy / "checkpoints" / "4" / "state"
  with open(state_dir / "manifest.ocdbt", "r+b") as f:
    f.truncate(3)
  with pytest.warns(checkpoints.CheckpointWarning, match="step 4"):
    step, _, data = checkpoints.CheckpointManager(str(run_copy)).restore_latest(_abstract_state_of(run_copy))
  assert step == 2 and data["train"]["index"] == 2
  assert os.path.isdir(run_copy / "corrupt_checkpoints" / "4")


def test_old_steps_are_removed_only_after_newer_ones_are_verified(tmp_path):
  """keep=2: the oldest step goes once two newer steps carry checksums, never while one is unverified."""
  import jax.numpy as jnp

  from stmoe import checkpoints

  state = lambda s: {"step": jnp.int32(s), "params": {"w": jnp.full((3,), float(s))}}
  mgr = checkpoints.CheckpointManager(str(tmp_path), keep=2, async_save=True)
  for s in (1, 2, 3):
    mgr.save(s, state(s), {})
  # Step 3's async save may still be running: 1 is kept until 3 is finalised and verified.
  assert 1 in mgr.all_steps() or checkpoints.has_integrity(mgr.step_dir(3))
  mgr.wait()
  assert mgr.all_steps() == [2, 3]
  assert all(checkpoints.verify_integrity(mgr.step_dir(s)) for s in (2, 3))
  mgr.close()


def test_sigkill_during_an_async_save_leaves_the_previous_checkpoint_intact(tmp_path):
  """A process killed while orbax writes leaves only a tmp dir; resume ignores it and uses the last step."""
  from stmoe import checkpoints

  proc = subprocess.run([sys.executable, HELPER, "killed_save", str(tmp_path)], capture_output=True, text=True,
                        timeout=300, cwd=os.path.dirname(HELPER))
  assert proc.returncode == -9, proc.stderr[-3000:]
  assert _steps(tmp_path) == [1]
  assert checkpoints.verify_integrity(str(tmp_path / "checkpoints" / "1"))
  import jax

  abstract = jax.eval_shape(lambda: _killed_save_state(1))
  step, state, _ = checkpoints.CheckpointManager(str(tmp_path)).restore_latest(abstract)
  assert step == 1 and float(state["params"]["w"][0, 0]) == 1.0


def _killed_save_state(step):
  import jax.numpy as jnp

  return {"step": jnp.int32(step), "params": {"w": jnp.full((4096, 1024), float(step))}}


def _abstract_state_of(model_dir):
  """The abstract train state of the TINY st_moe model trained by the fixture (built as `stmoe train` does)."""
  import jax

  from stmoe import gin_utils, partitioning
  from stmoe.training import layout, optimizers, state as state_lib

  bindings = [a[len("--gin."):] for a in TINY if a.startswith("--gin.")]
  gin_utils.parse_gin(["models/st_moe_tiny.gin"], [b for b in bindings if not b.startswith(("train.", "synthetic"))
                                                   and not b.startswith(("BATCH_SIZE", "TASK_FEATURE"))],
                      check_macros=False)
  model = gin_utils.configured_model()
  shapes = layout.input_shapes_for("encoder_decoder", 8, {"inputs": 16, "targets": 8})
  params = jax.eval_shape(lambda: model.get_initial_variables(jax.random.PRNGKey(0), shapes)["params"])
  tx = optimizers.make_optimizer(optimizers.adafactor(), model.params_logical_axes(shapes), params)
  return state_lib.state_spec(model, tx, shapes, partitioning.make_mesh()).abstract


# ---------------------------------------------------------------------------------------------------------
# 3. NaN/inf is never checkpointed.


def test_divergence_is_never_checkpointed_and_names_the_newest_finite_step(run_copy, capsys):
  """CHECKPOINT_PERIOD=1 with LOG_PERIOD=10 (the reported case): an absurd learning rate blows the
  parameters up; no non-finite step is saved, good checkpoints are not rotated out by bad ones, exit 1."""
  import jax

  from stmoe import checkpoints

  rc, _, err = stmoe(["train"] + ST_MOE + TINY + ["--gin.TRAIN_STEPS=14", "--gin.CHECKPOINT_PERIOD=1",
                                                  "--gin.LOG_PERIOD=10", "--gin.KEEP_CHECKPOINTS=2",
                                                  "--gin.rsqrt_with_warmup.base_learning_rate=1e37",
                                                  "--model_dir", run_copy], capsys)
  assert rc == 1
  line = assert_one_line_error(err, "training diverged at step", "Nothing from step",
                               "the newest finite checkpoint is step")
  bad = int(line.split("training diverged at step ")[1].split(":")[0])
  newest = int(line.split("the newest finite checkpoint is step ")[1].split()[0])
  kept = _steps(run_copy)
  assert kept[-1] == newest < bad and len(kept) <= 2
  abstract = _abstract_state_of(run_copy)
  for step in kept:  # every checkpoint left is verified and finite
    state, _ = checkpoints.restore_train_state(str(run_copy / "checkpoints" / str(step)), abstract)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"])), step


# ---------------------------------------------------------------------------------------------------------
# 4. MODEL_DIR is written only after everything validated; each step keeps its config.


def test_failed_train_leaves_an_existing_model_dir_byte_identical(run_copy, capsys):
  before = snapshot(run_copy)
  rc, _, err = stmoe(["train"] + ST_MOE + TINY[:-3] + ["--gin.train.input_fn=@seqio_input",
                                                       "--gin.MIXTURE_OR_TASK_NAME='no_such_task_xyz'",
                                                       "--model_dir", run_copy], capsys)
  assert rc == 2
  assert_one_line_error(err, "no_such_task_xyz", "not a registered seqio task or mixture")
  assert snapshot(run_copy) == before


def test_export_uses_the_checkpoints_own_config(run_copy, tmp_path, capsys):
  """A MODEL_DIR/config.gin replaced by another model's (as a failed run used to do) does not matter:
  export, infer and eval read the step directory's own copy."""
  (run_copy / "config.gin").write_text("include 'models/switch_tiny.gin'\n")
  rc, out, err = stmoe(["export", "--checkpoint", run_copy, "--output", tmp_path / "exp"], capsys)
  assert rc == 0, err[-2000:]
  assert "step 4" in out
  assert (tmp_path / "exp" / "config.gin").read_text() == (run_copy / "checkpoints" / "4" / "config.gin").read_text()


def test_impossible_mesh_is_refused_before_anything_is_written(tmp_path, capsys):
  rc, _, err = stmoe(["train"] + ST_MOE + TINY + ["--gin.NUM_EXPERT_PARTITIONS=3", "--model_dir",
                                                  tmp_path / "new"], capsys)
  assert rc == 2
  assert_one_line_error(err, "NUM_EXPERT_PARTITIONS (3)", "does not divide")
  assert not os.path.exists(tmp_path / "new")


def test_unknown_task_on_a_new_dir_creates_nothing(tmp_path, capsys):
  rc, _, err = stmoe(["train"] + ST_MOE + ["--gin.MIXTURE_OR_TASK_NAME='no_such_task_xyz'", "--model_dir",
                                           tmp_path / "new"], capsys)
  assert rc == 2
  assert_one_line_error(err, "no_such_task_xyz")
  assert not os.path.exists(tmp_path / "new")


# ---------------------------------------------------------------------------------------------------------
# 5. Vocabulary and task/model fit (real bundled data).


def test_vocab_size_smaller_than_the_vocabulary_is_refused_up_front(tmp_path, capsys):
  rc, _, err = stmoe(["train"] + ST_MOE + ["--gin.MIXTURE_OR_TASK_NAME='shakespeare_span_corruption'",
                                           "--gin.VOCAB_SIZE=512", "--gin.BATCH_SIZE=8",
                                           "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}",
                                           "--model_dir", tmp_path / "new"], capsys)
  assert rc == 2
  assert_one_line_error(err, "vocabulary has 8100 ids", "VOCAB_SIZE (ModelConfig.vocab_size) is 512",
                        "--gin.VOCAB_SIZE=8192")
  assert not os.path.exists(tmp_path / "new")


@pytest.mark.parametrize("model,task,lengths,fragments", [
    ("models/st_moe_tiny.gin", "shakespeare_lm", "{'inputs': 32, 'targets': 32}",
     ("'shakespeare_lm' has only ['targets']", "encoder-decoder")),
    ("models/moe_lm_tiny.gin", "shakespeare_prefix_lm", "{'targets': 32}",
     ("no 'inputs' length", "silently train on the targets alone")),
])
def test_task_that_does_not_fit_the_model_is_refused_naming_both(model, task, lengths, fragments, tmp_path, capsys):
  rc, _, err = stmoe(["train", "--gin_file", model, "--gin_file", "runs/pretrain.gin",
                      f"--gin.MIXTURE_OR_TASK_NAME='{task}'", f"--gin.TASK_FEATURE_LENGTHS={lengths}",
                      "--model_dir", tmp_path / "new"], capsys)
  assert rc == 2
  assert_one_line_error(err, *fragments)
  assert not os.path.exists(tmp_path / "new")


# ---------------------------------------------------------------------------------------------------------
# 6. The user errors of point 6: one line, exit 2, nothing written.


@pytest.mark.parametrize("extra,fragments", [
    (["--gin.TRAIN_STPES=3"], ("macro TRAIN_STPES is defined", "Did you mean TRAIN_STEPS?")),
    (["--gin.train.train_stepz=3"], ("doesn't have a parameter named 'train_stepz'", "Did you mean train.train_steps?")),
    (["--gin.ModelConfig.d_modle=32"], ("'d_modle'", "Did you mean ModelConfig.d_model")),
    (["--gin.BATCH_SIZE=0"], ("BATCH_SIZE=0 must be an integer >= 1",)),
    (["--gin.TASK_FEATURE_LENGTHS={'targets': 8}"], ("has no 'inputs' length", "encoder_decoder model needs")),
])
def test_misspelt_or_impossible_settings(extra, fragments, run_copy, capsys):
  before = snapshot(run_copy)
  rc, _, err = stmoe(["train"] + ST_MOE + TINY + extra + ["--model_dir", run_copy], capsys)
  assert rc == 2
  assert_one_line_error(err, *fragments)
  assert snapshot(run_copy) == before


def test_model_dir_that_is_a_file(tmp_path, capsys):
  path = tmp_path / "a_file"
  path.write_text("keep me")
  rc, _, err = stmoe(["train"] + ST_MOE + TINY + ["--model_dir", path], capsys)
  assert rc == 2
  assert_one_line_error(err, "is a file, not a directory")
  assert path.read_text() == "keep me"


def test_debug_shows_the_traceback(tmp_path):
  from stmoe.errors import UserError

  with pytest.raises(UserError, match="BATCH_SIZE=0"):
    cli.main(["train"] + ST_MOE + TINY + ["--gin.BATCH_SIZE=0", "--model_dir", str(tmp_path / "x"), "--debug"])


@pytest.mark.parametrize("name,content,fragments", [
    ("bad.jsonl", b'{"inputs": "ok"}\n{"inputs": "broken"\n', ("bad.jsonl:2: not valid JSON",)),
    ("empty.jsonl", b"\n\n", ("has no inputs",)),
    ("latin1.tsv", "caf\xe9\n".encode("latin-1"), ("latin1.tsv:1: not valid UTF-8", "save the file as UTF-8")),
    ("array.jsonl", b'{"inputs": "ok"}\n["a", "b"]\n', ("array.jsonl:2: a JSON list where an object is expected",)),
    ("inputs.csv", b"a,b\n", ("unknown file type '.csv'",)),
    ("nokey.ndjson", b'{"inputs": "ok"}\n{"question": "x"}\n', ("nokey.ndjson:2: no input field",)),
])
def test_infer_rejects_bad_input_files(name, content, fragments, trained, tmp_path, capsys):
  src = tmp_path / name
  src.write_bytes(content)
  rc, _, err = stmoe(["infer", "--checkpoint", trained, "--input_file", src, "--output", tmp_path / "p.jsonl"],
                     capsys)
  assert rc == 2
  assert_one_line_error(err, *fragments, prog="stmoe infer")
  assert not os.path.exists(tmp_path / "p.jsonl") and src.read_bytes() == content


def test_infer_refuses_to_overwrite_its_input(trained, tmp_path, capsys):
  src = tmp_path / "in.jsonl"
  src.write_text('{"inputs": "to be or not"}\n')
  rc, _, err = stmoe(["infer", "--checkpoint", trained, "--input_file", src, "--output", src], capsys)
  assert rc == 2
  assert_one_line_error(err, "is the --input_file", prog="stmoe infer")
  assert src.read_text() == '{"inputs": "to be or not"}\n'


def test_ndjson_is_read_as_json_lines(tmp_path):
  from stmoe import inference

  path = tmp_path / "x.ndjson"
  path.write_text('{"inputs": "a\\tb", "targets": "c"}\n')  # a tab inside JSON: TSV would split it
  assert inference.read_inputs(str(path)) == [{"input": "a\tb", "target": "c"}]


def test_help_texts_show_examples_and_the_checkpoint_mode(capsys):
  with pytest.raises(SystemExit):
    cli.main(["train", "--help"])
  assert "examples:" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    cli.main(["eval", "--help"])
  out = capsys.readouterr().out
  assert "--checkpoint" in out and "--task" in out


def test_unknown_command_suggests_one(capsys):
  rc, _, err = stmoe(["trian"], capsys)
  assert rc == 2 and "Did you mean 'train'?" in err


# ---------------------------------------------------------------------------------------------------------
# 7. Resume bookkeeping: metrics.jsonl never repeats a step; INIT_CHECKPOINT is reported.


def test_resume_does_not_repeat_metric_rows(run_copy, capsys):
  """Steps 3-4 were logged but checkpoint 4 is lost: the resumed run logs them again, so the old rows move
  to metrics_discarded.jsonl and metrics.jsonl holds each step once."""
  shutil.rmtree(run_copy / "checkpoints" / "4")
  rc, _, err = stmoe(["train"] + ST_MOE + TINY + ["--gin.TRAIN_STEPS=5", "--gin.LOG_PERIOD=1",
                                                  "--model_dir", run_copy], capsys)
  assert rc == 0, err[-3000:]
  steps = [json.loads(l)["step"] for l in open(run_copy / "metrics.jsonl") if "loss" in json.loads(l)]
  assert steps == [1, 2, 3, 4, 5]
  discarded = [json.loads(l)["step"] for l in open(run_copy / "metrics_discarded.jsonl")]
  assert discarded == [3, 4]


def test_init_checkpoint_is_reported(trained, tmp_path, capsys):
  rc, out, err = stmoe(["train"] + ST_MOE + TINY + ["--gin.TRAIN_STEPS=1", f"--gin.train.init_checkpoint='{trained}'",
                                                    "--model_dir", tmp_path / "ft"], capsys)
  assert rc == 0, err[-3000:]
  assert f"Loaded the parameters of INIT_CHECKPOINT {trained}/checkpoints/4" in out
