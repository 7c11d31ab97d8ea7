"""Bytes on disk of the 1-bit export of a config's student, per storage dtype.

  python -m benchmarks.export_size [--config=configs/digits.py] [--fp_dtypes=float32,bfloat16] \
      [--quant_dtypes=float32,float16]

The student's params are random numbers of the right shapes (single basis: scale_2 = 0), so no
training is needed; the export's size depends on the shapes, not on the values, except for the
checkpoint's compression of the FP part (random normal weights, like trained ones, barely compress).
Prints one markdown row per (fp_dtype, quant_dtype): the FP32 teacher's bytes, each stored part, the manifest, the
whole export directory on disk and the saving.
"""

from __future__ import annotations

import itertools
import os
import tempfile

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from binarydm_jax import workdir
from binarydm_jax.export import FP_DTYPES, export_student
from binarydm_jax.models.unet import param_shapes
from binarydm_jax.quant.params import scale_index

_CONFIG = config_flags.DEFINE_config_file("config", "configs/digits.py", "The job's config.")
_FP_DTYPES = flags.DEFINE_list("fp_dtypes", ["float32", "bfloat16"], f"Any of {FP_DTYPES}.")
_QUANT_DTYPES = flags.DEFINE_list("quant_dtypes", ["float32"], f"Any of {FP_DTYPES}.")


def random_params(config, seed: int = 0):
  """Single-basis student params of the config's shapes: N(0, 0.1), higher scales 0."""
  rng = np.random.default_rng(seed)
  shapes = param_shapes(workdir.student_model(config), workdir.image_shape(config))

  def leaf(path, shape):
    index = scale_index(path[-1].key)
    if index is not None and index > 1:
      return np.zeros(shape.shape, np.float32)
    return rng.normal(0.0, 0.1, shape.shape).astype(np.float32)

  return jax.tree.map_with_path(leaf, shapes)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  params = random_params(config)
  print(
    "| model | bits | fp_dtype | quant_dtype | FP32 teacher | packed signs | int8 | quant | fp "
    "| manifest | export on disk | size_saving |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
  )
  with tempfile.TemporaryDirectory() as tmp:
    for fp_dtype, quant_dtype in itertools.product(_FP_DTYPES.value, _QUANT_DTYPES.value):
      out = os.path.join(tmp, f"{fp_dtype}_{quant_dtype}")
      info = export_student(
        config, params, out, first_stage=None, fp_dtype=fp_dtype, quant_dtype=quant_dtype
      )
      parts = {name: part["bytes"] for name, part in info["parts"].items()}
      model = config.model
      print(
        f"| ch {model.ch}, ch_mult {tuple(model.ch_mult)}, {config.data.image_size}px "
        f"| {info['student']['bits']} | {fp_dtype} | {quant_dtype} | {info['fp32_bytes']:,} "
        f"| {parts.get('signs', 0):,} | {parts.get('int8', 0):,} | {parts.get('quant', 0):,} "
        f"| {parts.get('fp', 0):,} "
        f"| {os.path.getsize(os.path.join(out, 'manifest.json')):,} "
        f"| {info['export_bytes']:,} | {info['size_saving']}x |"
      )


if __name__ == "__main__":
  app.run(main)
