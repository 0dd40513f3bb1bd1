"""The t5x-style model API: get_initial_variables, loss_fn, score_batch, predict_batch.

One object per network shape wraps the linen module and the batch conventions (t5x feature names):
  encoder_input_tokens, decoder_input_tokens, decoder_target_tokens, decoder_loss_weights,
  encoder_segment_ids / decoder_segment_ids, encoder_positions / decoder_positions (packing),
  decoder_causal_attention (decoder-only prefix LM: 1 on the inputs part).
Token id 0 is padding (and the decoder's start token), 1 is EOS (stmoe.special_ids).

Decoding is model-agnostic: each model exposes decode_start / decode_step (KV cache) and reference_start /
reference_step (full recompute, the slow path tests compare the cache against), and predict_batch hands the
model to stmoe.decoding, which runs greedy, sampling or beam search through those calls only.
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
from stmoe.decoding import DecodeState, tile_beams
from stmoe.models.losses import cross_entropy_with_z_loss, first_argmax, moe_losses_and_metrics
from stmoe.models.networks import DecoderOnly, EncoderDecoder
from stmoe.special_ids import PAD_ID

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

  def _predict(self, params: Params, batch: Batch, rng: Array | None, cfg: decoding.DecodeConfig,
               use_cache: bool) -> Array:
    return decoding.predict(self, params, batch, cfg, rng, use_cache=use_cache)

  # The decoding contract (stmoe.decoding.state): first logits predict generated position 0; a step feeds the
  # token generated at position `index` and returns the logits of position index + 1. Rows are laid out
  # [batch * num_copies] (the copies of row 0 first). Both models keep their write position in the state, so
  # `index` is informational here.
  def decode_start(self, params: Params, batch: Batch, max_decode_length: int,
                   num_copies: int = 1) -> tuple[Array, DecodeState]:
    """-> (first logits [batch * num_copies, vocab], state with a KV cache for max_decode_length tokens)."""
    raise NotImplementedError

  def decode_step(self, params: Params, tokens: Array, state: DecodeState,
                  index: Array | int) -> tuple[Array, DecodeState]:
    """tokens [rows, 1] -> (logits [rows, vocab], state): one token through the KV cache."""
    raise NotImplementedError

  def reference_start(self, params: Params, batch: Batch, max_decode_length: int,
                      num_copies: int = 1) -> tuple[Array, DecodeState]:
    """decode_start without a KV cache: the state holds the token buffer (predict_batch(use_cache=False))."""
    raise NotImplementedError

  def reference_step(self, params: Params, tokens: Array, state: DecodeState,
                     index: Array | int) -> tuple[Array, DecodeState]:
    """decode_step without a KV cache: writes tokens into the buffer and reruns the whole prefix."""
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


def _zeros_like_shapes(tree: Any) -> Any:
  """Zero arrays for a tree of jax.ShapeDtypeStruct (a KV cache made without running the model)."""
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), tree)


def _copies(tree: Any, num_copies: int) -> Any:
  """Repeats every row num_copies times ([rows, ...] -> [rows * num_copies, ...]); 1 leaves the tree as is."""
  return tree if num_copies == 1 else tile_beams(tree, num_copies)


def _reference_buffer(tokens: Array, valid: Array, index: int) -> dict:
  """The reference path's 'cache': tokens and valid [rows, width] and the next write position (a scalar)."""
  return {"tokens": tokens.astype(jnp.int32), "valid": valid, "index": jnp.asarray(index, jnp.int32)}


def _reference_write(buffer: dict, tokens: Array) -> tuple[dict, Array]:
  """Writes tokens [rows, 1] at buffer["index"], marks them valid -> (advanced buffer, write position)."""
  pos = buffer["index"]
  written = jax.lax.dynamic_update_slice(buffer["tokens"], tokens.astype(jnp.int32), (0, pos))  # [rows, width]
  valid = jax.lax.dynamic_update_slice(buffer["valid"], jnp.ones(tokens.shape, jnp.bool_), (0, pos))
  return {"tokens": written, "valid": valid, "index": pos + 1}, pos


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

  # --- decoding (stmoe.decoding drives these) -----------------------------------------------------------
  def _encode(self, params: Params, batch: Batch, num_copies: int) -> tuple[Array, Array]:
    """The decoding context: (encoded [rows, enc_length, embed], encoder tokens [rows, enc_length]).

    The encoder runs once per batch row; its output is then repeated for the copies (beams) of the row.
    """
    enc_tokens = batch["encoder_input_tokens"]
    encoded, _ = self.module.apply({"params": params}, enc_tokens, method=EncoderDecoder.encode)
    return _copies((encoded, enc_tokens), num_copies)

  def _decode(self, variables: dict, context: tuple[Array, Array], tokens: Array, valid: Array | None = None,
              decode: bool = False):
    """The decoder over tokens [rows, n], cross-attending to the context -> ((logits, auxes), mutated).

    With decode=True the KV cache in variables["cache"] is read and written (mutated = {"cache": ...}).
    """
    encoded, enc_tokens = context
    return self.module.apply(variables, encoded, enc_tokens, tokens, valid, method=EncoderDecoder.decode,
                             decode=decode, mutable=["cache"] if decode else False)

  def decode_start(self, params: Params, batch: Batch, max_decode_length: int,
                   num_copies: int = 1) -> tuple[Array, DecodeState]:
    """Encodes once, makes a zero KV cache of max_decode_length slots per row and copy, feeds the start token.

    The start token (PAD_ID) runs on all batch * num_copies rows, as every later step does, so that MoE
    routing groups the same rows at every step.
    """
    context = self._encode(params, batch, num_copies)
    rows = context[1].shape[0]
    shapes = jax.eval_shape(lambda: self._decode({"params": params}, context,
                                                 jnp.zeros((rows, max_decode_length), jnp.int32),
                                                 decode=True))[1]["cache"]
    start = jnp.full((rows, 1), PAD_ID, jnp.int32)  # [rows, 1] the decoder's start token
    return self.decode_step(params, start, DecodeState(_zeros_like_shapes(shapes), context), -1)

  def decode_step(self, params: Params, tokens: Array, state: DecodeState,
                  index: Array | int) -> tuple[Array, DecodeState]:
    """One token per row through the decoder's KV cache (cross-attending to the encoder output)."""
    del index  # the KV cache keeps its own write position
    (logits, _), mutated = self._decode({"params": params, "cache": state.cache}, state.context, tokens,
                                        decode=True)  # logits [rows, 1, vocab]
    return logits[:, 0], DecodeState(mutated["cache"], state.context)

  def reference_start(self, params: Params, batch: Batch, max_decode_length: int,
                      num_copies: int = 1) -> tuple[Array, DecodeState]:
    """Encodes once; the state's buffer holds max_decode_length decoder tokens, the start token first."""
    context = self._encode(params, batch, num_copies)
    rows = context[1].shape[0]
    buffer = _reference_buffer(jnp.zeros((rows, max_decode_length), jnp.int32),
                               jnp.zeros((rows, max_decode_length), jnp.bool_), 0)
    start = jnp.full((rows, 1), PAD_ID, jnp.int32)  # [rows, 1] the decoder's start token
    return self.reference_step(params, start, DecodeState(buffer, context), -1)

  def reference_step(self, params: Params, tokens: Array, state: DecodeState,
                     index: Array | int) -> tuple[Array, DecodeState]:
    """Writes the tokens into the buffer and reruns the decoder over all of it (no cache)."""
    del index  # the buffer keeps its own write position
    buffer, pos = _reference_write(state.cache, tokens)
    logits, _ = self._decode({"params": params}, state.context, buffer["tokens"], buffer["valid"])
    return jax.lax.dynamic_index_in_dim(logits, pos, axis=1, keepdims=False), DecodeState(buffer, state.context)


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

  def _apply_cached(self, variables: dict, tokens: Array, valid: Array | None, prefix: Array | None):
    """The network over tokens [rows, n] reading and writing the KV cache (-> ((logits, auxes), mutated))."""
    return self.module.apply(variables, tokens, valid, None, prefix, decode=True, mutable=["cache"])

  def decode_start(self, params: Params, batch: Batch, max_decode_length: int,
                   num_copies: int = 1) -> tuple[Array, DecodeState]:
    """Right-aligns the prompts (_prompt) and prefills them in one call, at batch size.

    The KV cache has prompt width + max_decode_length slots; it and the last prompt position's logits are
    then repeated for the copies (the prompt is computed once, not once per beam).
    """
    prompt, valid, prefix = self._prompt(batch)  # [batch, width]
    rows, width = prompt.shape
    shapes = jax.eval_shape(lambda: self._apply_cached(
        {"params": params}, jnp.zeros((rows, width + max_decode_length), jnp.int32), None, None))[1]["cache"]
    (logits, _), mutated = self._apply_cached({"params": params, "cache": _zeros_like_shapes(shapes)}, prompt,
                                              valid, prefix)  # logits [batch, width, vocab]
    first_logits, cache = _copies((logits[:, -1], mutated["cache"]), num_copies)
    return first_logits, DecodeState(cache)

  def decode_step(self, params: Params, tokens: Array, state: DecodeState,
                  index: Array | int) -> tuple[Array, DecodeState]:
    """One token per row through the KV cache, after the prefilled prompt."""
    del index  # the KV cache keeps its own write position
    (logits, _), mutated = self._apply_cached({"params": params, "cache": state.cache}, tokens, None, None)
    return logits[:, 0], DecodeState(mutated["cache"], state.context)

  def reference_start(self, params: Params, batch: Batch, max_decode_length: int,
                      num_copies: int = 1) -> tuple[Array, DecodeState]:
    """The right-aligned prompts followed by max_decode_length empty slots, in one token buffer.

    The first logits come from a full pass over the prompt (its last token is rewritten in place); the
    context is the prefix-LM mask over the whole buffer, or None.
    """
    prompt, valid, prefix = _copies(self._prompt(batch), num_copies)  # [rows, width]
    rows, width = prompt.shape
    tail = jnp.zeros((rows, max_decode_length), jnp.bool_)
    buffer = _reference_buffer(jnp.concatenate([prompt, jnp.zeros((rows, max_decode_length), jnp.int32)], 1),
                               jnp.concatenate([valid, tail], 1), width - 1)  # [rows, width + length]
    full_prefix = None if prefix is None else jnp.concatenate([prefix, tail], 1)
    return self.reference_step(params, prompt[:, -1:], DecodeState(buffer, full_prefix), -1)

  def reference_step(self, params: Params, tokens: Array, state: DecodeState,
                     index: Array | int) -> tuple[Array, DecodeState]:
    """Writes the tokens into the buffer and reruns the network over prompt and generated tokens (no cache)."""
    del index  # the buffer keeps its own write position
    buffer, pos = _reference_write(state.cache, tokens)
    logits, _ = self.module.apply({"params": params}, buffer["tokens"], buffer["valid"], None, state.context)
    return jax.lax.dynamic_index_in_dim(logits, pos, axis=1, keepdims=False), DecodeState(buffer, state.context)


@gin.configurable
def make_model(config: ModelConfig = gin.REQUIRED) -> BaseModel:
  """The model API object for `config`: decoder-only if config.decoder_only, else encoder-decoder."""
  return DecoderOnlyModel(config) if config.decoder_only else EncoderDecoderModel(config)
