"""Sparse upcycling (stmoe.checkpoints.upcycle): function preservation, the gate scale factor, carried
optimizer state, training from the upcycled checkpoint, config mismatches and HF T5 sources."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stmoe.checkpoints import upcycle as up
from stmoe.config import ModelConfig, MoeConfig, SparseLayout
from stmoe.errors import UserError
from stmoe.models.api import make_model
from stmoe.training import layout
from stmoe.training import optimizers as opt_lib

VOCAB = 64
LENGTHS = {"inputs": 16, "targets": 8}
EVERY2 = SparseLayout(kind="every", every=2)


def _dense_config(**kw) -> ModelConfig:
  base = dict(vocab_size=VOCAB, d_model=32, num_heads=4, d_kv=8, d_ff=48, num_encoder_layers=2, num_decoder_layers=2,
              activations=("gelu", "linear"))
  return ModelConfig(**{**base, **kw})


def _sparse_config(dense: ModelConfig, **moe_kw) -> ModelConfig:
  """Top-2 with renormalised gates and capacity for every token (nothing dropped), extra dense MLP."""
  moe = dict(num_experts=4, num_selected_experts=2, d_ff=dense.d_ff, activations=dense.activations, group_size=64,
             renormalize="before_drop", train_capacity_factor=4.0, eval_capacity_factor=4.0, extra_dense_mlp=True)
  return dense.replace(moe=MoeConfig(**{**moe, **moe_kw}), encoder_sparse=EVERY2, decoder_sparse=EVERY2)


def _batch(seed: int = 0, batch: int = 4) -> dict[str, np.ndarray]:
  rng = np.random.RandomState(seed)
  shapes = layout.input_shapes_for("encoder_decoder", batch, LENGTHS)
  out = {k: rng.randint(2, VOCAB, size=v).astype(np.int32) for k, v in shapes.items()}
  out["decoder_loss_weights"] = np.ones(shapes["decoder_loss_weights"], np.float32)
  return out


def _init(model, seed: int = 1):
  shapes = layout.input_shapes_for("encoder_decoder", 1, LENGTHS)
  return jax.jit(lambda: model.get_initial_variables(jax.random.PRNGKey(seed), shapes)["params"])()


@pytest.fixture(scope="module")
def dense_model():
  return make_model(_dense_config())


@pytest.fixture(scope="module")
def dense_params(dense_model):
  return _init(dense_model)


# --------------------------------------------------------------------------------------------------------
# (a) The upcycled model computes the dense model (renormalised gates, no drops); the scale factor otherwise.


def test_upcycled_model_equals_dense(dense_model, dense_params):
  sparse_model = make_model(_sparse_config(dense_model.config, aux_loss_coef=0.0, router_z_loss_coef=0.0))
  params = up.upcycle_params(dense_params, sparse_model.config, dense_model.config,
                             router_init_rng=jax.random.PRNGKey(2))
  # experts are copies of the dense MLP; the extra dense MLP starts with a zero output projection
  wi = params["encoder"]["layer_1"]["moe"]["experts"]["wi_0"]  # [expert, embed, mlp]
  np.testing.assert_array_equal(wi, np.broadcast_to(dense_params["encoder"]["layer_1"]["mlp"]["wi_0"]["kernel"],
                                                    wi.shape))
  assert not np.any(params["decoder"]["layer_1"]["extra_mlp"]["wo"]["kernel"])
  router = params["encoder"]["layer_1"]["moe"]["router"]["w"]
  assert router.shape == (32, 4) and 0.01 < np.std(router) < 0.03
  batch = _batch()  # score_batch equality: test_hf_t5_upcycles_with_the_same_scores
  dense_loss, dm = jax.jit(lambda p, b: dense_model.loss_fn(p, b, None))(dense_params, batch)
  sparse_loss, sm = jax.jit(lambda p, b: sparse_model.loss_fn(p, b, None))(params, batch)
  assert abs(float(dense_loss) - float(sparse_loss)) < 1e-6  # router losses off (coefficients 0)
  assert abs(float(dm["cross_entropy"]) - float(sm["cross_entropy"])) < 1e-6
  assert float(sm["moe/fraction_tokens_left_behind"] if "moe/fraction_tokens_left_behind" in sm else 0.0) == 0.0


def test_scanned_target_gets_the_same_parameters(dense_model, dense_params):
  cfg = _sparse_config(dense_model.config)
  plain = up.upcycle_params(dense_params, cfg, dense_model.config, router_init_rng=jax.random.PRNGKey(2))
  scanned = up.upcycle_params(dense_params, cfg.replace(scan_layers=True), dense_model.config,
                              router_init_rng=jax.random.PRNGKey(2))
  for stack in ("encoder", "decoder"):
    for j in (0, 1):
      got = scanned[stack]["layers"][f"layer_{j}"]
      want = plain[stack][f"layer_{j}"]
      jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[0], b), got, want)


def test_scale_factor_without_renormalisation(dense_model, dense_params):
  """Top-1 (Switch) without renormalisation: the MoE output is the top-1 router probability times the MLP."""
  from stmoe.layers.mlp import MlpBlock
  from stmoe.moe import MoeLayer

  cfg = _sparse_config(dense_model.config, num_selected_experts=1, renormalize="none", extra_dense_mlp=False)
  params = up.upcycle_params(dense_params, cfg, dense_model.config, router_init_rng=jax.random.PRNGKey(3))
  x = jax.random.normal(jax.random.PRNGKey(4), (2, 16, 32))  # [batch, length, embed]
  moe_p = params["encoder"]["layer_1"]["moe"]
  y_moe, _ = jax.jit(lambda p, x: MoeLayer(config=cfg.moe).apply({"params": p}, x, None, deterministic=True))(
      moe_p, x)
  y_mlp = jax.jit(lambda p, x: MlpBlock(48, cfg.activations).apply({"params": p}, x, deterministic=True))(
      dense_params["encoder"]["layer_1"]["mlp"], x)
  probs = jax.nn.softmax(jnp.einsum("bld,de->ble", x, moe_p["router"]["w"]), axis=-1)  # [batch, length, experts]
  scale = jnp.max(probs, axis=-1, keepdims=True)
  np.testing.assert_allclose(y_moe, scale * y_mlp, atol=2e-6)
  assert 0.25 < float(jnp.mean(scale)) < 0.35  # about 1 / num_experts at a normal(0.02) router init


# --------------------------------------------------------------------------------------------------------
# Optimizer state: carried slots repeat along the expert axis (Adafactor and AdamW).


@pytest.mark.parametrize("kind", ["adafactor", "adamw"])
def test_carried_optimizer_state(dense_model, dense_params, kind):
  opt = opt_lib.OptimizerDef(kind=kind, learning_rate=1e-2, min_dim_size_to_factor=16)
  shapes = layout.input_shapes_for("encoder_decoder", 1, LENGTHS)
  dense_tx = opt_lib.make_optimizer(opt, dense_model.params_logical_axes(shapes), dense_params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1) * jnp.arange(p.size).reshape(p.shape) / p.size, dense_params)
  dense_state = dense_tx.init(dense_params)
  _, dense_state = jax.jit(dense_tx.update)(grads, dense_state, dense_params)
  sparse_model = make_model(_sparse_config(dense_model.config))
  dense = up.DenseSource(dense_model.config, dense_params, dense_state, "memory", "step")
  state = up.upcycle_state(dense, sparse_model, opt, optimizer_state="carry")
  flat = {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]}
  dflat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(dense_state)[0]}
  slots = ("v_row", "v_col") if kind == "adafactor" else ("mu", "nu")
  for slot in slots:
    expert = [v for k, v in flat.items() if f".{slot}" in k and "'layer_1']['moe']['experts']['wo']" in k
              and "'encoder'" in k]
    mlp = [v for k, v in dflat.items() if f".{slot}" in k and "'encoder']['layer_1']['mlp']['wo']" in k]
    assert len(expert) == 1 and len(mlp) == 1, (slot, list(flat)[:5])
    assert expert[0].shape == (4,) + mlp[0].shape and np.any(mlp[0])
    np.testing.assert_array_equal(expert[0], np.broadcast_to(mlp[0], expert[0].shape))
    router = [v for k, v in flat.items() if f".{slot}" in k and "['router']" in k]
    assert router and not any(np.any(v) for v in router)  # fresh
  counts = [v for k, v in flat.items() if k.endswith(".count")]
  assert counts and all(np.all(c == 1) for c in counts)  # the optimizer's own step counts are carried
  reset = up.upcycle_state(dense, sparse_model, opt, optimizer_state="reset")
  assert all(np.all(np.asarray(c) == 0) for p, c in jax.tree_util.tree_flatten_with_path(reset["opt_state"])[0]
             if jax.tree_util.keystr(p).endswith(".count"))


# --------------------------------------------------------------------------------------------------------
# (b) Training continues from the upcycled checkpoint (written by upcycle(), then resumed by train()).


def _write_dense_checkpoint(directory: str, model, params, opt) -> None:
  """A dense stmoe checkpoint at step 3 with a (non-trivial) optimizer state and a config.gin, without
  compiling a dense train step."""
  from stmoe.checkpoints import CheckpointManager

  shapes = layout.input_shapes_for("encoder_decoder", 1, LENGTHS)
  tx = opt_lib.make_optimizer(opt, model.params_logical_axes(shapes), params)
  opt_state = tx.init(params)
  _, opt_state = tx.update(jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params), opt_state, params)
  text = up._config_text_of(model)
  manager = CheckpointManager(directory, async_save=False, config_text=lambda: text)
  manager.save(3, {"step": jnp.int32(3), "params": params, "opt_state": opt_state, "rng": jax.random.PRNGKey(0)}, {})
  manager.close()


def test_training_continues_from_upcycled_checkpoint(tmp_path, dense_model, dense_params):
  import helpers_train
  from stmoe import checkpoints

  opt = opt_lib.adamw(1e-3)
  _write_dense_checkpoint(str(tmp_path / "dense"), dense_model, dense_params, opt)
  sparse_model = make_model(_sparse_config(dense_model.config))
  # the dense model comes from the checkpoint's config.gin
  step_dir = up.upcycle(str(tmp_path / "dense"), sparse_model, str(tmp_path / "sparse"), optimizer_state="carry",
                        optimizer=opt)
  assert step_dir.endswith("/checkpoints/0") and checkpoints.verify_integrity(step_dir)
  result = helpers_train.run_train(str(tmp_path / "sparse"), steps=5, model=sparse_model, optimizer=opt)
  assert result.start_step == 0 and result.step == 5
  losses = [result.losses[s] for s in sorted(result.losses)]
  assert losses[-1] < losses[0], losses


def test_train_upcycle_from_argument(tmp_path, dense_model, dense_params):
  """The one-step path: train(upcycle_from=DENSE) builds the upcycled state placed with the run's shardings."""
  import helpers_train
  from stmoe import partitioning
  from stmoe.training import setup as setup_lib

  opt = opt_lib.adamw(1e-3)
  _write_dense_checkpoint(str(tmp_path / "dense"), dense_model, dense_params, opt)
  sparse_model = make_model(_sparse_config(dense_model.config))
  with pytest.raises(UserError, match="not both"):
    helpers_train.run_train(str(tmp_path / "x"), steps=1, model=sparse_model, optimizer=opt,
                            upcycle_from=str(tmp_path / "dense"), init_checkpoint=str(tmp_path / "dense"))
  mesh = partitioning.make_mesh(1, 1, devices=jax.devices()[:1])
  setup = setup_lib.setup_run(sparse_model, mesh, batch_size=8, task_feature_lengths=helpers_train.FEATURE_LENGTHS,
                              optimizer=opt)
  state = up.upcycled_train_state(str(tmp_path / "dense"), sparse_model, opt, setup.spec, optimizer_state="carry")
  assert jax.tree.structure(state) == jax.tree.structure(setup.spec.abstract)
  jax.tree.map(lambda a, s: (a.shape, a.dtype) == (s.shape, s.dtype) or pytest.fail(str(a.shape)), state,
               setup.spec.abstract)
  assert int(state["step"]) == 0


# --------------------------------------------------------------------------------------------------------
# (c) Mismatches are refused with every reason.


def test_mismatch_lists_every_reason(dense_model, dense_params):
  bad = _sparse_config(_dense_config(d_model=40, num_heads=2, num_decoder_layers=3, vocab_size=80,
                                     activations=("relu",)), d_ff=96)
  with pytest.raises(up.UpcycleError) as e:
    up.upcycle_params(dense_params, bad, dense_model.config, router_init_rng=jax.random.PRNGKey(0))
  msg = str(e.value)
  for reason in ("ModelConfig.d_model", "ModelConfig.num_heads", "ModelConfig.num_decoder_layers",
                 "ModelConfig.vocab_size", "ModelConfig.activations", "MoeConfig.d_ff", "MoeConfig.activations"):
    assert reason in msg, (reason, msg)
  assert "7 reasons" in msg and isinstance(e.value, UserError)
  assert "dtype" not in msg  # irrelevant fields are not compared
  assert not up.config_mismatches(dense_model.config, _sparse_config(dense_model.config).replace(dtype="bfloat16"))
  with pytest.raises(up.UpcycleError, match="no sparse layers"):
    up.check_compatible(dense_model.config, dense_model.config)


# --------------------------------------------------------------------------------------------------------
# (d) A Hugging Face T5 directory upcycles to a sparse model with HF's scores.


def test_hf_t5_upcycles_with_the_same_scores(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from hf_reference import padded_batch, summed_loglik
  from stmoe import checkpoints
  from stmoe.interop import hf_t5

  torch.manual_seed(0)
  hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
      vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
      dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, feed_forward_proj="gated-gelu",
      tie_word_embeddings=False)).eval()
  hf.save_pretrained(tmp_path / "hf")
  dense_model, dense_params = hf_t5.load_pretrained(str(tmp_path / "hf"))
  sparse_model = make_model(_sparse_config(dense_model.config))
  step_dir = up.upcycle(str(tmp_path / "hf"), sparse_model, str(tmp_path / "sparse"))
  params = checkpoints.restore_params(step_dir, up._single_device(up.sparse_abstract_params(sparse_model)))
  batch = padded_batch(np.random.RandomState(0), 100, 3, 12, 7)
  ours = np.asarray(jax.jit(sparse_model.score_batch)(params, batch))
  dense = np.asarray(jax.jit(dense_model.score_batch)(dense_params, batch))
  enc = torch.tensor(batch["encoder_input_tokens"], dtype=torch.long)
  with torch.no_grad():
    logits = hf(input_ids=enc, attention_mask=(enc > 0).long(),
                decoder_input_ids=torch.tensor(batch["decoder_input_tokens"], dtype=torch.long)).logits
  ref = summed_loglik(logits, batch)
  assert np.max(np.abs(ours - dense)) < 2e-5, np.max(np.abs(ours - dense))
  np.testing.assert_allclose(ours, ref, rtol=1e-4)
  with pytest.raises(up.UpcycleError, match="no optimizer state"):
    up.upcycle(str(tmp_path / "hf"), sparse_model, str(tmp_path / "sparse2"), optimizer_state="carry")
