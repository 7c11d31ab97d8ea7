"""Imports torch-fidelity 0.4.0's modules without its package `__init__` (test helper).

torch_fidelity/__init__.py (and torch_fidelity/utils.py, which metric_isc and metric_fid import
names from) import torchvision, which the tests do not install: PyPI's torchvision wheels pin
another torch. The parts we compare against (the Inception network, the TF1 resize, the IS and
FID formulas) need only torch. So the package is registered in sys.modules as a bare module
whose __path__ is the installed directory (its __init__ never runs), and torch_fidelity.utils as a
module whose every name raises when called: none of the functions we call uses them.
`random_inception` builds the network with random weights (the tests' and the benchmark's).
"""

import importlib
import importlib.util
import sys
import types
from unittest import mock


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


def random_inception(seed: int = 0, features: tuple[str, ...] = ("2048",)):
  """torch-fidelity's FeatureExtractorInceptionV3 with random convs and batch-norm statistics.

  He-scaled conv weights keep the activations O(1) through the 94 convs; no weights file is read.
  Returns the module (in eval mode, outputs `features`) and its state dict.
  """
  import torch  # Only the torch side needs it.

  cls = import_module("feature_extractor_inceptionv3").FeatureExtractorInceptionV3
  # The constructor always loads a state dict: skip that to get the bare architecture.
  with mock.patch.object(torch, "load"), mock.patch.object(cls, "load_state_dict"):
    model = cls("inception-v3-compat", list(features), feature_extractor_weights_path="unused")
  generator = torch.Generator().manual_seed(seed)
  state_dict = model.state_dict()
  for key, value in state_dict.items():
    if key.endswith("conv.weight"):
      std = (2.0 / value[0].numel()) ** 0.5
      value.copy_(torch.randn(value.shape, generator=generator) * std)
    elif key.endswith(("bn.weight", "running_var")):
      value.copy_(torch.rand(value.shape, generator=generator) + 0.5)
    elif key.endswith(("bn.bias", "running_mean")):
      value.copy_(torch.randn(value.shape, generator=generator) * 0.1)
  return model.eval(), state_dict
