"""Errors a user can fix, shared by modules that must not import each other."""


class TeacherError(Exception):
  """A teacher source that cannot be found, read or converted; the message says what to do."""


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key, the value and what is expected."""


class DatasetError(Exception):
  """Training images that cannot be found or read; the message says what to do."""
