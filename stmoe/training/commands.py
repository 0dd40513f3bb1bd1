"""Deprecated alias (one release): `stmoe train` / `stmoe eval` moved to `stmoe.cli.train` / `stmoe.cli.eval`."""

from stmoe.cli.eval import main as eval_main  # noqa: F401
from stmoe.cli.train import main as train_main  # noqa: F401

__all__ = ["eval_main", "train_main"]
