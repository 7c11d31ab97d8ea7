"""How many samples each metric needs before its number means something, and the refusal below.

* FID, sFID: a Gaussian fitted to N features of dimension D has a covariance of rank at most
  N - 1, so with N <= D it is singular and the distance mostly measures N (3 digits score FID
  4,556). Both the samples and the reference need more rows than the features have dimensions:
  the FID Inception's pool features 2048 (FID, at least 2,049), its spatial features 2023 (sFID,
  at least 2,024), the digits CNN's `digits_classifier.FEATURE_DIM` = 64 (at least 65).
* KID: subsets of `KID_SUBSET_SIZE` = 1000 rows (torch-fidelity's default, which refuses fewer),
  capped at the reference set's size (the digits' 359 held-out images, the Inception reference's
  up to 10,000 pool features); fewer samples than that shrink the subsets, and the number is no
  longer comparable. The samples need at least that subset size.
* precision/recall: each point's k-th neighbour (k = 3): more than k rows in each set.

Below a minimum, `judge` refuses in one line (`FewSamplesError`) naming each metric, its count and
its minimum and the fix, unless few samples are allowed (`evaluate --allow_few_samples`, the job's
`eval.allow_few_samples`); then the result says `"reliable": false` and why (`"unreliable"`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from binarydm_jax.errors import UserError

KID_SUBSET_SIZE = 1000  # Rows per KID subset (torch-fidelity's kid_subset_size), before the cap.
CLI_FIX = "--allow_few_samples"
CONFIG_FIX = "--config.eval.allow_few_samples=True"


class FewSamplesError(UserError, ValueError):
  """Fewer samples (or reference images) than a metric needs; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class Need:
  """What one metric needs: at least `minimum` rows in each set of `counts`.

  Attributes:
    metric: the metric's key in the results, e.g. 'fid'.
    label: its name in messages, e.g. 'FID'.
    feature_dim: the dimension of the features it is computed on.
    minimum: the fewest rows each set of `counts` needs.
    why: what the minimum is, e.g. 'more than its 2048 feature dimensions'.
    counts: the sets' names and sizes, e.g. {'samples': 3, 'reference images': 50000}.
  """

  metric: str
  label: str
  feature_dim: int
  minimum: int
  why: str
  counts: Mapping[str, int]

  def shortfalls(self) -> list[str]:
    """One reason per set of `counts` below `minimum`."""
    return [
      f"{self.label} needs at least {self.minimum:,} {name} ({self.why}), got {count:,}"
      for name, count in self.counts.items()
      if count < self.minimum
    ]


def frechet_need(
  metric: str, label: str, feature_dim: int, num_samples: int, num_reference: int | None
) -> Need:
  """A Frechet distance's need: more samples and reference rows than feature dimensions."""
  counts = {"samples": num_samples}
  if num_reference is not None:
    counts["reference images"] = num_reference
  why = f"more than its {feature_dim:,} feature dimensions, else the covariance is singular"
  return Need(metric, label, feature_dim, feature_dim + 1, why, counts)


def kid_subset_size(num_reference: int) -> int:
  """KID's subset size against `num_reference` reference rows: min(KID_SUBSET_SIZE, them)."""
  return min(KID_SUBSET_SIZE, num_reference)


def kid_need(feature_dim: int, num_samples: int, num_reference: int) -> Need:
  """KID's need: at least its subset size of samples."""
  size = kid_subset_size(num_reference)
  why = f"its subset size, min({KID_SUBSET_SIZE:,}, {num_reference:,} reference rows)"
  return Need("kid", "KID", feature_dim, size, why, {"samples": num_samples})


def precision_recall_need(
  k: int, feature_dim: int, num_samples: int, num_reference: int | None
) -> Need:
  """Precision/recall's need: more than k rows in each set (each point's k-th neighbour)."""
  counts = {"samples": num_samples}
  if num_reference is not None:
    counts["reference images"] = num_reference
  why = f"more than k = {k}, for each point's k-th neighbour"
  return Need("precision_recall", "precision/recall", feature_dim, k + 1, why, counts)


def judge(needs: Iterable[Need], allow_few_samples: bool, fix: str = CLI_FIX) -> dict[str, Any]:
  """The reliability entries of a result, or FewSamplesError when a need is not met.

  Args:
    needs: what each metric of the result needs.
    allow_few_samples: score anyway below a minimum (the result then says it is unreliable).
    fix: how the user allows few samples, named in the error (`CLI_FIX` or `CONFIG_FIX`).

  Returns:
    `reliable` (bool), `unreliable` (the reasons, empty when reliable), `min_samples` and
    `feature_dims` ({metric: value}).

  Raises:
    FewSamplesError: (one line) a need is not met and few samples are not allowed.
  """
  needs = list(needs)
  reasons = [reason for need in needs for reason in need.shortfalls()]
  if reasons and not allow_few_samples:
    raise FewSamplesError(
      f"too few samples to score: {'; '.join(reasons)}: generate more, or pass {fix} to score "
      "them anyway (the result is then marked unreliable)"
    )
  return {
    "reliable": not reasons,
    "unreliable": reasons,
    "min_samples": {need.metric: need.minimum for need in needs},
    "feature_dims": {need.metric: need.feature_dim for need in needs},
  }


def headline(result: Mapping[str, Any], keys: Iterable[str] = ("fid", "kid_x1e3")) -> str:
  """The one-line summary of a result: `keys` and the sample count, and why it is unreliable."""
  shown = {key: result[key] for key in (*keys, "num_samples") if key in result}
  line = ", ".join(
    f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
    for key, value in shown.items()
  )
  if result.get("reliable") is False:
    line += f"; UNRELIABLE: {'; '.join(result['unreliable'])}"
  return line
