"""The two network shapes: encoder-decoder (T5 / Switch / ST-MoE) and decoder-only (causal or prefix LM).

Both share `TransformerStack`; they differ only in wiring. Every method returns
(logits [batch, length, vocab] float32, {"encoder"|"decoder": {"layer_i": MoeAux}}).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from stmoe.config import ModelConfig
from stmoe.layers.common import as_dtype, dense
from stmoe.layers.embedding import Embed
from stmoe.models.transformer import TransformerStack

Array = jax.Array


class _OutputHead(nn.Module):
  """Final logits: tied to the embedding (with T5's d_model**-0.5 rescale) or a separate projection."""

  config: ModelConfig
  embedder: Embed

  @nn.compact
  def __call__(self, h: Array) -> Array:  # h [batch, length, embed] -> [batch, length, vocab] float32
    cfg = self.config
    if cfg.logits_via_embedding:
      logits = self.embedder.attend(h * cfg.d_model ** -0.5)
    else:
      logits = dense(cfg.vocab_size, ("embed", "vocab"), dtype=as_dtype(cfg.dtype), name="logits_dense")(h)
    logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
    return logits.astype(jnp.float32)


class EncoderDecoder(nn.Module):
  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.token_embedder = Embed(cfg.vocab_size, cfg.d_model, as_dtype(cfg.dtype))
    self.encoder = TransformerStack(cfg, "encoder", self.token_embedder)
    self.decoder = TransformerStack(cfg, "decoder", self.token_embedder)
    self.head = _OutputHead(cfg, self.token_embedder)

  def encode(self, encoder_input_tokens: Array, encoder_segment_ids: Array | None = None, *,
             deterministic: bool = True):
    """[batch, enc_length] -> (encoded [batch, enc_length, embed], encoder aux)."""
    return self.encoder(encoder_input_tokens, valid=encoder_input_tokens > 0, segment_ids=encoder_segment_ids,
                        deterministic=deterministic)

  def decode(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array,
             decoder_valid: Array | None = None, encoder_segment_ids: Array | None = None,
             decoder_segment_ids: Array | None = None, *, deterministic: bool = True, decode: bool = False):
    """Decoder logits given the encoder output. decoder_valid [batch, dec_length] (None: all real)."""
    if decoder_valid is None:
      decoder_valid = jnp.ones(decoder_input_tokens.shape, jnp.bool_)
    h, aux = self.decoder(decoder_input_tokens, valid=decoder_valid, segment_ids=decoder_segment_ids,
                          encoded=encoded, encoded_valid=encoder_input_tokens > 0,
                          encoded_segment_ids=encoder_segment_ids, deterministic=deterministic, decode=decode)
    return self.head(h), aux

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array, decoder_valid: Array | None = None,
               encoder_segment_ids: Array | None = None, decoder_segment_ids: Array | None = None, *,
               deterministic: bool = True):
    encoded, enc_aux = self.encode(encoder_input_tokens, encoder_segment_ids, deterministic=deterministic)
    logits, dec_aux = self.decode(encoded, encoder_input_tokens, decoder_input_tokens, decoder_valid,
                                  encoder_segment_ids, decoder_segment_ids, deterministic=deterministic)
    return logits, {"encoder": enc_aux, "decoder": dec_aux}


class DecoderOnly(nn.Module):
  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.token_embedder = Embed(cfg.vocab_size, cfg.d_model, as_dtype(cfg.dtype))
    self.decoder = TransformerStack(cfg, "decoder_only", self.token_embedder)
    self.head = _OutputHead(cfg, self.token_embedder)

  def __call__(self, decoder_input_tokens: Array, decoder_valid: Array | None = None,
               decoder_segment_ids: Array | None = None, decoder_prefix: Array | None = None, *,
               deterministic: bool = True, decode: bool = False):
    """decoder_prefix [batch, length]: True on a prefix-LM's inputs part (bidirectional attention there)."""
    if decoder_valid is None:
      decoder_valid = jnp.ones(decoder_input_tokens.shape, jnp.bool_)
    h, aux = self.decoder(decoder_input_tokens, valid=decoder_valid, segment_ids=decoder_segment_ids,
                          prefix=decoder_prefix, deterministic=deterministic, decode=decode)
    return self.head(h), {"decoder": aux}
