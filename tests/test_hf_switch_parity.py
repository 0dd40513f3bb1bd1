"""Parity of stmoe.interop.hf_switch with Hugging Face's torch SwitchTransformers (random small models).

References are transformers' own model: its logits, its greedy `generate`, its router loss functions
applied to its own per-layer router logits, and its sparse-block placement.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf_switch_module = pytest.importorskip("transformers.models.switch_transformers.modeling_switch_transformers")

from stmoe.config import ModelConfig, MoeConfig, SparseLayout  # noqa: E402
from hf_reference import max_rel_err, padded_batch, summed_loglik  # noqa: E402
from stmoe.interop import hf_switch  # noqa: E402
from stmoe.models.api import make_model  # noqa: E402

VOCAB = 100
RTOL = 1e-4


def _hf_switch(seed: int, **config):
  torch.manual_seed(seed)
  base = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_heads=6, num_layers=4, num_decoder_layers=4,
              num_sparse_encoder_layers=2, num_sparse_decoder_layers=2, num_experts=4, expert_capacity=64,
              router_jitter_noise=0.01, dropout_rate=0.0, decoder_start_token_id=0)
  base.update(config)
  return transformers.SwitchTransformersForConditionalGeneration(
      transformers.SwitchTransformersConfig(**base)).eval()


@pytest.fixture(scope="module")
def switch():
  """4+4 layers, sparse step 2 (blocks 1 and 3 sparse), 4 ReLU experts, capacity 64 (nothing drops).

  Jitter is 0.01 as in HF's default: eval mode (HF) and deterministic=True (stmoe) must both ignore it.
  6 heads x d_kv 8 = 48 != d_model 32.
  """
  return _hf_switch(0)


@pytest.fixture(scope="module")
def switch_dir(switch, tmp_path_factory):
  path = tmp_path_factory.mktemp("switch")
  switch.save_pretrained(path)
  return str(path)


def _batch(rng, batch: int, enc_len: int, dec_len: int, pad: bool = True) -> dict[str, np.ndarray]:
  return padded_batch(rng, VOCAB, batch, enc_len, dec_len, pad=pad, eos_last=True)


def _hf_forward(hf_model, batch):
  enc = torch.tensor(batch["encoder_input_tokens"], dtype=torch.long)
  with torch.no_grad():
    return hf_model(input_ids=enc, attention_mask=(enc > 0).long(), output_router_logits=True,
                    decoder_input_ids=torch.tensor(batch["decoder_input_tokens"], dtype=torch.long))


def _torch_scores(out, batch) -> np.ndarray:
  return summed_loglik(out.logits, batch)


def test_switch_scores_match_torch(switch):
  model, params = hf_switch.load_pretrained(switch)
  cfg = model.config
  assert cfg.encoder_sparse.sparse_indices(4) == (1, 3) and cfg.decoder_sparse.sparse_indices(4) == (1, 3)
  assert cfg.moe.num_selected_experts == 1 and cfg.moe.activations == ("relu",) and cfg.logits_via_embedding
  rng = np.random.RandomState(1)
  score = jax.jit(model.score_batch)
  for shape in ((2, 7, 5), (3, 13, 9)):
    batch = _batch(rng, *shape)
    ref = _torch_scores(_hf_forward(switch, batch), batch)
    assert max_rel_err(score(params, batch), ref) < RTOL, shape


def test_directory_load_equals_memory_load(switch, switch_dir):
  """save_pretrained directory (safetensors, read without torch) and in-memory model give identical params."""
  flat = lambda params: {"/".join(str(k.key) for k in path): np.asarray(v)
                         for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  from_memory = flat(hf_switch.load_pretrained(switch)[1])
  from_dir = flat(hf_switch.load_pretrained(switch_dir)[1])
  assert from_dir.keys() == from_memory.keys()
  assert from_dir["encoder/layer_1/moe/experts/wi"].shape == (4, 32, 48)
  assert from_dir["encoder/layer_1/moe/router/w"].shape == (32, 4)
  for name, value in from_memory.items():
    np.testing.assert_array_equal(from_dir[name], value, err_msg=name)


def test_token_dropping_matches_torch():
  """Capacity 2 per sequence with 4 experts: tokens overflow, and the same tokens must drop as in HF.

  HF counts capacity along each sequence; group_size = sequence length (both stacks length 8) makes
  stmoe's groups the same sequences. Right padding never takes a slot before a real token, in either.
  """
  length = 8
  hf = _hf_switch(4, num_layers=2, num_decoder_layers=2, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
                  expert_capacity=2)
  model, params = hf_switch.load_pretrained(hf, group_size=length)
  assert model.config.moe.capacity_convention == "absolute" and model.config.moe.expert_capacity == 2
  batch = _batch(np.random.RandomState(6), 3, length, length)
  _, metrics = jax.jit(lambda p, b: model.loss_fn(p, b, None))(params, batch)
  for stack in ("encoder", "decoder"):
    assert metrics[f"experts/{stack}/layer_1/fraction_tokens_left_behind"] > 0.1  # the drop path is exercised
  ref = _torch_scores(_hf_forward(hf, batch), batch)
  assert max_rel_err(jax.jit(model.score_batch)(params, batch), ref) < RTOL


def test_router_losses_match_hf_definitions(switch):
  """Per layer, our aux/z losses equal HF's load_balancing_loss_func / router_z_loss_func on HF's logits.

  No padding (HF includes padding tokens in both losses, stmoe excludes them) and nothing dropped (HF
  counts a dropped token as routed to expert 0). HF's reported encoder_z_loss is the mean over the stack's
  sparse layers, so it equals the mean of ours; its encoder_aux_loss pools all sparse layers' tokens
  before multiplying f and P, which is not a mean of per-layer losses (docs/interop.md).
  """
  length = 8
  model, params = hf_switch.load_pretrained(switch, group_size=length)  # groups = HF's sequences
  batch = _batch(np.random.RandomState(3), 3, length, length, pad=False)
  out = _hf_forward(switch, batch)
  _, metrics = jax.jit(lambda p, b: model.loss_fn(p, b, None))(params, batch)
  for stack, per_layer in (("encoder", out.encoder_router_logits), ("decoder", out.decoder_router_logits)):
    z_values = []
    for layer in (1, 3):
      logits, expert_index = per_layer[layer]  # [batch, length, experts], [batch, length]
      hf_z = float(hf_switch_module.router_z_loss_func(logits))
      hf_aux = float(hf_switch_module.load_balancing_loss_func(torch.softmax(logits, -1), expert_index))
      ours_z = float(metrics[f"experts/{stack}/layer_{layer}/router_z_loss"])
      ours_aux = float(metrics[f"experts/{stack}/layer_{layer}/auxiliary_loss"])
      np.testing.assert_allclose(ours_z, hf_z, rtol=RTOL)
      np.testing.assert_allclose(ours_aux, hf_aux, rtol=RTOL)
      z_values.append(ours_z)
    hf_stack_z = float(out.encoder_z_loss if stack == "encoder" else out.decoder_z_loss)
    np.testing.assert_allclose(np.mean(z_values), hf_stack_z, rtol=RTOL)


def test_greedy_decoding_matches_generate(switch_dir):
  hf = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(switch_dir).eval()
  with torch.no_grad():
    hf.lm_head.weight[1] *= 2.5  # tied: scales EOS's embedding row too; makes EOS likely enough to appear
  model, params = hf_switch.load_pretrained(hf)
  rng = np.random.RandomState(5)
  steps, rows = 8, 6
  enc = rng.randint(2, VOCAB, (rows, 9)).astype(np.int32)
  enc[1, 6:] = 0
  with torch.no_grad():
    ref = hf.generate(input_ids=torch.tensor(enc, dtype=torch.long), attention_mask=torch.tensor(enc > 0).long(),
                      do_sample=False, num_beams=1, max_new_tokens=steps).numpy()[:, 1:]
  ref = np.pad(ref, ((0, 0), (0, steps - ref.shape[1])))
  ours = np.asarray(model.predict_batch(params, {"encoder_input_tokens": enc,
                                                 "decoder_input_tokens": np.zeros((rows, steps), np.int32)}))
  lengths = []
  for row_ours, row_ref in zip(ours, ref):
    end = int(np.argmax(row_ref == 1)) + 1 if (row_ref == 1).any() else steps
    np.testing.assert_array_equal(row_ours[:end], row_ref[:end])
    assert not row_ours[end:].any()
    lengths.append(end)
  assert max(lengths) > 2, lengths


@pytest.mark.parametrize("num_layers,num_sparse", [(4, 2), (4, 1), (4, 4), (6, 3), (5, 2), (4, 0), (1, 0)])
def test_sparse_placement_matches_hf(num_layers, num_sparse):
  """Our SparseLayout reproduces which blocks HF builds sparse (including HF's num_sparse=0 quirk)."""
  hf_cfg = transformers.SwitchTransformersConfig(
      vocab_size=10, d_model=8, d_kv=4, d_ff=8, num_heads=2, num_experts=2, num_layers=num_layers,
      num_decoder_layers=num_layers, num_sparse_encoder_layers=num_sparse, num_sparse_decoder_layers=num_sparse)
  stack = hf_switch_module.SwitchTransformersStack(hf_cfg)
  hf_sparse = tuple(i for i, block in enumerate(stack.block) if block.is_sparse)
  ours = hf_switch.config_from_hf(hf_cfg)
  assert ours.encoder_sparse.sparse_indices(num_layers) == hf_sparse
  assert ours.decoder_sparse.sparse_indices(num_layers) == hf_sparse


def test_config_mapping():
  cfg = hf_switch.config_from_hf({
      "model_type": "switch_transformers", "architectures": ["SwitchTransformersForConditionalGeneration"],
      "vocab_size": 32128, "d_model": 768, "d_kv": 64, "d_ff": 3072, "num_heads": 12, "num_layers": 12,
      "num_decoder_layers": 12, "encoder_sparse_step": 2, "decoder_sparse_step": 2, "num_experts": 8,
      "expert_capacity": 64, "router_jitter_noise": 0.01, "router_z_loss_coef": 0.001,
      "router_aux_loss_coef": 0.001, "router_dtype": "float32", "dense_act_fn": "relu", "dropout_rate": 0.1,
      "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}, group_size=512, dtype="bfloat16",
      moe_overrides={"dispatch": "einsum"})
  moe = cfg.moe
  assert (moe.num_experts, moe.num_selected_experts, moe.d_ff, moe.expert_capacity) == (8, 1, 3072, 64)
  assert moe.capacity_convention == "absolute" and moe.renormalize == "none" and moe.activations == ("relu",)
  assert (moe.jitter_noise, moe.router_z_loss_coef, moe.aux_loss_coef) == (0.01, 0.001, 0.001)
  assert moe.expert_dropout == 0.1 and moe.group_size == 512 and moe.dispatch == "einsum"
  assert cfg.encoder_sparse.sparse_indices(12) == (1, 3, 5, 7, 9, 11) and cfg.dtype == "bfloat16"
  assert cfg.logits_via_embedding  # PretrainedConfig's default tie_word_embeddings=True


def test_unsupported_inputs_fail_clearly(switch):
  base = switch.config.to_dict()
  with pytest.raises(ValueError, match="router_bias"):
    hf_switch.config_from_hf({**base, "router_bias": True})
  with pytest.raises(ValueError, match="model_type='t5'"):
    hf_switch.config_from_hf({**base, "model_type": "t5"})
  state = {k: v.numpy() for k, v in switch.state_dict().items()}
  moved = hf_switch.config_from_hf({**base, "encoder_sparse_step": 3})  # blocks 1 only, but weights have 1 and 3
  with pytest.raises(ValueError, match="does not match the weights"):
    hf_switch.params_from_state_dict(state, moved)


def test_export_round_trip_and_native_model_parity(switch, tmp_path):
  """hf_switch.save_pretrained writes what transformers loads: HF -> stmoe -> HF is exact, and a top-1 model
  initialised in stmoe scores the same in transformers after export."""
  model, params = hf_switch.load_pretrained(switch)
  hf_switch.save_pretrained(params, model.config, tmp_path / "round_trip")
  back, info = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(
      tmp_path / "round_trip", output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  original = switch.state_dict()
  assert back.state_dict().keys() == original.keys()
  for name, value in back.state_dict().items():
    assert torch.equal(value, original[name]), name
  assert (back.config.encoder_sparse_step, back.config.expert_capacity) == (2, 64)

  cfg = ModelConfig(vocab_size=VOCAB, d_model=16, num_heads=2, d_kv=8, d_ff=24, num_encoder_layers=3,
                    num_decoder_layers=2, activations=("relu",), logits_via_embedding=False,
                    moe=MoeConfig(num_experts=3, num_selected_experts=1, d_ff=24, activations=("relu",),
                                  capacity_convention="stmoe"),
                    encoder_sparse=SparseLayout(kind="hf_switch", every=2),
                    decoder_sparse=SparseLayout(kind="hf_switch", every=1))
  native_model = make_model(cfg)
  native_params = native_model.get_initial_variables(
      jax.random.PRNGKey(2), {"encoder_input_tokens": (1, 4), "decoder_input_tokens": (1, 4)})["params"]
  with pytest.raises(ValueError, match="expert_capacity="):
    hf_switch.save_pretrained(native_params, cfg, tmp_path / "native")  # "stmoe" capacity: HF needs a count
  hf_switch.save_pretrained(native_params, cfg, tmp_path / "native", expert_capacity=64)
  hf = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(tmp_path / "native").eval()
  hf_sparse = [[b.is_sparse for b in s.block] for s in (hf.encoder, hf.decoder)]
  assert hf_sparse == [[False, True, False], [True, True]] and not hf.config.tie_word_embeddings
  batch = _batch(np.random.RandomState(9), 3, 8, 6)
  ref = _torch_scores(_hf_forward(hf, batch), batch)
  assert max_rel_err(jax.jit(native_model.score_batch)(native_params, batch), ref) < RTOL

  top2 = cfg.replace(moe=MoeConfig(num_experts=3, num_selected_experts=2, d_ff=24, activations=("relu",),
                                   renormalize="after_drop"))
  with pytest.raises(ValueError, match="k=2.*renormalize"):
    hf_switch.to_hf_config(top2, expert_capacity=8)
