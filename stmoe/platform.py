"""The platform a computation is being built for: the mesh's devices, not the host's default backend.

Kernel choices (e.g. the CPU-only bf16 matmul layout in stmoe/layers/matmul.py, the dropless
implementation in stmoe/moe/dispatch.py) must follow the devices the step is compiled for. Those differ
from `jax.default_backend()` when a CPU host compiles ahead of time for a TPU topology: tracing the CPU
path into a TPU program gathers weights instead of multiplying them in place. `partitioning.mesh_context`
records the mesh's platform here; outside it the default backend is used.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("stmoe_target_platform", default=None)


def target_platform() -> str:
  """"cpu", "gpu", "tpu", ...: the platform of the mesh in scope, else jax's default backend."""
  return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def building_for(platform: str) -> Iterator[None]:
  """Traces inside the block choose kernels for `platform`."""
  token = _TARGET.set(platform)
  try:
    yield
  finally:
    _TARGET.reset(token)
