"""Parity with Hugging Face transformers 4.57.6 `NllbMoeSparseMLP` (GShard / fairseq top-2 routing).

HF's NLLB-MoE router (read from transformers/models/nllb_moe/modeling_nllb_moe.py): one routing group of
all batch*length tokens; top-1 = argmax, top-2 = argmax of the rest; slots by cumsum in token order,
every first choice before any second choice (optionally batch-prioritized); training capacity
2*ceil(tokens/E) unless `expert_capacity` is set (absolute), evaluation capacity
ceil(moe_eval_capacity_token_fraction * tokens); the two gates are renormalised by their sum before
(`normalize_router_prob_before_dropping=True`) or after dropping. Its experts are fc1 -> act -> fc2
*with biases*; ours have none (T5 style), so the HF biases are zeroed. Its padding_mask is 1 for padding.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeSparseMLP  # noqa: E402

from stmoe.config import MoeConfig  # noqa: E402
from stmoe.moe import MoeLayer  # noqa: E402

B, L, D, FF, E = 2, 12, 16, 32, 4


def _hf_layer(before_drop: bool, bpr: bool, expert_capacity, eval_fraction=1.0, seed=0):
  torch.manual_seed(seed)
  cfg = transformers.NllbMoeConfig(
      d_model=D, num_experts=E, router_dtype="float32", moe_token_dropout=0.0, activation_dropout=0.0,
      second_expert_policy="all", normalize_router_prob_before_dropping=before_drop,
      batch_prioritized_routing=bpr, expert_capacity=expert_capacity,
      moe_eval_capacity_token_fraction=eval_fraction, activation_function="relu")
  layer = NllbMoeSparseMLP(cfg, ffn_dim=FF)
  with torch.no_grad():
    layer.router.classifier.weight.normal_(0.0, 0.5)  # sharp enough routing that experts overflow
    for expert in layer.experts.values():
      expert.fc1.bias.zero_()
      expert.fc2.bias.zero_()
  return layer


def _our_params(hf) -> dict:
  experts = list(hf.experts.values())
  t = lambda a: jnp.asarray(a.detach().numpy())
  return {"params": {
      "router": {"w": t(hf.router.classifier.weight).T},  # [embed, experts]
      "experts": {
          "wi": jnp.stack([t(e.fc1.weight).T for e in experts]),  # [expert, embed, mlp]
          "wo": jnp.stack([t(e.fc2.weight).T for e in experts]),  # [expert, mlp, embed]
      }}}


@pytest.mark.parametrize("before_drop", [True, False])
@pytest.mark.parametrize("bpr", [False, True])
@pytest.mark.parametrize("mode", ["train_gshard", "train_absolute", "eval_fraction"])
@pytest.mark.parametrize("dispatch", ["sort", "einsum"])
def test_matches_hf_nllb_moe_sparse_mlp(before_drop, bpr, mode, dispatch):
  n = B * L
  if mode == "train_gshard":
    hf = _hf_layer(before_drop, bpr, expert_capacity=None)
    ours = dict(capacity_convention="gshard")
    deterministic = False
  elif mode == "train_absolute":
    hf = _hf_layer(before_drop, bpr, expert_capacity=5)
    ours = dict(capacity_convention="absolute", expert_capacity=5)
    deterministic = False
  else:
    hf = _hf_layer(before_drop, bpr, expert_capacity=None, eval_fraction=0.25)
    ours = dict(capacity_convention="absolute", expert_capacity=math.ceil(0.25 * n))
    deterministic = True
  hf.train(not deterministic)

  x = np.random.RandomState(1).randn(B, L, D).astype(np.float32)
  pad = np.zeros((B, L), np.int64)
  pad[1, -3:] = 1  # HF: 1 = padding
  with torch.no_grad():
    want, (hf_combine, _) = hf(torch.from_numpy(x), padding_mask=torch.from_numpy(pad.reshape(-1)))
  want = want.numpy()

  cfg = MoeConfig(num_experts=E, num_selected_experts=2, d_ff=FF, activations=("relu",), group_size=n,
                  min_expert_capacity=1, renormalize="before_drop" if before_drop else "after_drop",
                  second_expert_policy="all", batch_prioritized_routing=bpr, dispatch=dispatch, **ours)
  layer = MoeLayer(cfg)
  (y, aux), state = layer.apply(
      _our_params(hf), jnp.asarray(x), jnp.asarray(1 - pad), deterministic=deterministic,
      rngs={"dropout": jax.random.PRNGKey(0)}, capture_intermediates=lambda m, name: m.name == "router")
  route = state["intermediates"]["router"]["__call__"][0]

  # Same combine weights per (token, expert): which tokens go where, which drop, with which gate.
  combine = np.zeros((n, E), np.float32)
  ei = np.asarray(route.expert_index).reshape(n, 2)
  cw = np.asarray(route.combine_weights).reshape(n, 2)
  for j in range(2):
    np.put_along_axis(combine, ei[:, j:j + 1], cw[:, j:j + 1], axis=1)
  np.testing.assert_allclose(combine, hf_combine.numpy(), atol=1e-6)
  np.testing.assert_allclose(np.asarray(y), want, atol=1e-5, rtol=1e-5)
  if mode != "train_gshard":  # the small capacities really drop assignments
    assert (cw[pad.reshape(-1) == 0] == 0).any()
