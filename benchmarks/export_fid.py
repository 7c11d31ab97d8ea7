"""What the export's storage dtypes cost in quality: a trained student exported several ways, each
loaded back, sampled on the same noise and scored with the digits-FID.

  python -m benchmarks.export_fid --workdir=DIR [--num_samples=2048] \
      [--variants=float32/float32,bfloat16/float32,bfloat16/float16] [--inference=float]

A variant is FP_DTYPE/QUANT_DTYPE (`export.fp_dtype` / `export.quant_dtype`). Prints one markdown
row per variant: bytes on disk, size_saving, digits-FID, and the mean absolute difference of its
samples from the float32/float32 export's (same noise, so 0 means the same images).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
from absl import app, flags

from binarydm_jax import workdir
from binarydm_jax.data.input_pipeline import load_dataset
from binarydm_jax.evaluation.digits_classifier import DigitsFeatureExtractor
from binarydm_jax.evaluation.digits_fid import digits_fid
from binarydm_jax.export import FP_DTYPES, INFERENCE_MODES, export_student_from_workdir
from binarydm_jax.sampling import sampleable
from configs import default

_WORKDIR = flags.DEFINE_string("workdir", None, "A digits job's --workdir.", required=True)
_NUM = flags.DEFINE_integer("num_samples", 2048, "Samples per variant.")
_VARIANTS = flags.DEFINE_list(
  "variants",
  ["float32/float32", "bfloat16/float32", "bfloat16/float16", "bfloat16/bfloat16"],
  f"FP_DTYPE/QUANT_DTYPE pairs, each of {FP_DTYPES}; float32/float32 (exact) is always scored.",
)
_INFERENCE = flags.DEFINE_enum("inference", "float", list(INFERENCE_MODES), "How to compute.")
EXACT = "float32/float32"


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  variants = [EXACT, *(v for v in _VARIANTS.value if v != EXACT)]
  for variant in variants:
    if len(variant.split("/")) != 2:
      raise app.UsageError(f"--variants: {variant!r} is not FP_DTYPE/QUANT_DTYPE")
  trained = workdir.load_student(_WORKDIR.value)
  config = trained.config
  if config.eval.metric != "digits_fid":
    raise app.UsageError(f"{_WORKDIR.value} is not a digits job (eval.metric={config.eval.metric})")
  dataset = load_dataset(config.data)
  extractor = DigitsFeatureExtractor(config.data.image_size, cache_dir=config.eval.cache_dir)
  # The job's evaluation noise; workdirs from before eval.seed used its default.
  seed = config.eval.get("seed", default.get_config().eval.seed)
  print(
    f"student of {_WORKDIR.value} (step {trained.step}), {_NUM.value} samples, "
    f"inference={_INFERENCE.value}\n\n"
    "| fp_dtype / quant_dtype | export on disk (bytes) | size_saving | digits-FID "
    "| mean abs sample change vs float32/float32 |\n|---|---|---|---|---|"
  )
  exact_images = None
  with tempfile.TemporaryDirectory() as tmp:
    for variant in variants:
      fp_dtype, quant_dtype = variant.split("/")
      out = os.path.join(tmp, variant.replace("/", "_"))
      info = export_student_from_workdir(_WORKDIR.value, out, fp_dtype, quant_dtype)
      source = sampleable.load(out, None, "student", _INFERENCE.value)
      images = sampleable.draw(source, _NUM.value, None, None, seed, config.eval.batch_size)
      exact_images = images if exact_images is None else exact_images
      fid = digits_fid(images, dataset.heldout, extractor)["fid"]
      change = float(np.mean(np.abs(images - exact_images)))
      print(
        f"| {variant} | {info['export_bytes']:,} | {info['size_saving']}x | {fid:.1f} "
        f"| {change:.4f} |",
        flush=True,
      )


if __name__ == "__main__":
  app.run(main)
