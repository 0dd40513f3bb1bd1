"""gin handling shared by every command: flags, search paths, parsing with clear errors, the configured model.

Flags (t5x style): --gin_file F (repeatable), --gin.NAME=VALUE (repeatable; also --gin_bindings 'NAME=VALUE'),
--gin_search_paths a,b. The shipped gin/ folder (stmoe.gin_dir()) is always searched last, so
`--gin_file models/st_moe_tiny.gin` works from any directory.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
import os
import re
from typing import Iterator, Sequence

import gin

import stmoe
from stmoe.errors import UserError


class GinConfigError(UserError):
  """A gin file or binding could not be parsed or bound; the message says what to change."""


def add_gin_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--gin_file", action="append", default=[],
                      help="gin file to parse (repeatable), absolute or relative to a search path, e.g. "
                           "models/st_moe_tiny.gin")
  parser.add_argument("--gin_bindings", action="append", default=[],
                      help="a gin binding such as \"TRAIN_STEPS=100\" (repeatable; same as --gin.TRAIN_STEPS=100)")
  parser.add_argument("--gin_search_paths", default="",
                      help="comma-separated folders to look for gin files in (the shipped gin/ is always last)")


def parse_known_gin_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  """Parses argv; every `--gin.NAME=VALUE` (or `--gin.NAME VALUE`) becomes a binding `NAME=VALUE`."""
  bindings, rest = [], []
  argv = list(argv)
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--gin."):
      body = arg[len("--gin."):]
      if "=" not in body:
        if i + 1 >= len(argv):
          raise GinConfigError(f"{arg} needs a value: write {arg}=VALUE.")
        body = f"{body}={argv[i + 1]}"
        i += 1
      bindings.append(body)
    else:
      rest.append(arg)
    i += 1
  args = parser.parse_args(rest)
  return args, list(getattr(args, "gin_bindings", []) or []) + bindings


def search_paths(extra: str | Sequence[str] = "") -> list[str]:
  paths = [p for p in (extra.split(",") if isinstance(extra, str) else extra) if p]
  return paths + [os.getcwd(), stmoe.gin_dir()]


def _import_configurables() -> None:
  """Registers every gin-configurable of the core (not the seqio tasks: those are imported on demand)."""
  import stmoe.config  # noqa: F401
  import stmoe.models.api  # noqa: F401


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str], extra_search_paths: str | Sequence[str] = "",
              *, finalize: bool = False, check_macros: bool = True) -> None:
  """Clears gin, then parses files and bindings; unknown names fail with a suggestion.

  With check_macros, a macro defined in `bindings` that nothing refers to is an error (a misspelt
  `--gin.TRAIN_STPES=3` must not be silently ignored).
  """
  _import_configurables()
  gin.clear_config()
  paths = search_paths(extra_search_paths)
  for p in paths:
    gin.add_config_file_search_path(p)
  gin_logger = logging.getLogger()
  previous = gin_logger.level
  gin_logger.setLevel(logging.CRITICAL)  # gin logs "Path not found" for every search path it tries
  try:
    for f in gin_files:
      if not any(os.path.exists(os.path.join(p, f)) for p in paths) and not os.path.exists(f):
        raise GinConfigError(f"gin file {f!r} was not found in {paths}. Shipped files are under "
                             f"{stmoe.gin_dir()} (e.g. models/st_moe_tiny.gin, runs/pretrain.gin).")
    gin.parse_config_files_and_bindings(list(gin_files), list(bindings), finalize_config=finalize)
    if check_macros:
      check_macros_referenced(bindings)
  except GinConfigError:
    raise
  except (ValueError, KeyError, SyntaxError, OSError) as e:
    raise GinConfigError(_explain(e)) from e
  finally:
    gin_logger.setLevel(previous)


def _explain(error: Exception) -> str:
  msg = str(error).split("\n")[0].rstrip(".")
  hint = ""
  param = re.search(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", msg)
  if param:
    close = difflib.get_close_matches(param.group(2), _parameters_of(param.group(1)), n=3)
    if close:
      hint = f" Did you mean {' or '.join(f'{param.group(1)}.{c}' for c in close)}?"
  elif "No configurable matching" in msg or "Unknown" in msg or "not found" in msg.lower():
    known = sorted({name.split(".")[-1] for name in _registered_names()})
    token = msg.split("'")[1] if "'" in msg else ""
    close = difflib.get_close_matches(token.split(".")[-1], known, n=3) if token else []
    if close:
      hint = f" Did you mean {' or '.join(close)}?"
  where = " ".join(str(error).split("\n")[1:]).strip()
  where = f" ({' '.join(where.split())})" if where else ""
  return (f"gin configuration error: {msg}{where}.{hint} Check the spelling in your --gin_file/--gin.NAME=VALUE "
          "flags.")


def _registered_names() -> list[str]:
  from gin import config as gin_config
  registry = getattr(gin_config, "_REGISTRY", {})
  return [str(selector) for selector, _ in registry.items()] if hasattr(registry, "items") else []


def _parameters_of(name: str) -> list[str]:
  """The parameter names of a registered configurable (for "did you mean" hints)."""
  import inspect

  from gin import config as gin_config
  try:
    configurable = gin_config._REGISTRY.get_match(name)
    return list(inspect.signature(configurable.wrapped).parameters) if configurable else []
  except (ValueError, TypeError):
    return []


def _referenced_macros() -> set[str]:
  """Names of the macros that some binding refers to as %NAME."""
  from gin import config as gin_config

  refs: set[str] = set()

  def walk(value) -> None:
    if isinstance(value, gin_config.ConfigurableReference):
      selector = value.scoped_selector
      if selector.endswith("/gin.macro"):
        refs.add(selector[: -len("/gin.macro")].split("/")[-1])
    elif isinstance(value, (list, tuple, set)):
      for v in value:
        walk(v)
    elif isinstance(value, dict):
      for v in value.values():
        walk(v)

  for params in gin_config._CONFIG.values():
    for v in params.values():
      walk(v)
  return refs


def _defined_macros() -> set[str]:
  from gin import config as gin_config

  return {scope.split("/")[-1] for scope, selector in gin_config._CONFIG if selector == "gin.macro" and scope}


def check_macros_referenced(bindings: Sequence[str]) -> None:
  """A macro defined on the command line (`--gin.TRAIN_STPES=3`) that nothing refers to is a typo: refuse it,
  naming the closest defined macro."""
  referenced = _referenced_macros()
  defined = _defined_macros()
  for binding in bindings:
    name = binding.split("=", 1)[0].strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or name in referenced:
      continue
    close = difflib.get_close_matches(name, sorted(referenced | (defined - {name})), n=3)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise GinConfigError(f"gin configuration error: the macro {name} is defined (--gin.{binding.strip()}) but no "
                         f"gin file or binding uses %{name}, so it would change nothing.{hint}")


@contextlib.contextmanager
def isolated() -> Iterator[None]:
  """Parse and use another gin configuration inside the block; the global one is restored afterwards.

  Loading a model from a checkpoint's config.gin (export, infer, eval) needs gin, but a library function
  must not wipe the caller's configuration: this saves gin's global state (bindings, imports, operative
  config, lock) and puts it back, whatever happens in the block.
  """
  from gin import config as gin_config

  saved = {
      "config": {k: dict(v) for k, v in gin_config._CONFIG.items()},
      "imports": set(gin_config._IMPORTS),
      "operative": {k: dict(v) for k, v in gin_config._OPERATIVE_CONFIG.items()},
      "singletons": dict(gin_config._SINGLETONS),
      "locked": gin_config.config_is_locked(),
      "search_paths": list(getattr(gin_config, "_LOCATION_PREFIXES", [])),
  }
  try:
    yield
  finally:
    gin_config._set_config_is_locked(False)
    gin_config._CONFIG.clear()
    gin_config._CONFIG.update(saved["config"])
    gin_config._IMPORTS.clear()
    gin_config._IMPORTS.update(saved["imports"])
    gin_config._OPERATIVE_CONFIG.clear()
    gin_config._OPERATIVE_CONFIG.update(saved["operative"])
    gin_config._SINGLETONS.clear()
    gin_config._SINGLETONS.update(saved["singletons"])
    if hasattr(gin_config, "_LOCATION_PREFIXES"):
      gin_config._LOCATION_PREFIXES[:] = saved["search_paths"]
    gin_config._set_config_is_locked(saved["locked"])


def configured_model():
  """The model built from the parsed gin config (`make_model.config = @ModelConfig()` and friends)."""
  from stmoe.models.api import make_model
  try:
    return make_model()
  except (TypeError, ValueError) as e:
    raise GinConfigError(f"could not build the model from the gin config: {e}. Include a model file, e.g. "
                         f"--gin_file models/st_moe_tiny.gin.") from e
