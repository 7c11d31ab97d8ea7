"""Converts torch-fidelity's FID Inception `.pth` into `binarydm_jax.evaluation.inception`'s format.

`python -m binarydm_jax.convert.inception --pth=FILE --out=DIR [--overwrite] [--allow_other_weights]`

FILE is `weights-inception-2015-12-05-6726825d.pth` from `inception.WEIGHTS_URL` (a torch pickle
of `FeatureExtractorInceptionV3`'s state dict, 566 tensors); its sha256 must be
`inception.WEIGHTS_SHA256` unless `--allow_other_weights`. Each BasicConv2d's conv and batch norm
(eps 1e-3, running statistics) are folded, in float64, into one biased conv: kernel OIHW -> HWIO
scaled by gamma / sqrt(var + eps), bias beta - mean * gamma / sqrt(var + eps). The classifier `fc`
goes (out, in) -> (in, out). Any tensor left over, missing or misshapen fails the conversion.

torch is not a dependency of the library: it is imported here only, to read the pickle.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import app, flags

from binarydm_jax.errors import one_line_errors
from binarydm_jax.evaluation import inception

BN_EPS = 1e-3
_BN_LEAVES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def convert_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """torch-fidelity InceptionV3 state dict -> our `params` tree (float32 numpy, BN folded).

  Args:
    state_dict: tensor name -> array (numpy, or anything `np.asarray` accepts).

  Returns:
    The nested `params` tree of `inception.InceptionV3`.

  Raises:
    inception.InceptionError: listing missing, left-over or misshapen tensors.
  """
  remaining = {k: np.asarray(v, np.float64) for k, v in state_dict.items()}
  params: dict[str, Any] = {}
  problems = []
  for key in sorted(k for k in remaining if k.endswith(".conv.weight")):
    prefix = key[: -len(".conv.weight")]
    bn = {leaf: remaining.pop(f"{prefix}.bn.{leaf}", None) for leaf in _BN_LEAVES}
    weight = remaining.pop(key)
    if any(bn[leaf] is None for leaf in _BN_LEAVES[:4]):
      problems.append(f"{prefix}.bn.* missing")
      continue
    scale = bn["weight"] / np.sqrt(bn["running_var"] + BN_EPS)
    node = params
    for name in prefix.split("."):
      node = node.setdefault(name, {})
    node["kernel"] = (weight * scale[:, None, None, None]).transpose(2, 3, 1, 0).astype(np.float32)
    node["bias"] = (bn["bias"] - bn["running_mean"] * scale).astype(np.float32)
  if "fc.weight" in remaining and "fc.bias" in remaining:
    params["fc"] = {
      "kernel": remaining.pop("fc.weight").T.astype(np.float32),
      "bias": remaining.pop("fc.bias").astype(np.float32),
    }
  if remaining:
    problems.append(f"left-over tensors {sorted(remaining)[:10]}")
  if problems:
    raise inception.InceptionError(
      f"not a torch-fidelity FeatureExtractorInceptionV3 state dict: {'; '.join(problems)}"
    )
  inception.check_params(params)
  return params


def read_pth(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a torch state dict pickle into numpy arrays (needs torch).

  Raises:
    inception.InceptionError: if torch is not installed or the file holds no state dict.
  """
  try:
    import torch
  except ImportError as e:
    raise inception.InceptionError(
      f"reading {path} needs torch, which binarydm_jax does not install: pip install torch "
      "(CPU wheels suffice), convert, and torch is not needed afterwards"
    ) from e
  state_dict = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(state_dict, Mapping):
    raise inception.InceptionError(f"{path} holds a {type(state_dict).__name__}, not a state dict")
  return {k: v.detach().cpu().double().numpy() for k, v in state_dict.items()}


def convert_pth(
  pth: str | os.PathLike,
  out_dir: str | os.PathLike,
  *,
  overwrite: bool = False,
  allow_other_weights: bool = False,
) -> pathlib.Path:
  """Checks `pth`'s sha256, converts it and writes `out_dir` for `inception.load_inception`.

  Args:
    pth: torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`.
    out_dir: the directory to write.
    overwrite: replace `out_dir` if it exists.
    allow_other_weights: convert a file whose sha256 is not `inception.WEIGHTS_SHA256` (tests).

  Returns:
    The absolute path of `out_dir`.

  Raises:
    inception.InceptionError: (one line) missing file, wrong hash, or tensors that do not fit.
  """
  pth = pathlib.Path(pth).expanduser()
  if not pth.is_file():
    raise inception.InceptionError(
      f"no file {pth}: download {inception.WEIGHTS_URL} and pass its path as --pth"
    )
  sha256 = inception.file_sha256(pth)
  if sha256 != inception.WEIGHTS_SHA256 and not allow_other_weights:
    raise inception.InceptionError(
      f"{pth} has sha256 {sha256}, not the FID Inception's {inception.WEIGHTS_SHA256}: "
      f"download {inception.WEIGHTS_URL} again (or pass --allow_other_weights for other weights)"
    )
  params = convert_state_dict(read_pth(pth))
  return inception.save_inception(
    out_dir, params, source_name=pth.name, source_sha256=sha256, overwrite=overwrite
  )


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  values = flags.FLAGS
  with one_line_errors():
    path = convert_pth(
      values.pth,
      values.out,
      overwrite=values.overwrite,
      allow_other_weights=values.allow_other_weights,
    )
  print(f"FID Inception weights written to {path}; load them with load_inception({str(path)!r})")


if __name__ == "__main__":
  # Flags are defined only when run as a program, so importing this module defines none.
  flags.DEFINE_string("pth", None, "weights-inception-2015-12-05-6726825d.pth", required=True)
  flags.DEFINE_string("out", str(inception.DEFAULT_DIR), "Directory to write.")
  flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")
  flags.DEFINE_bool(
    "allow_other_weights", False, "Convert a .pth whose sha256 is not the FID Inception's."
  )
  app.run(main)
