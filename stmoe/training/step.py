"""Pure, jitted train and eval steps: ``(state, batch) -> (state, metrics)``.

* The dropout rng of step s is ``fold_in(state["rng"], s)``: a resumed run draws exactly the same
  randomness as an uninterrupted one.
* Gradient accumulation splits the global batch into `num_microbatches` microbatches (rows
  i, i+M, i+2M, ... so every device keeps its own rows), scans over them and combines the gradients
  weighted by each microbatch's share of target tokens -- with equal token counts this is exactly the
  big-batch gradient (tests/test_train_step.py checks it).
* Steps are jitted with explicit in/out shardings and the state donated; they must be traced and called
  inside :func:`stmoe.partitioning.mesh_context` so the model's logical sharding constraints apply.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from stmoe import partitioning

Batch = Mapping[str, jax.Array]
LossFn = Callable[[Any, Batch, jax.Array | None], tuple[jax.Array, dict[str, jax.Array]]]

# Metrics that are counts (summed over microbatches); everything else is a token-weighted mean.
SUM_METRICS = ("num_tokens",)


def _token_count(batch: Batch) -> jax.Array:
  if "decoder_loss_weights" in batch:
    return jnp.sum(batch["decoder_loss_weights"].astype(jnp.float32))
  return jnp.asarray(float(batch["decoder_target_tokens"].size), jnp.float32)


def _split_microbatches(batch: Batch, num_microbatches: int) -> Batch:
  """[B, ...] -> [M, B/M, ...] taking rows i, i+M, ... for microbatch i (shard-local selection)."""

  def split(x):
    b = x.shape[0]
    if b % num_microbatches:
      raise ValueError(f"batch size {b} is not divisible by num_microbatches={num_microbatches}.")
    x = x.reshape((b // num_microbatches, num_microbatches) + x.shape[1:])  # [B/M, M, ...]
    return jnp.swapaxes(x, 0, 1)  # [M, B/M, ...]

  return {k: split(v) for k, v in batch.items()}


def grads_and_metrics(loss_fn: LossFn, params: Any, batch: Batch, rng: jax.Array,
                      num_microbatches: int = 1) -> tuple[Any, dict[str, jax.Array]]:
  """Gradients of the batch loss and its metrics, optionally accumulated over microbatches."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if num_microbatches <= 1:
    (_, metrics), grads = grad_fn(params, batch, rng)
    return grads, metrics

  micro = _split_microbatches(batch, num_microbatches)
  total_tokens = _token_count(batch)

  def body(carry, inputs):
    index, mb = inputs
    (_, metrics), grads = grad_fn(params, mb, jax.random.fold_in(rng, index))
    w = _token_count(mb) / total_tokens  # share of this microbatch in the big-batch mean
    acc_g, acc_m = carry
    acc_g = jax.tree.map(lambda a, g: a + w * g, acc_g, grads)
    acc_m = {k: acc_m[k] + (metrics[k] if k in SUM_METRICS else w * metrics[k]) for k in acc_m}
    return (acc_g, acc_m), None

  first_metrics = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), rng)[0][1])
  zeros_m = {k: jnp.zeros(v.shape, v.dtype) for k, v in first_metrics.items()}
  zeros_g = jax.tree.map(jnp.zeros_like, params)
  (grads, metrics), _ = jax.lax.scan(body, (zeros_g, zeros_m), (jnp.arange(num_microbatches), micro))
  return grads, metrics


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                    schedule: Callable[[jax.Array], jax.Array], num_microbatches: int = 1):
  """The pure train step (state, batch) -> (state, metrics); metrics include `learning_rate`."""

  def train_step(state, batch):
    step = state["step"]
    rng = jax.random.fold_in(state["rng"], step)
    grads, metrics = grads_and_metrics(loss_fn, state["params"], batch, rng, num_microbatches)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = dict(metrics)
    metrics["learning_rate"] = schedule(step)
    metrics["grad_norm"] = optax.tree.norm(grads)  # the trainer refuses to save a step where it is not finite
    new_state = {"step": step + 1, "params": params, "opt_state": opt_state, "rng": state["rng"]}
    return new_state, metrics

  return train_step


def make_eval_step(loss_fn: LossFn):
  """(params, batch) -> metrics, deterministic (no dropout)."""

  def eval_step(params, batch):
    _, metrics = loss_fn(params, batch, None)
    return metrics

  return eval_step


def batch_shardings(mesh: Mesh, example_batch: Mapping[str, Any]) -> dict[str, Any]:
  return {k: partitioning.batch_sharding(mesh, len(v.shape)) for k, v in example_batch.items()}


def jit_train_step(train_step, state_shardings, batch_sh, mesh: Mesh):
  """jit with explicit shardings; the state is donated (updated in place)."""
  return jax.jit(train_step, in_shardings=(state_shardings, batch_sh),
                 out_shardings=(state_shardings, partitioning.replicated(mesh)), donate_argnums=(0,))


def jit_eval_step(eval_step, param_shardings, batch_sh, mesh: Mesh):
  return jax.jit(eval_step, in_shardings=(param_shardings, batch_sh), out_shardings=partitioning.replicated(mesh))
