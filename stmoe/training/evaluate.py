"""Deprecated alias (one release): `evaluate(...)` moved to `stmoe.evaluation.loss`.

Old run configs that `import stmoe.training.evaluate` keep working through this module.
"""

from stmoe.evaluation.loss import EvalLoop, evaluate  # noqa: F401

__all__ = ["EvalLoop", "evaluate"]
