"""stmoe: sparse Mixture-of-Experts encoder-decoder models (ST-MoE, Switch, GShard) in JAX/Flax.

Importing stmoe is cheap and never imports TensorFlow: seqio-based data code is imported lazily.
"""

from __future__ import annotations

import os

__version__ = "0.1.0"


def gin_dir() -> str:
  """The directory of the shipped gin files (models/, runs/, partitioning/).

  In a source checkout or editable install it is the repository's `gin/`; a regular install ships the same
  files inside the package as `stmoe/gin/`.
  """
  here = os.path.dirname(os.path.abspath(__file__))
  for candidate in (os.path.join(here, "gin"), os.path.join(os.path.dirname(here), "gin")):
    if os.path.isdir(os.path.join(candidate, "models")):
      return candidate
  raise FileNotFoundError(
      "stmoe's gin files were not found next to the package; reinstall stmoe (pip install .) so that "
      "stmoe/gin/ is installed, or pass --gin_search_paths pointing at the repository's gin/ folder.")
