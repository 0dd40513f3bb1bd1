"""Deprecated alias (one release): reading and decoding your own inputs moved to
`stmoe.evaluation.predictions`, and the `stmoe infer` command to `stmoe.cli.infer`."""

from stmoe.cli.infer import add_decode_flags, decode_config_from_args, main  # noqa: F401
from stmoe.evaluation.predictions import (  # noqa: F401
    EOS_ID, JSONL_SUFFIXES, TSV_SUFFIXES, SentencePieceCodec, make_batches, predict_file, read_inputs)

__all__ = ["EOS_ID", "JSONL_SUFFIXES", "TSV_SUFFIXES", "SentencePieceCodec", "add_decode_flags",
           "decode_config_from_args", "main", "make_batches", "predict_file", "read_inputs"]
