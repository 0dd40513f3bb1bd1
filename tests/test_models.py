"""Dense and sparse backbones: causality, packing, padding, losses vs NumPy, dtypes, cached decoding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model_fixtures import VOCAB, random_batch, shift_right, tiny_config, tiny_sparse_config
from stmoe.models.api import make_model
from stmoe.models.networks import EncoderDecoder

CONFIGS = {"dense": tiny_config(), "sparse": tiny_sparse_config()}


@pytest.fixture(scope="module", params=["dense", "sparse"])
def encdec(request):
  model = make_model(CONFIGS[request.param])
  params = model.get_initial_variables(jax.random.PRNGKey(0), {"encoder_input_tokens": (2, 9),
                                                               "decoder_input_tokens": (2, 7)})["params"]
  return model, params


@pytest.fixture(scope="module", params=["dense", "sparse"])
def lm(request):
  model = make_model(CONFIGS[request.param].replace(decoder_only=True, num_encoder_layers=0))
  params = model.get_initial_variables(jax.random.PRNGKey(1), {"decoder_input_tokens": (2, 10)})["params"]
  return model, params


def _logits(model, params, batch):
  return np.asarray(model._forward(params, {k: jnp.asarray(v) for k, v in batch.items()}, rng=None)[0])


def test_params_float32_and_logical_axes(encdec):
  model, params = encdec
  leaves = jax.tree_util.tree_leaves(params)
  assert all(x.dtype == jnp.float32 for x in leaves)
  axes = model.params_logical_axes({"encoder_input_tokens": (2, 9), "decoder_input_tokens": (2, 7)})
  assert jax.tree_util.tree_structure(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)) == \
      jax.tree_util.tree_structure(params)
  assert tuple(axes["encoder"]["layer_0"]["self_attention"]["query"]["kernel"]) == ("embed", "heads", "kv")
  # d_kv is independent of d_model: [embed=32, heads=4, kv=12]
  assert params["encoder"]["layer_0"]["self_attention"]["query"]["kernel"].shape == (32, 4, 12)
  # one relative position bias per stack, shared by its layers
  assert "relpos_bias" in params["encoder"] and "relpos_bias" not in params["encoder"]["layer_0"]


def test_decoder_causality(encdec):
  model, params = encdec
  rng = np.random.RandomState(0)
  batch = random_batch(rng, 2, 9, 7)
  base = _logits(model, params, batch)
  for t in range(6):
    changed = dict(batch)
    dec = batch["decoder_input_tokens"].copy()
    dec[:, t + 1:] = rng.randint(2, VOCAB, dec[:, t + 1:].shape)
    changed["decoder_input_tokens"] = dec
    out = _logits(model, params, changed)
    np.testing.assert_allclose(out[:, :t + 1], base[:, :t + 1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(out[:, t + 1:], base[:, t + 1:])


def test_decoder_only_causality_and_prefix(lm):
  model, params = lm
  rng = np.random.RandomState(1)
  targets = rng.randint(2, VOCAB, (2, 10)).astype(np.int32)
  batch = {"decoder_input_tokens": shift_right(targets), "decoder_target_tokens": targets}
  base = _logits(model, params, batch)
  changed = dict(batch, decoder_input_tokens=batch["decoder_input_tokens"].copy())
  changed["decoder_input_tokens"][:, 6:] = 5
  np.testing.assert_allclose(_logits(model, params, changed)[:, :6], base[:, :6], rtol=1e-5, atol=1e-5)
  # Prefix LM: positions inside the prefix see the whole prefix (so a later prefix token changes them),
  # positions after the prefix stay causal.
  prefix = np.zeros_like(targets)
  prefix[:, :5] = 1
  pbatch = dict(batch, decoder_causal_attention=prefix)
  pbase = _logits(model, params, pbatch)
  pchanged = dict(pbatch, decoder_input_tokens=batch["decoder_input_tokens"].copy())
  pchanged["decoder_input_tokens"][:, 4] = (pchanged["decoder_input_tokens"][:, 4] + 1) % VOCAB + 2
  out = _logits(model, params, pchanged)
  assert not np.allclose(out[:, 0], pbase[:, 0])  # position 0 sees prefix position 4
  later = dict(pbatch, decoder_input_tokens=batch["decoder_input_tokens"].copy())
  later["decoder_input_tokens"][:, 8:] = 3
  np.testing.assert_allclose(_logits(model, params, later)[:, :8], pbase[:, :8], rtol=1e-5, atol=1e-5)


def test_packed_segments_do_not_attend_across(encdec):
  model, params = encdec
  rng = np.random.RandomState(2)
  a, b = random_batch(rng, 1, 5, 4), random_batch(rng, 1, 4, 3)
  packed = {
      "encoder_input_tokens": np.concatenate([a["encoder_input_tokens"], b["encoder_input_tokens"]], 1),
      "decoder_target_tokens": np.concatenate([a["decoder_target_tokens"], b["decoder_target_tokens"]], 1),
      "decoder_input_tokens": np.concatenate([a["decoder_input_tokens"], b["decoder_input_tokens"]], 1),
      "encoder_segment_ids": np.array([[1] * 5 + [2] * 4], np.int32),
      "decoder_segment_ids": np.array([[1] * 4 + [2] * 3], np.int32),
      "encoder_positions": np.array([list(range(5)) + list(range(4))], np.int32),
      "decoder_positions": np.array([list(range(4)) + list(range(3))], np.int32),
  }
  out = _logits(model, params, packed)
  np.testing.assert_allclose(out[:, :4], _logits(model, params, a), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out[:, 4:], _logits(model, params, b), rtol=1e-5, atol=1e-5)


def test_padding_does_not_change_outputs(encdec):
  model, params = encdec
  rng = np.random.RandomState(3)
  batch = random_batch(rng, 2, 6, 5)
  base = _logits(model, params, batch)
  padded = {k: np.concatenate([v, np.zeros((2, 3), v.dtype)], 1) for k, v in batch.items()}
  out = _logits(model, params, padded)
  np.testing.assert_allclose(out[:, :5], base, rtol=1e-5, atol=1e-5)


def test_loss_fn_matches_numpy(encdec):
  model, params = encdec
  cfg = model.config
  rng = np.random.RandomState(4)
  batch = random_batch(rng, 2, 6, 5)
  batch["decoder_loss_weights"][1, 3:] = 0
  logits = _logits(model, params, batch).astype(np.float64)
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
  for smoothing in (0.0, 0.1):
    model_s = make_model(cfg.replace(label_smoothing=smoothing))
    loss, metrics = model_s.loss_fn(params, jbatch, None)
    # NumPy reference: soft targets, CE minus the soft targets' entropy, plus z_loss * logsumexp^2.
    m = logits.max(-1, keepdims=True)
    log_z = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    log_p = logits - log_z[..., None]
    q = np.full(logits.shape, smoothing / (VOCAB - 1))
    np.put_along_axis(q, batch["decoder_target_tokens"][..., None], 1 - smoothing, axis=-1)
    entropy = -(q * np.log(q + 1e-30)).sum(-1)
    tok = -(q * log_p).sum(-1) - entropy + cfg.z_loss * log_z ** 2
    w = batch["decoder_loss_weights"]
    expected = (tok * w).sum() / w.sum()
    if cfg.is_sparse:
      expected += (cfg.moe.aux_loss_coef * float(metrics["experts/auxiliary_loss"])
                   + cfg.moe.router_z_loss_coef * float(metrics["experts/router_z_loss"]))
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5)
    np.testing.assert_allclose(float(metrics["z_loss"]), (cfg.z_loss * log_z ** 2 * w).sum() / w.sum(), rtol=1e-4)
    correct = logits.argmax(-1) == batch["decoder_target_tokens"]
    np.testing.assert_allclose(float(metrics["accuracy"]), (correct * w).sum() / w.sum(), rtol=1e-6)
  # score_batch: summed weighted target log-likelihood
  expected_scores = (np.take_along_axis(log_p, batch["decoder_target_tokens"][..., None], -1)[..., 0] * w).sum(-1)
  np.testing.assert_allclose(np.asarray(model.score_batch(params, jbatch)), expected_scores, rtol=1e-5)
  grads = jax.grad(lambda p: model.loss_fn(p, jbatch, jax.random.PRNGKey(0))[0])(params)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))


def test_first_argmax_matches_argmax_including_ties():
  from stmoe.models.losses import first_argmax
  rng = np.random.RandomState(7)
  x = rng.randint(0, 4, size=(5, 6, 9)).astype(np.float32)  # many ties: the first index must win
  np.testing.assert_array_equal(np.asarray(first_argmax(jnp.asarray(x))), x.argmax(-1))
  y = rng.randn(3, 1000).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(first_argmax(jnp.asarray(y, jnp.bfloat16))),
                                np.asarray(jnp.argmax(jnp.asarray(y, jnp.bfloat16), -1)))


def test_loss_normalizing_factor_constant():
  model = make_model(tiny_config(loss_normalizing_factor=100.0))
  params = model.get_initial_variables(jax.random.PRNGKey(0), {"encoder_input_tokens": (2, 6),
                                                               "decoder_input_tokens": (2, 5)})["params"]
  batch = {k: jnp.asarray(v) for k, v in random_batch(np.random.RandomState(5), 2, 6, 5).items()}
  loss, metrics = model.loss_fn(params, batch, None)
  tokens = float(metrics["num_tokens"])
  per_token, _ = make_model(tiny_config()).loss_fn(params, batch, None)
  np.testing.assert_allclose(float(loss) * 100.0, float(per_token) * tokens, rtol=1e-5)


def test_bfloat16_activations_float32_params():
  cfg = tiny_sparse_config(dtype="bfloat16")
  model = make_model(cfg)
  params = model.get_initial_variables(jax.random.PRNGKey(0), {"encoder_input_tokens": (2, 6),
                                                               "decoder_input_tokens": (2, 5)})["params"]
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
  batch = {k: jnp.asarray(v) for k, v in random_batch(np.random.RandomState(6), 2, 6, 5).items()}
  encoded, _ = model.module.apply({"params": params}, batch["encoder_input_tokens"], method=EncoderDecoder.encode)
  assert encoded.dtype == jnp.bfloat16
  loss, _ = model.loss_fn(params, batch, jax.random.PRNGKey(1))
  assert loss.dtype == jnp.float32 and np.isfinite(float(loss))


def test_dropout_is_stochastic_only_with_rng():
  model = make_model(tiny_config(dropout_rate=0.3))
  params = model.get_initial_variables(jax.random.PRNGKey(0), {"encoder_input_tokens": (2, 6),
                                                               "decoder_input_tokens": (2, 5)})["params"]
  batch = {k: jnp.asarray(v) for k, v in random_batch(np.random.RandomState(7), 2, 6, 5).items()}
  a = model.loss_fn(params, batch, jax.random.PRNGKey(1))[0]
  b = model.loss_fn(params, batch, jax.random.PRNGKey(2))[0]
  c = model.loss_fn(params, batch, jax.random.PRNGKey(1))[0]
  assert float(a) != float(b) and float(a) == float(c)
  assert float(model.loss_fn(params, batch, None)[0]) == float(model.loss_fn(params, batch, None)[0])


def test_tied_logits_use_rescaled_embedding():
  model = make_model(tiny_config(logits_via_embedding=True))
  params = model.get_initial_variables(jax.random.PRNGKey(0), {"encoder_input_tokens": (1, 4),
                                                               "decoder_input_tokens": (1, 3)})["params"]
  assert "head" not in params
  batch = random_batch(np.random.RandomState(8), 1, 4, 3)
  hidden, _ = model.module.apply({"params": params}, *model.module.apply(
      {"params": params}, jnp.asarray(batch["encoder_input_tokens"]), method=EncoderDecoder.encode)[:1],
      jnp.asarray(batch["encoder_input_tokens"]), jnp.asarray(batch["decoder_input_tokens"]),
      method=lambda m, enc, et, dt: m.decoder(dt, valid=dt >= 0, encoded=enc, encoded_valid=et > 0,
                                              deterministic=True))
  emb = np.asarray(params["token_embedder"]["embedding"])
  expected = np.asarray(hidden) * 32 ** -0.5 @ emb.T
  np.testing.assert_allclose(_logits(model, params, batch), expected, rtol=1e-4, atol=1e-5)


def test_cached_decoding_equals_uncached(encdec):
  model, params = encdec
  batch = {k: jnp.asarray(v) for k, v in random_batch(np.random.RandomState(9), 2, 9, 7).items()}
  cached = np.asarray(model.predict_batch(params, batch))
  uncached = np.asarray(model.predict_batch(params, batch, use_cache=False))
  np.testing.assert_array_equal(cached, uncached)
  assert cached.shape == (2, 7)


def test_decoder_only_cached_equals_uncached(lm):
  model, params = lm
  prompts = jnp.asarray([[0, 5, 6, 7, 8, 0, 0, 0], [0, 9, 4, 0, 0, 0, 0, 0]], jnp.int32)
  for batch in ({"decoder_input_tokens": prompts},
                {"decoder_input_tokens": prompts,
                 "decoder_causal_attention": jnp.asarray((np.asarray(prompts) > 0) | (np.arange(8) == 0), jnp.int32)}):
    cached = np.asarray(model.predict_batch(params, batch, max_decode_length=6))
    uncached = np.asarray(model.predict_batch(params, batch, max_decode_length=6, use_cache=False))
    np.testing.assert_array_equal(cached, uncached)
  # Seeded sampling is reproducible and matches between the two paths.
  s1 = model.predict_batch(params, {"decoder_input_tokens": prompts}, jax.random.PRNGKey(3), method="sample",
                           temperature=1.0, top_k=10, max_decode_length=6)
  s2 = model.predict_batch(params, {"decoder_input_tokens": prompts}, jax.random.PRNGKey(3), method="sample",
                           temperature=1.0, top_k=10, max_decode_length=6)
  s3 = model.predict_batch(params, {"decoder_input_tokens": prompts}, jax.random.PRNGKey(3), method="sample",
                           temperature=1.0, top_k=10, max_decode_length=6, use_cache=False)
  np.testing.assert_array_equal(np.asarray(s1), np.asarray(s2))
  np.testing.assert_array_equal(np.asarray(s1), np.asarray(s3))


def test_decoder_only_prompt_alignment_matches_full_forward(lm):
  """The first greedy token after a prompt equals the argmax of a plain forward pass over that prompt."""
  model, params = lm
  prompt = np.array([[0, 5, 6, 7, 8]], np.int32)
  out = np.asarray(model.predict_batch(params, {"decoder_input_tokens": jnp.asarray(
      np.concatenate([prompt, np.zeros((1, 3), np.int32)], 1))}, max_decode_length=2))
  logits = _logits(model, params, {"decoder_input_tokens": prompt, "decoder_target_tokens": np.ones_like(prompt)})
  assert out[0, 0] == logits[0, -1].argmax()


def test_scan_layers_and_remat_match_the_layer_loop():
  """scan_layers (+remat) computes exactly what the plain layer loop computes with the same weights."""
  cfg = tiny_sparse_config(num_encoder_layers=4, num_decoder_layers=4)
  plain, scanned = make_model(cfg), make_model(cfg.replace(scan_layers=True, remat=True))
  shapes = {"encoder_input_tokens": (2, 9), "decoder_input_tokens": (2, 7)}
  params = plain.get_initial_variables(jax.random.PRNGKey(0), shapes)["params"]
  axes = scanned.params_logical_axes(shapes)
  assert tuple(axes["encoder"]["layers"]["layer_1"]["moe"]["experts"]["wi"]) == ("layers", "expert", "embed", "mlp")

  def stack_layers(stack):  # layer_{2g+j} -> layers/layer_j[g]
    out = {k: v for k, v in stack.items() if not k.startswith("layer_")}
    out["layers"] = {f"layer_{j}": jax.tree_util.tree_map(lambda *xs: jnp.stack(xs),
                                                          *[stack[f"layer_{2 * g + j}"] for g in range(2)])
                     for j in range(2)}
    return out

  sparams = dict(params, encoder=stack_layers(params["encoder"]), decoder=stack_layers(params["decoder"]))
  assert jax.tree_util.tree_structure(sparams) == jax.tree_util.tree_structure(
      scanned.get_initial_variables(jax.random.PRNGKey(0), shapes)["params"])
  batch = {k: jnp.asarray(v) for k, v in random_batch(np.random.RandomState(10), 2, 9, 7).items()}
  l1, m1 = plain.loss_fn(params, batch, None)
  l2, m2 = scanned.loss_fn(sparams, batch, None)
  np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
  for key in ("experts/encoder/layer_3/auxiliary_loss", "experts/decoder/layer_1/router_z_loss"):
    np.testing.assert_allclose(float(m1[key]), float(m2[key]), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(plain.predict_batch(params, batch)),
                                np.asarray(scanned.predict_batch(sparams, batch)))
