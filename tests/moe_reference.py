"""Plain NumPy loop references for the routers, losses and the whole MoE layer.

Written from the papers' descriptions (Switch, ST-MoE, GShard/fairseq, Shazeer 2017, expert choice),
one token at a time, independently of stmoe's vectorised JAX code: the tests compare the two.
"""

from __future__ import annotations

import math

import numpy as np


def softmax(v: np.ndarray) -> np.ndarray:
  v = np.asarray(v, np.float64)
  e = np.exp(v - v.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def logsumexp(v: np.ndarray) -> np.ndarray:
  v = np.asarray(v, np.float64)
  m = v.max(axis=-1)
  return m + np.log(np.exp(v - m[..., None]).sum(axis=-1))


def capacity(convention: str, group_size: int, num_experts: int, cf: float = 1.25, min_cap: int = 4,
             absolute: int | None = None) -> int:
  if convention == "stmoe":
    c = max(min_cap, int(round(cf * group_size / num_experts)))
  elif convention == "gshard":
    c = max(min_cap, 2 * math.ceil(group_size / num_experts))
  else:
    c = absolute
  return max(1, min(c, group_size))


def tokens_choose(logits, mask, *, k, cap, renormalize="none", policy="all", threshold=0.2, bpr=False,
                  uniform=None):
  """Per group, per token: choices, gates, slots. Returns dict of [G, T, k] arrays (positions -1 if dropped)."""
  g_n, t_n, e_n = logits.shape
  mask = np.ones((g_n, t_n)) if mask is None else np.asarray(mask)
  expert = np.zeros((g_n, t_n, k), np.int64)
  gate = np.zeros((g_n, t_n, k))
  pos = np.full((g_n, t_n, k), -1)
  kept = np.zeros((g_n, t_n, k), bool)
  for g in range(g_n):
    probs = softmax(logits[g])
    routed = np.zeros((t_n, k), bool)
    for t in range(t_n):
      p = probs[t]
      order = sorted(range(e_n), key=lambda i: -p[i])
      choices = order[:k]
      if policy == "sampling" and uniform is not None:
        first = order[0]
        rest = [p[i] if i != first else 0.0 for i in range(e_n)]
        total = sum(rest)
        acc, second = 0.0, None
        for i in range(e_n):
          acc += rest[i] / total
          if acc > uniform[g, t] and rest[i] > 0:
            second = i
            break
        choices = [first, second if second is not None else order[1]]
      gates = [p[i] for i in choices]
      if renormalize == "before_drop":
        s = sum(gates)
        gates = [x / s for x in gates]
      ok = [mask[g, t] > 0] * k
      if policy == "random" and uniform is not None:
        ok[1] = ok[1] and uniform[g, t] < gates[1] / threshold
      expert[g, t] = choices
      gate[g, t] = gates
      routed[t] = ok
    if bpr:
      conf = [(probs[t].max() if mask[g, t] > 0 else -1.0) for t in range(t_n)]
      admit = sorted(range(t_n), key=lambda t: (-conf[t], t))
    else:
      admit = list(range(t_n))
    fill = [0] * e_n
    for j in range(k):
      for t in admit:
        if not routed[t, j]:
          continue
        e = expert[g, t, j]
        if fill[e] < cap:
          pos[g, t, j] = fill[e]
          kept[g, t, j] = True
        fill[e] += 1
    for t in range(t_n):
      gate[g, t] = gate[g, t] * kept[g, t]
      if renormalize == "after_drop":
        s = gate[g, t].sum()
        gate[g, t] = gate[g, t] / s if s > 0 else 0.0
  return dict(expert=expert, gate=gate, pos=pos, kept=kept)


def expert_choice(logits, mask, *, cap):
  """Each expert picks its top-`cap` real tokens (ties: lower index). Returns [G, T, E] gate, pos, kept."""
  g_n, t_n, e_n = logits.shape
  mask = np.ones((g_n, t_n)) if mask is None else np.asarray(mask)
  gate = np.zeros((g_n, t_n, e_n))
  pos = np.full((g_n, t_n, e_n), -1)
  for g in range(g_n):
    probs = softmax(logits[g])
    for e in range(e_n):
      cands = sorted([t for t in range(t_n) if mask[g, t] > 0], key=lambda t: (-probs[t, e], t))
      for c, t in enumerate(cands[:cap]):
        gate[g, t, e] = probs[t, e]
        pos[g, t, e] = c
  return dict(expert=np.broadcast_to(np.arange(e_n), (g_n, t_n, e_n)), gate=gate, pos=pos, kept=pos >= 0)


def normal_cdf(z):
  return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def cv_squared(v):
  v = np.asarray(v, np.float64)
  if len(v) <= 1:
    return 0.0
  return v.var() / (v.mean() ** 2 + 1e-10)


def noisy_top_k(clean, noise_std, mask, *, k, normal=None, w_importance=1.0, w_load=1.0):
  """Shazeer 2017: gates, and the w_importance * importance + w_load * load auxiliary loss (averaged over groups)."""
  g_n, t_n, e_n = clean.shape
  mask = np.ones((g_n, t_n)) if mask is None else np.asarray(mask)
  dense = np.zeros((g_n, t_n, e_n))
  aux = 0.0
  for g in range(g_n):
    importance = np.zeros(e_n)
    load = np.zeros(e_n)
    for t in range(t_n):
      h = clean[g, t] + (0.0 if normal is None else normal[g, t] * noise_std[g, t])
      top = sorted(range(e_n), key=lambda i: -h[i])[:k]
      w = softmax(np.array([h[i] for i in top]))
      if mask[g, t] > 0:
        for i, wi in zip(top, w):
          dense[g, t, i] = wi
        importance += dense[g, t]
        if normal is None:
          load += dense[g, t] > 0
        else:
          for i in range(e_n):
            others = sorted([h[j] for j in range(e_n) if j != i], reverse=True)
            kth_excluding = others[k - 1]
            load[i] += normal_cdf((clean[g, t, i] - kth_excluding) / noise_std[g, t, i])
    aux += w_importance * cv_squared(importance) + w_load * cv_squared(load)
  return dense, aux / g_n


def z_loss(logits, mask):
  lse = logsumexp(logits)
  mask = np.ones(lse.shape) if mask is None else np.asarray(mask, np.float64)
  return float((lse**2 * mask).sum() / mask.sum())


def load_balance(logits, expert, mask, count):
  """E * sum_i f_i P_i per group, averaged; f from top-1 ('top1') or any of the k choices ('all')."""
  g_n, t_n, e_n = logits.shape
  mask = np.ones((g_n, t_n)) if mask is None else np.asarray(mask)
  total = 0.0
  for g in range(g_n):
    probs = softmax(logits[g])
    real = [t for t in range(t_n) if mask[g, t] > 0]
    f = np.zeros(e_n)
    p = np.zeros(e_n)
    for t in real:
      chosen = set(expert[g, t, :1] if count == "top1" else expert[g, t])
      for i in chosen:
        f[i] += 1.0 / len(real)
      p += probs[t] / len(real)
    total += e_n * float((f * p).sum())
  return total / g_n


ACT = {
    "relu": lambda v: np.maximum(v, 0.0),
    "linear": lambda v: v,
    "gelu": lambda v: 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3))),
}


def expert_mlp(x, params, e, activations):
  """One token through expert e: T5 MLP without biases (gated if several activations)."""
  if len(activations) == 1:
    h = ACT[activations[0]](x @ params["wi"][e])
  else:
    h = np.ones(params["wo"].shape[1])
    for i, a in enumerate(activations):
      h = h * ACT[a](x @ params[f"wi_{i}"][e])
  return h @ params["wo"][e]


def moe_layer(x, mask, params, route, activations):
  """Whole layer, one token at a time: y[t] = sum over kept choices of gate * expert(x[t]).

  x: [groups, tokens, d]; route: dict from tokens_choose / expert_choice.
  """
  y = np.zeros(x.shape)
  g_n, t_n, k = route["kept"].shape
  for g in range(g_n):
    for t in range(t_n):
      for j in range(k):
        if route["kept"][g, t, j]:
          y[g, t] += route["gate"][g, t, j] * expert_mlp(x[g, t], params, route["expert"][g, t, j], activations)
  return y


def _noisy_top_k_token(clean, std, normal, k):
  """One token, one gating network (Shazeer 2017 eq. 3-5, 8-9): (top indices, their gates, P(x, .) or None)."""
  n = len(clean)
  h = [clean[i] + (0.0 if normal is None else normal[i] * std[i]) for i in range(n)]
  top = sorted(range(n), key=lambda i: -h[i])[:k]  # stable: ties go to the lower index
  gates = softmax(np.array([h[i] for i in top]))
  if normal is None:
    return top, gates, None
  p = np.zeros(n)
  for i in range(n):
    others = sorted([h[j] for j in range(n) if j != i], reverse=True)
    p[i] = 1.0 if k >= n else normal_cdf((clean[i] - others[k - 1]) / std[i])
  return top, gates, p


def hierarchical(primary, primary_std, clean, std, mask, *, kp, ks, cap, renormalize="none",
                 primary_normal=None, normal=None, w_importance=1.0, w_load=1.0):
  """Shazeer 2017 Appendix B, one token at a time, with capacity slots as in tokens_choose.

  primary [G, T, a], clean [G, T, a, b]; the *_std / *_normal arrays are shaped alike (normal None: no noise).
  Returns (route dict of [G, T, kp*ks] arrays as tokens_choose, extras) with extras: importance and load
  [G, a, b], importance_loss / load_loss [G] (CV^2 of each), aux (w_importance * importance_loss + w_load *
  load_loss, averaged over groups), z.
  """
  g_n, t_n, a, b = clean.shape
  k = kp * ks
  mask = np.ones((g_n, t_n)) if mask is None else np.asarray(mask)
  expert = np.zeros((g_n, t_n, k), np.int64)
  gate = np.zeros((g_n, t_n, k))
  pos = np.full((g_n, t_n, k), -1)
  kept = np.zeros((g_n, t_n, k), bool)
  importance = np.zeros((g_n, a, b))
  load = np.zeros((g_n, a, b))
  imp_loss, load_loss = np.zeros(g_n), np.zeros(g_n)
  z_primary, z_secondary, n_real = 0.0, 0.0, 0
  for g in range(g_n):
    load_primary = np.zeros(a)  # Load_primary(X)_i
    load_secondary = np.zeros((a, b))  # Load_i(X^(i))_j
    size = np.zeros(a)  # |X^(i)|
    for t in range(t_n):
      real = mask[g, t] > 0  # padding tokens get choices but are never routed and are not in X
      if real:
        n_real += 1
        z_primary += logsumexp(primary[g, t]) ** 2
        z_secondary += sum(logsumexp(clean[g, t, i]) ** 2 for i in range(a)) / a
      pn = None if primary_normal is None else primary_normal[g, t]
      groups, g_primary, p_primary = _noisy_top_k_token(primary[g, t], None if pn is None else primary_std[g, t], pn,
                                                        kp)
      if real:
        load_primary += p_primary if p_primary is not None else np.isin(np.arange(a), groups)
      choices = []
      for r, (i, gi) in enumerate(zip(groups, g_primary)):
        sn = None if normal is None else normal[g, t, i]
        inner, g_inner, p_inner = _noisy_top_k_token(clean[g, t, i], None if sn is None else std[g, t, i], sn, ks)
        if real:
          size[i] += 1
          load_secondary[i] += p_inner if p_inner is not None else np.isin(np.arange(b), inner)
        for s, (j, gj) in enumerate(zip(inner, g_inner)):
          if real:
            importance[g, i, j] += gi * gj  # eq. 13
          choices.append((-gi * gj, r, s, i * b + j, gi * gj))
      choices.sort()  # heaviest first; ties by primary rank, then secondary rank
      expert[g, t] = [c[3] for c in choices]
      gate[g, t] = [c[4] for c in choices]
    for i in range(a):  # eq. 14
      if size[i] > 0:
        load[g, i] = load_primary[i] * load_secondary[i] / size[i]
    imp_loss[g] = cv_squared(importance[g].reshape(-1))
    load_loss[g] = cv_squared(load[g].reshape(-1))
    fill = [0] * (a * b)
    for r in range(k):  # every token's heaviest choice before any second heaviest, ...
      for t in range(t_n):
        if mask[g, t] <= 0:
          continue
        e = expert[g, t, r]
        if fill[e] < cap:
          pos[g, t, r] = fill[e]
          kept[g, t, r] = True
        fill[e] += 1
    gate[g] = gate[g] * kept[g]
    if renormalize == "after_drop":
      s = gate[g].sum(-1, keepdims=True)
      gate[g] = np.where(s > 0, gate[g] / np.where(s > 0, s, 1.0), 0.0)
  extras = dict(importance=importance, load=load, importance_loss=imp_loss, load_loss=load_loss,
                aux=float((w_importance * imp_loss + w_load * load_loss).mean()), z=(z_primary + z_secondary) / max(n_real, 1))
  return dict(expert=expert, gate=gate, pos=pos, kept=kept), extras


def check_route(out, want: dict) -> None:
  """A router's output (stmoe.moe.routing.RouterOutput) against a reference dict from this module:
  kept flags, expert indices and slot positions exactly, combine weights to 1e-6."""
  kept = np.asarray(out.kept)
  np.testing.assert_array_equal(kept, want["kept"])
  np.testing.assert_array_equal(np.asarray(out.expert_index), want["expert"])
  np.testing.assert_array_equal(np.where(kept, np.asarray(out.position), -1), want["pos"])
  np.testing.assert_allclose(np.asarray(out.combine_weights), want["gate"], atol=1e-6)


def noisy_smooth_load(clean, noise_std, mask, *, k, normal=None):
  """Shazeer 2017 eq. 8-10 over every real token of every group: sum_x P(x, i) (the 0/1 selection without noise)."""
  g_n, t_n, e_n = clean.shape
  mask = np.ones((g_n, t_n)) if mask is None else np.asarray(mask)
  load = np.zeros(e_n)
  for g in range(g_n):
    for t in range(t_n):
      if mask[g, t] <= 0:
        continue
      top, _, p = _noisy_top_k_token(clean[g, t], None if normal is None else noise_std[g, t],
                                     None if normal is None else normal[g, t], k)
      load += p if p is not None else np.isin(np.arange(e_n), top)
  return load


def cv(v) -> float:
  """Coefficient of variation std / mean (population std); 0 for a zero mean."""
  v = np.asarray(v, np.float64)
  return float(v.std() / v.mean()) if v.mean() > 0 else 0.0


def balance_metrics(expert, gate, routed, mask, num_experts) -> dict:
  """Batch-level importance_cv, load_cv, max_mean_load of a route before capacity, one choice at a time.

  expert, gate, routed: [G, T, k] (the choices, their gates, whether the router made them); mask [G, T].
  """
  importance, load = np.zeros(num_experts), np.zeros(num_experts)
  g_n, t_n, k = expert.shape
  for g in range(g_n):
    for t in range(t_n):
      for j in range(k):
        if mask[g, t] > 0 and routed[g, t, j]:
          importance[expert[g, t, j]] += gate[g, t, j]
          load[expert[g, t, j]] += 1
  return dict(importance_cv=cv(importance), load_cv=cv(load), max_mean_load=load.max() / load.mean())


def logit_scale(logits, mask) -> dict:
  """router_logsumexp (mean over real tokens) and router_max_abs_logit (max over real tokens) of [G, T, E] logits."""
  real = np.asarray(mask) > 0
  return dict(router_logsumexp=float(logsumexp(logits)[real].mean()),
              router_max_abs_logit=float(np.abs(np.asarray(logits, np.float64))[real].max()))
