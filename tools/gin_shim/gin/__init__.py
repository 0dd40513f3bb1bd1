"""A stand-in for gin-config where it is not installed (the lent GPU machines), for benchmarks only.

stmoe's modules decorate their configurable functions and dataclasses with ``@gin.configurable`` and use
``gin.REQUIRED`` as a default; tools/bench_accelerator.py builds every config in Python and never parses
a gin file, so on a machine without gin-config those decorators only have to leave their targets as they
are. tools/device_bench.sh puts this folder on PYTHONPATH only when ``import gin`` fails and no
gin-config wheel was carried. Anything else from gin's API raises, saying so, rather than pretending.
"""

from __future__ import annotations

from typing import Any, Callable

IS_SHIM = True  # bench_accelerator records "shim" as the gin version when it sees this
__version__ = "0+shim"


class _Required:
  """The ``gin.REQUIRED`` sentinel: a default that must be overridden (here: always passed explicitly)."""

  def __repr__(self) -> str:
    return "gin.REQUIRED"


REQUIRED = _Required()


def configurable(name_or_fn: Any = None, *args: Any, **kwargs: Any) -> Any:
  """``@gin.configurable`` and ``@gin.configurable("name", ...)``: return the target unchanged."""
  if callable(name_or_fn) and not isinstance(name_or_fn, str):
    return name_or_fn
  return lambda fn: fn


register = configurable


def external_configurable(fn: Callable, *args: Any, **kwargs: Any) -> Callable:
  return fn


def __getattr__(name: str) -> Any:
  raise AttributeError(
      f"gin.{name} is not available: this is tools/gin_shim, a stand-in for gin-config that only lets stmoe's "
      "modules import. Install gin-config (or carry its wheel, see tools/device_bench.sh) to use gin.")
