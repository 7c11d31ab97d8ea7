"""Imports torch-fidelity 0.4.0's modules without its package `__init__` (test helper).

torch_fidelity/__init__.py (and torch_fidelity/utils.py, which metric_isc and metric_fid import
names from) import torchvision, which the tests do not install: PyPI's torchvision wheels pin
another torch. The parts we compare against (the Inception network, the TF1 resize, the IS and
FID formulas) need only torch. So the package is registered in sys.modules as a bare module
whose __path__ is the installed directory (its __init__ never runs), and torch_fidelity.utils as a
module whose every name raises when called: none of the functions we call uses them.
"""

import importlib
import importlib.util
import sys
import types


def _unavailable(name: str):
  def fail(*args, **kwargs):
    raise RuntimeError(f"torch_fidelity.utils.{name} needs torchvision, not installed for tests")

  return fail


def import_module(name: str) -> types.ModuleType:
  """`torch_fidelity.<name>`, imported without running torch_fidelity/__init__.py."""
  if "torch_fidelity" not in sys.modules:
    spec = importlib.util.find_spec("torch_fidelity")
    assert spec is not None, "pip install --no-deps -r requirements-test-nodeps.txt"
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = package
    utils = types.ModuleType("torch_fidelity.utils")
    utils.__getattr__ = _unavailable  # PEP 562: `from torch_fidelity.utils import x` gets a stub.
    sys.modules["torch_fidelity.utils"] = utils
  return importlib.import_module(f"torch_fidelity.{name}")
