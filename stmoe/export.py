"""Deprecated alias (one release): the export format moved to `stmoe.checkpoints.export` and the
`stmoe export` command to `stmoe.cli.export`. Import from there; see docs/architecture.md."""

from stmoe.checkpoints.export import (  # noqa: F401
    CONFIG_FILE, EXPORT_FILE, FORMAT, PARAMS_SUBDIR, VOCAB_FILE, ExportError, Loaded, configure_model, export,
    find_config, is_export_dir, load, num_parameters, restore_for_model)
from stmoe.cli.export import main  # noqa: F401

__all__ = ["CONFIG_FILE", "EXPORT_FILE", "FORMAT", "PARAMS_SUBDIR", "VOCAB_FILE", "ExportError", "Loaded",
           "configure_model", "export", "find_config", "is_export_dir", "load", "main", "num_parameters",
           "restore_for_model"]
