"""One `UserError` base for every error a user can fix, and how the command lines report it."""

import ast
import importlib
import pathlib

import pytest

from binarydm_jax import errors

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "binarydm_jax"


def _error_classes() -> list[tuple[str, str]]:
  """(module, class name) of every `class ...Error` defined in the package's files."""
  found = []
  for path in sorted(PACKAGE.rglob("*.py")):
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
        found.append((module, node.name))
  return found


def test_every_error_class_of_the_package_is_a_user_error():
  classes = _error_classes()
  assert ("binarydm_jax.workdir", "WorkdirError") in classes and len(classes) > 15
  not_user = [
    f"{module}.{name}"
    for module, name in classes
    if not issubclass(getattr(importlib.import_module(module), name), errors.UserError)
  ]
  assert not not_user, f"not UserError subclasses: {not_user}"


def test_one_line_errors_prints_a_user_error_and_exits_1(capsys):
  with pytest.raises(SystemExit) as exit_info, errors.one_line_errors():
    raise errors.ConfigError("config.quant.preset='W9A9': expected one of W1A4, ...")
  assert exit_info.value.code == 1
  assert capsys.readouterr().err == "error: config.quant.preset='W9A9': expected one of W1A4, ...\n"


def test_one_line_errors_lets_a_bug_through_with_its_traceback(capsys):
  with pytest.raises(KeyError, match="a bug"), errors.one_line_errors():
    raise KeyError("a bug")
  with pytest.raises(ValueError, match="not a user error"), errors.one_line_errors():
    raise ValueError("not a user error")
  assert capsys.readouterr().err == ""
