"""Conversion safety: a Hugging Face conversion neither drops tensors nor produces a tree the model rejects.

:class:`HFWeights` wraps a state dict and remembers which tensors the conversion read, so that one
left behind (a feature stmoe's model lacks, e.g. biases) fails loudly instead of being dropped;
:func:`check_against_model` compares the converted tree's names and shapes with the tree the stmoe
model itself initialises (shapes only; nothing is materialised).
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from stmoe.interop.files import StateDict


class HFWeights:
  """A HF state dict with use tracking; every tensor must be consumed exactly by the conversion."""

  def __init__(self, state: StateDict):
    self._state = state
    self._used: set[str] = set()

  def has(self, name: str) -> bool:
    return name in self._state

  def get(self, name: str) -> np.ndarray:
    """The float32 tensor `name` (marked as used)."""
    if name not in self._state:
      raise KeyError(f"The checkpoint has no tensor {name!r}; it does not match its config (a different "
                     f"architecture, or a truncated/sharded save with a shard missing).")
    self._used.add(name)
    return np.asarray(self._state[name], dtype=np.float32)

  def get_alias(self, names: Iterable[str]) -> np.ndarray:
    """The first of `names` present; all present ones must be equal (HF ties them) and are marked used."""
    present = [n for n in names if n in self._state]
    if not present:
      raise KeyError(f"The checkpoint has none of {list(names)}.")
    value = self.get(present[0])
    for other in present[1:]:
      if not np.array_equal(value, self.get(other)):
        raise ValueError(f"{present[0]} and {other} differ, but stmoe shares one embedding between the encoder, "
                         f"the decoder (and the tied output head); this checkpoint cannot be represented.")
    return value

  def mark_used(self, names: Iterable[str]) -> None:
    self._used.update(n for n in names if n in self._state)

  def check_all_used(self) -> None:
    left = sorted(set(self._state) - self._used)
    if left:
      shown = ", ".join(left[:8]) + (f" ... ({len(left)} in all)" if len(left) > 8 else "")
      raise ValueError(f"The conversion did not use these checkpoint tensors: {shown}. The checkpoint has "
                       f"features stmoe's model does not (e.g. biases); refusing to drop weights silently.")


def check_against_model(params: dict[str, Any], model: Any) -> None:
  """Raises if `params` differs in names or shapes from what `model` itself initialises (nothing materialised)."""
  import jax

  shapes = {"encoder_input_tokens": (1, 1), "decoder_input_tokens": (1, 1)}
  expected = jax.eval_shape(lambda rng: model.get_initial_variables(rng, shapes)["params"], jax.random.PRNGKey(0))
  flat = lambda tree: {"/".join(str(getattr(k, "key", k)) for k in path): tuple(v.shape)
                       for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  got, want = flat(params), flat(expected)
  missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  wrong = sorted(k for k in set(got) & set(want) if got[k] != want[k])
  if missing or extra or wrong:
    raise ValueError(
        "Converted parameters do not fit the stmoe model built from the config: "
        f"missing {missing[:6]}, unexpected {extra[:6]}, wrong shapes "
        f"{[(k, got[k], want[k]) for k in wrong[:6]]}.")
