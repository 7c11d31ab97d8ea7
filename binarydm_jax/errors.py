"""Errors a user can fix, shared by modules that must not import each other.

Every error the package raises for bad input (a config value, a flag, a missing file, a workdir
in use) is a `UserError`: the command lines print it as one line (`one_line_errors`), while any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


class UserError(Exception):
  """A problem the user can fix; its message is one line naming the problem and the fix."""


class TeacherError(UserError):
  """A teacher source that cannot be found, read or converted; the message says what to do."""


class ConfigError(UserError, ValueError):
  """A config value that cannot work; the message names the key, the value and what is expected."""


class FlagError(UserError, ValueError):
  """A command-line flag value that cannot work; the message names the flag and what is expected."""


class DatasetError(UserError):
  """Training images that cannot be found or read; the message says what to do."""


class PrerequisiteError(UserError):
  """What a job needs besides its config (data, teacher, first stage, Inception) is missing."""


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
  """For a command line: a `UserError` inside prints `error: MESSAGE` and exits with status 1.

  Any other exception propagates with its traceback (it is a bug, not bad input).
  """
  try:
    yield
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
