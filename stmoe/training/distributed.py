"""Multi-process (multi-host) start-up and failure handling.

`--coordinator_address HOST:PORT --num_processes N --process_id I` call ``jax.distributed.initialize``
before anything touches a jax backend. On CPU, cross-process collectives use gloo (jax's default).

A dead peer must never hang the others. Two mechanisms bound the time:

* the coordination service's heartbeat: when a process stops heart-beating for
  `heartbeat_timeout_s`, the service reports the error to every other process, and jax terminates them
  (non-zero exit);
* a watchdog thread (:class:`StepWatchdog`): the train loop pets it every step; if no step finishes in
  `step_timeout_s` (a collective blocked on a peer that died without the coordinator noticing yet), the
  process prints which step it was in and exits with status 3.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time

DEFAULT_HEARTBEAT_TIMEOUT_S = 20
EXIT_PEER_LOST = 3


@dataclasses.dataclass(frozen=True)
class DistributedArgs:
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S

  @property
  def enabled(self) -> bool:
    return bool(self.coordinator_address) or (self.num_processes or 1) > 1


def initialize(args: DistributedArgs) -> None:
  """jax.distributed.initialize from the flags (no-op for a single process)."""
  if not args.enabled:
    return
  missing = [n for n in ("coordinator_address", "num_processes", "process_id") if getattr(args, n) is None]
  if missing:
    raise ValueError(f"multi-process training needs --coordinator_address, --num_processes and --process_id; "
                     f"missing: {', '.join('--' + m for m in missing)}.")
  if not 0 <= args.process_id < args.num_processes:
    raise ValueError(f"--process_id={args.process_id} must be in [0, {args.num_processes}).")
  import jax

  jax.distributed.initialize(
      coordinator_address=args.coordinator_address, num_processes=args.num_processes,
      process_id=args.process_id, initialization_timeout=max(60, 3 * args.heartbeat_timeout_s),
      heartbeat_timeout_seconds=args.heartbeat_timeout_s,
      shutdown_timeout_seconds=max(30, 2 * args.heartbeat_timeout_s))


class StepWatchdog:
  """Exit the process if no training step completes within `timeout_s` (a peer died mid-collective)."""

  def __init__(self, timeout_s: float | None):
    self.timeout_s = timeout_s
    self._last = time.monotonic()
    self._step = 0
    self._stop = threading.Event()
    self._thread = None
    if timeout_s:
      self._thread = threading.Thread(target=self._run, name="stmoe-step-watchdog", daemon=True)
      self._thread.start()

  def pet(self, step: int) -> None:
    self._last, self._step = time.monotonic(), step

  def _run(self) -> None:
    while not self._stop.wait(min(5.0, self.timeout_s / 4)):
      if time.monotonic() - self._last > self.timeout_s:
        sys.stderr.write(
            f"stmoe: no training step finished for {self.timeout_s:.0f}s after step {self._step}: a peer "
            "process probably died or the network is partitioned. Exiting (restart all processes; training "
            "resumes from the last checkpoint).\n")
        sys.stderr.flush()
        os._exit(EXIT_PEER_LOST)

  def close(self) -> None:
    self._stop.set()
