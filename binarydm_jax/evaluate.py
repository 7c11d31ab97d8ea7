"""`python -m binarydm_jax.evaluate`: scores generated samples, writes all metrics to a JSON file.

  python -m binarydm_jax.evaluate --samples=DIR_OR.npz --ref=digits --json=OUT.json
  python -m binarydm_jax.evaluate --samples=DIR_OR.npz --ref=cifar10 --json=OUT.json \
      [--inception=DIR] [--ref_npz=REAL.npz | --data_dir=TFDS_DIR] [--cache_dir=DIR]
  python -m binarydm_jax.evaluate --samples=DIR_OR.npz --ref=images --ref_npz=REAL.npz \
      --json=OUT.json [--inception=DIR] [--cache_dir=DIR]

--samples is an `.npz` with uint8 NHWC
images under `arr_0` or a directory of `binarydm_jax.generate` shards.

Below the samples a metric needs (FID, sFID: more than the features' dimensions, 64 for digits and
2048 / 2023 for the Inception; KID: its subset size; precision/recall: more than k = 3;
`evaluation.minimums`) it refuses in one line; with --allow_few_samples it scores them and the JSON
says `"reliable": false` and why (`unreliable`), as does the printed line.

digits: `digits_metrics` (16 px grayscale, the offline digits CNN) against the held-out split,
  with the FID against the whole real set, its bootstrap interval and KID.
cifar10: FID, sFID, Inception Score, precision/recall and KID x 1e3 (`kid_x1e3`, `kid_std_x1e3`)
  in the FID Inception (`--inception`, converted by `binarydm_jax.convert.inception`) against the reference
  statistics of the CIFAR-10 train split (tfds, or the uint8 images of --ref_npz), computed once
  and cached in --cache_dir (`evaluation.reference`).
images: the same metrics against the real uint8 RGB images of --ref_npz (an .npz with `arr_0`
  or a shard directory, e.g. LSUN-Bedrooms for an LDM), cached under a hash of their files.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from absl import app, flags
from etils import epath

from binarydm_jax.errors import one_line_errors
from binarydm_jax.evaluation import inception, minimums, reference
from binarydm_jax.evaluation.score import (
  REFS,
  check_samples,
  cifar10_train_images,
  reference_cache_label,
  score_against_reference,
  score_digits,
)
from binarydm_jax.sampling.sample_shards import MANIFEST_NAME, load_samples


def _reference_images(path: str | None, data_dir: str | None, ref: str) -> np.ndarray:
  """Real images: the uint8 NHWC `arr_0` of --ref_npz, else the CIFAR-10 train split."""
  if not path:
    return cifar10_train_images(data_dir)
  images = load_samples(path)
  check_samples(images, ref)
  return images


_SAMPLES = flags.DEFINE_string("samples", None, "An .npz (arr_0: uint8 NHWC) or a shard dir.")
_REF = flags.DEFINE_enum("ref", None, list(REFS), "The real data and metrics.")
_JSON = flags.DEFINE_string("json", None, "Where to write the metrics.")
_INCEPTION = flags.DEFINE_string(
  "inception", None, f"Converted FID Inception weights (default {inception.DEFAULT_DIR})."
)
_ALLOW_OTHER = flags.DEFINE_bool(
  "allow_other_weights", False, "Accept Inception weights that are not the FID ones (tests)."
)
_REF_NPZ = flags.DEFINE_string(
  "ref_npz",
  None,
  "Real uint8 NHWC images (arr_0, or a shard dir): images: required; cifar10: instead of tfds.",
)
_REF_STATS = flags.DEFINE_string("ref_stats", None, "cifar10: a reference cache file to use.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "cifar10: the tfds data dir.")
_CACHE_DIR = flags.DEFINE_string(
  "cache_dir", reference.DEFAULT_CACHE_DIR, "Where references are cached."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of KID's subsets and the digits bootstrap.")
_ALLOW_FEW = flags.DEFINE_bool(
  "allow_few_samples",
  False,
  "Score fewer samples than a metric needs (e.g. FID: more than its feature dimensions); the "
  'JSON then says "reliable": false and why.',
)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not (_SAMPLES.value and _REF.value and _JSON.value):
    raise app.UsageError("pass --samples=PATH, --ref=digits|cifar10|images and --json=OUT")
  with one_line_errors():
    images = load_samples(_SAMPLES.value)
    check_samples(images, _REF.value)
    if _REF.value == "digits":
      result = score_digits(images, _SEED.value, allow_few_samples=_ALLOW_FEW.value)
    else:
      extractor = inception.load_inception(_INCEPTION.value, allow_other_weights=_ALLOW_OTHER.value)
      result = score_against_reference(
        images,
        reference_cache_label(_REF.value, _REF_NPZ.value),
        extractor,
        lambda: _reference_images(_REF_NPZ.value, _DATA_DIR.value, _REF.value),
        _CACHE_DIR.value,
        _REF_STATS.value,
        _SEED.value,
        allow_few_samples=_ALLOW_FEW.value,
      )
  manifest = epath.Path(_SAMPLES.value) / MANIFEST_NAME
  if manifest.is_file():
    result["generation"] = json.loads(manifest.read_text())
  result.update(ref=_REF.value, samples=_SAMPLES.value)
  if jax.process_index() == 0:
    out = epath.Path(_JSON.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True))
    print(f"{_JSON.value}: {minimums.headline(result)}")


if __name__ == "__main__":
  app.run(main)
