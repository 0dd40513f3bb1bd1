"""The t5x-style model API: get_initial_variables, loss_fn, score_batch, predict_batch.

One object per network shape wraps the linen module and the batch conventions (t5x feature names):
  encoder_input_tokens, decoder_input_tokens, decoder_target_tokens, decoder_loss_weights,
  encoder_segment_ids / decoder_segment_ids, encoder_positions / decoder_positions (packing),
  decoder_causal_attention (decoder-only prefix LM: 1 on the inputs part).
Token id 0 is padding (and the decoder's start token), 1 is EOS.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from stmoe import decoding
from stmoe.config import ModelConfig
from stmoe.models.losses import cross_entropy_with_z_loss, first_argmax, moe_losses_and_metrics
from stmoe.models.networks import DecoderOnly, EncoderDecoder

Array = jax.Array
Batch = Mapping[str, Array]
Params = Any


class BaseModel:
  """Shared loss / scoring logic; subclasses define the forward pass and decoding."""

  def __init__(self, config: ModelConfig):
    self.config = config
    self.module = self._make_module()

  # --- subclass hooks -----------------------------------------------------------------------------------
  def _make_module(self) -> nn.Module:
    raise NotImplementedError

  def _dummy_inputs(self, input_shapes: Mapping[str, tuple[int, ...]]) -> tuple[tuple, dict]:
    raise NotImplementedError

  def _forward(self, params: Params, batch: Batch, *, rng: Array | None):
    """-> (logits [batch, length, vocab] float32, auxes)."""
    raise NotImplementedError

  # --- initialisation -----------------------------------------------------------------------------------
  def init_boxed(self, rng: Array, input_shapes: Mapping[str, tuple[int, ...]]) -> dict:
    """Variables with logical-axis boxes (nn.LogicallyPartitioned); use under jax.eval_shape or sharded jit."""
    args, kwargs = self._dummy_inputs(input_shapes)
    return self.module.init({"params": rng}, *args, deterministic=True, **kwargs)

  def get_initial_variables(self, rng: Array, input_shapes: Mapping[str, tuple[int, ...]],
                            input_types: Mapping[str, Any] | None = None) -> dict:
    """{"params": float32 parameter pytree}, unboxed. input_types is accepted for t5x compatibility."""
    del input_types
    return nn.unbox(self.init_boxed(rng, input_shapes))

  def params_logical_axes(self, input_shapes: Mapping[str, tuple[int, ...]]) -> Any:
    """PartitionSpecs of logical axis names, same tree as params; nothing is materialised."""
    abstract = jax.eval_shape(lambda rng: self.init_boxed(rng, input_shapes), jax.random.PRNGKey(0))
    return nn.get_partition_spec(abstract)["params"]

  # --- losses -------------------------------------------------------------------------------------------
  def loss_fn(self, params: Params, batch: Batch, dropout_rng: Array | None,
              normalizer: float | Array | None = None) -> tuple[Array, dict[str, Array]]:
    """Training loss and metrics. dropout_rng=None runs deterministically (eval capacity factor, no dropout).

    The loss is sum(token losses * weights) / normalizer, where normalizer defaults to the config's
    loss_normalizing_factor, or else the number of target tokens (sum of weights); pass the global token
    count for exact gradient accumulation over microbatches. Sparse models add
    aux_loss_coef * mean(auxiliary loss over MoE layers) + router_z_loss_coef * mean(router z-loss).
    """
    cfg = self.config
    logits, auxes = self._forward(params, batch, rng=dropout_rng)
    targets = batch["decoder_target_tokens"]
    weights = _loss_weights(batch)  # [batch, length]
    token_loss, z_term = cross_entropy_with_z_loss(logits, targets, label_smoothing=cfg.label_smoothing,
                                                   z_loss=cfg.z_loss)
    num_tokens = jnp.sum(weights)
    if normalizer is None:
      normalizer = cfg.loss_normalizing_factor if cfg.loss_normalizing_factor else jnp.maximum(num_tokens, 1e-8)
    loss = jnp.sum(token_loss * weights) / normalizer
    z_loss = jnp.sum(z_term * weights) / normalizer
    correct = (first_argmax(logits) == targets).astype(jnp.float32)
    metrics = {
        "cross_entropy": loss - z_loss,
        "z_loss": z_loss,
        "accuracy": jnp.sum(correct * weights) / jnp.maximum(num_tokens, 1e-8),
        "num_tokens": num_tokens,
    }
    if cfg.is_sparse:
      moe_loss, moe_metrics = moe_losses_and_metrics(
          auxes, aux_loss_coef=cfg.moe.aux_loss_coef, router_z_loss_coef=cfg.moe.router_z_loss_coef)
      loss = loss + moe_loss
      metrics.update(moe_metrics)
    metrics["loss"] = loss
    return loss, metrics

  def eval_fn(self, params: Params, batch: Batch) -> tuple[Array, dict[str, Array]]:
    return self.loss_fn(params, batch, None)

  def score_batch(self, params: Params, batch: Batch) -> Array:
    """Each sequence's summed target log-likelihood [batch], weighted by decoder_loss_weights."""
    logits, _ = self._forward(params, batch, rng=None)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    token_ll = jnp.take_along_axis(log_probs, batch["decoder_target_tokens"][..., None], axis=-1)[..., 0]
    return jnp.sum(token_ll * _loss_weights(batch), axis=-1)

  # --- decoding -----------------------------------------------------------------------------------------
  def predict_batch(self, params: Params, batch: Batch, rng: Array | None = None, *,
                    decode_config: decoding.DecodeConfig | None = None, use_cache: bool = True,
                    **decode_overrides) -> Array:
    """Decoded token ids [batch, max_decode_length] (0 after EOS).

    decode_config (or keyword overrides such as method="sample", temperature=0.7, top_k=40, beam_size=4)
    picks greedy, sampling or beam search; use_cache=False recomputes the whole prefix every step (a slow
    reference path used to test the KV cache).
    """
    cfg = decode_config or decoding.DecodeConfig()
    if decode_overrides:
      cfg = decoding.DecodeConfig(**{**cfg.__dict__, **decode_overrides})
    fn = _jitted_predict(self, cfg, use_cache)
    return fn(params, dict(batch), rng)

  def _predict(self, params, batch, rng, cfg, use_cache):
    raise NotImplementedError


@functools.lru_cache(maxsize=32)
def _jitted_predict(model: BaseModel, cfg: decoding.DecodeConfig, use_cache: bool):
  return jax.jit(functools.partial(model._predict, cfg=cfg, use_cache=use_cache))


def _loss_weights(batch: Batch) -> Array:
  if "decoder_loss_weights" in batch and batch["decoder_loss_weights"] is not None:
    return batch["decoder_loss_weights"].astype(jnp.float32)
  return (batch["decoder_target_tokens"] > 0).astype(jnp.float32)


def _rngs(rng: Array | None) -> dict:
  return {} if rng is None else {"dropout": rng}


def _zeros_like_shapes(tree):
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), tree)


class EncoderDecoderModel(BaseModel):
  """T5 / Switch / ST-MoE encoder-decoder."""

  def _make_module(self):
    return EncoderDecoder(self.config)

  def _dummy_inputs(self, input_shapes):
    enc = jnp.ones(input_shapes["encoder_input_tokens"], jnp.int32)
    dec = jnp.ones(input_shapes["decoder_input_tokens"], jnp.int32)
    return (enc, dec), {}

  def _forward(self, params, batch, *, rng):
    dec_valid = batch["decoder_target_tokens"] > 0
    return self.module.apply(
        {"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"], dec_valid,
        batch.get("encoder_segment_ids"), batch.get("decoder_segment_ids"), deterministic=rng is None,
        rngs=_rngs(rng))

  def _predict(self, params, batch, rng, cfg, use_cache):
    enc_tokens = batch["encoder_input_tokens"]
    batch_size = enc_tokens.shape[0]
    length = cfg.max_decode_length or batch["decoder_input_tokens"].shape[1]
    encoded, _ = self.module.apply({"params": params}, enc_tokens, method=EncoderDecoder.encode)
    if cfg.method == "beam":
      from stmoe import beam_search
      return beam_search.encoder_decoder_beam_search(self, params, encoded, enc_tokens, length, cfg)

    def apply_decoder(variables, tokens, valid=None, decode=False):
      return self.module.apply(variables, encoded, enc_tokens, tokens, valid, method=EncoderDecoder.decode,
                               decode=decode, mutable=["cache"] if decode else False)

    if use_cache:
      shapes = jax.eval_shape(lambda: apply_decoder({"params": params}, jnp.zeros((batch_size, length), jnp.int32),
                                                    decode=True))[1]["cache"]

      def step(tokens, cache, i):
        (logits, _), mutated = apply_decoder({"params": params, "cache": cache}, tokens, decode=True)
        return logits[:, 0], mutated["cache"]

      state = _zeros_like_shapes(shapes)
    else:
      def step(tokens, buf, i):
        buf = buf.at[:, i].set(tokens[:, 0])
        valid = jnp.broadcast_to(jnp.arange(length)[None] <= i, buf.shape)
        logits, _ = apply_decoder({"params": params}, buf, valid)
        return logits[:, i], buf

      state = jnp.zeros((batch_size, length), jnp.int32)
    first = jnp.zeros((batch_size,), jnp.int32)  # the decoder's start token
    return decoding.decode_loop(step, state, first, length, cfg, rng)


class DecoderOnlyModel(BaseModel):
  """Causal or prefix language model (Artetxe et al. style MoE LMs)."""

  def _make_module(self):
    return DecoderOnly(self.config)

  def _dummy_inputs(self, input_shapes):
    return (jnp.ones(input_shapes["decoder_input_tokens"], jnp.int32),), {}

  def _prefix(self, batch):
    if "decoder_causal_attention" in batch and batch["decoder_causal_attention"] is not None:
      return batch["decoder_causal_attention"] > 0
    return None

  def _forward(self, params, batch, *, rng):
    return self.module.apply(
        {"params": params}, batch["decoder_input_tokens"], batch["decoder_target_tokens"] > 0,
        batch.get("decoder_segment_ids"), self._prefix(batch), deterministic=rng is None, rngs=_rngs(rng))

  def _prompt(self, batch):
    """Right-aligns each row's prompt so that all rows continue at the same position.

    Prompt length: sum(decoder_causal_attention) when given (prefix LM), else up to the last non-zero token
    (at least 1: the start token). Relative position attention depends only on distances, and left padding is
    masked out, so right-aligning changes nothing but lets the whole batch decode in lock step.
    """
    tokens = batch["decoder_input_tokens"]
    batch_size, width = tokens.shape
    prefix = self._prefix(batch)
    if prefix is not None:
      lengths = jnp.maximum(jnp.sum(prefix, axis=1), 1)
    else:
      nonzero = jnp.where(tokens != 0, jnp.arange(width)[None] + 1, 0)
      lengths = jnp.maximum(jnp.max(nonzero, axis=1), 1)
    shift = width - lengths  # [batch]
    src = jnp.arange(width)[None] - shift[:, None]  # [batch, width]
    valid = src >= 0
    aligned = jnp.where(valid, jnp.take_along_axis(tokens, jnp.clip(src, 0, width - 1), axis=1), 0)
    use_prefix = prefix is not None or self.config.prefix_lm
    return aligned.astype(jnp.int32), valid, (valid if use_prefix else None)

  def _predict(self, params, batch, rng, cfg, use_cache):
    if cfg.method == "beam":
      from stmoe import beam_search
      return beam_search.decoder_only_beam_search(self, params, batch, cfg)
    prompt, valid, prefix = self._prompt(batch)
    batch_size, width = prompt.shape
    length = cfg.max_decode_length or width
    total = width + length
    rng = jax.random.PRNGKey(0) if rng is None else rng
    if use_cache:
      def apply(variables, tokens, valid_, prefix_):
        return self.module.apply(variables, tokens, valid_, None, prefix_, decode=True, mutable=["cache"])

      shapes = jax.eval_shape(lambda: apply({"params": params}, jnp.zeros((batch_size, total), jnp.int32),
                                            None, None))[1]["cache"]
      (logits, _), mutated = apply({"params": params, "cache": _zeros_like_shapes(shapes)}, prompt, valid, prefix)
      first = decoding.pick_next(logits[:, -1], cfg, jax.random.fold_in(rng, 0))

      def step(tokens, cache, i):
        (logits, _), mutated = apply({"params": params, "cache": cache}, tokens, None, None)
        return logits[:, 0], mutated["cache"]

      rest = decoding.decode_loop(step, mutated["cache"], first, length - 1, cfg, rng, index_offset=1,
                                  done=first == cfg.eos_id)
      return jnp.concatenate([first[:, None], rest], axis=1)

    buf_valid_prompt = jnp.concatenate([valid, jnp.zeros((batch_size, length), jnp.bool_)], axis=1)
    full_prefix = None if prefix is None else jnp.concatenate([prefix, jnp.zeros((batch_size, length), jnp.bool_)], 1)

    def step(tokens, buf, i):
      pos = width - 1 + i
      buf = jax.lax.dynamic_update_slice(buf, tokens, (0, pos))
      valid_ = jnp.logical_or(buf_valid_prompt, (jnp.arange(total)[None] >= width) & (jnp.arange(total)[None] <= pos))
      logits, _ = self.module.apply({"params": params}, buf, valid_, None, full_prefix)
      return jax.lax.dynamic_index_in_dim(logits, pos, axis=1, keepdims=False), buf

    buf = jnp.concatenate([prompt, jnp.zeros((batch_size, length), jnp.int32)], axis=1)
    return decoding.decode_loop(step, buf, prompt[:, -1], length, cfg, rng)


@gin.configurable
def make_model(config: ModelConfig = gin.REQUIRED) -> BaseModel:
  """The model API object for `config`: decoder-only if config.decoder_only, else encoder-decoder."""
  return DecoderOnlyModel(config) if config.decoder_only else EncoderDecoderModel(config)
