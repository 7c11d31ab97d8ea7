"""absl flag parsing shared by the command lines, with config errors as one line."""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(1)


def _check_config_files_loaded() -> None:
  """A config file that could not be loaded, as one line (ml_collections defers the OSError).

  ml_collections keeps a placeholder that raises an OSError with the attempts on first use.
  """
  for name in flags.FLAGS:
    flag = flags.FLAGS[name]
    try:
      path = config_flags.get_config_filename(flag).split(":", 1)[0]
    except (TypeError, AttributeError):  # not a config file flag
      continue
    try:
      getattr(flag.value, "lock", None)
    except OSError as e:
      cause = e.__cause__ if e.__cause__ is not None else e
      if "No such file or directory" in str(cause):
        _fail(
          f"--{name}: config file '{path}' not found; pass an existing one, "
          "e.g. --config=configs/digits.py (the configs are in configs/)"
        )
      _fail(f"--{name}: could not load config file '{path}': {str(cause).splitlines()[0]}")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with config errors as one line, not a traceback.

  ml_collections raises a bare AttributeError/KeyError for e.g. `--config.training.nope=1`, and an
  OSError wall on first use of a config file that does not exist.
  """
  try:
    remaining = app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    field = str(e.args[0] if e.args else e).strip("\"'")
    overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
    _fail(
      f"unknown config field '{field}' in {' '.join(overrides)}; "
      "see the config file for the valid fields"
    )
  _check_config_files_loaded()
  return remaining
