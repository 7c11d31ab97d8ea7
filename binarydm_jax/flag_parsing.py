"""absl flag parsing shared by the command lines, with config errors as one line."""

from __future__ import annotations

import sys

from absl import app


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with an override of a missing config field as one line, not a traceback.

  ml_collections raises a bare AttributeError/KeyError for e.g. `--config.training.nope=1`.
  """
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    field = str(e.args[0] if e.args else e).strip("\"'")
    overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
    print(
      f"error: unknown config field '{field}' in {' '.join(overrides)}; "
      "see the config file for the valid fields",
      file=sys.stderr,
    )
    sys.exit(1)
