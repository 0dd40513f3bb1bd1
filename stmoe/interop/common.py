"""Deprecated: the former home of the shared Hugging Face conversion code; kept for one release.

Import from the modules split by job instead:

* :mod:`stmoe.interop.files`: reading save_pretrained directories / in-memory models, writing directories
  (``config_dict``, ``read_directory``, ``read_source``, ``write_directory``, ``StateDict``);
* :mod:`stmoe.interop.config_map`: HF config <-> ModelConfig fields and architecture checks
  (``check_architecture``, ``check_special_tokens``, ``activation_from_hf``, ``activation_to_hf``,
  ``t5_family_kwargs``, ``t5_family_config``, ``check_exportable``);
* :mod:`stmoe.interop.param_layout`: parameter names and layouts both ways (``dense_kernel``,
  ``attention_params``, ``norm_params``, ``dense_mlp_params``, ``encoder_decoder_params``, ``to_hf_linear``,
  ``export_attention``, ``export_dense_mlp``, ``export_encoder_decoder``, ``Params``, ``FeedForwardFn``,
  ``FeedForwardExportFn``);
* :mod:`stmoe.interop.verify`: conversion safety (``HFWeights``, ``check_against_model``).
"""

from __future__ import annotations

from stmoe.interop.config_map import (activation_from_hf, activation_to_hf, check_architecture, check_exportable,
                                      check_special_tokens, t5_family_config, t5_family_kwargs)
from stmoe.interop.files import StateDict, config_dict, read_directory, read_source, write_directory
from stmoe.interop.param_layout import (FeedForwardExportFn, FeedForwardFn, Params, attention_params, dense_kernel,
                                        dense_mlp_params, encoder_decoder_params, export_attention,
                                        export_dense_mlp, export_encoder_decoder, norm_params, to_hf_linear)
from stmoe.interop.verify import HFWeights, check_against_model

__all__ = [
    "FeedForwardExportFn", "FeedForwardFn", "HFWeights", "Params", "StateDict", "activation_from_hf",
    "activation_to_hf", "attention_params", "check_against_model", "check_architecture", "check_exportable",
    "check_special_tokens", "config_dict", "dense_kernel", "dense_mlp_params", "encoder_decoder_params",
    "export_attention", "export_dense_mlp", "export_encoder_decoder", "norm_params", "read_directory",
    "read_source", "t5_family_config", "t5_family_kwargs", "to_hf_linear", "write_directory",
]
