"""KID (unbiased MMD^2, cubic polynomial kernel, subsets) against a straightforward numpy reference."""

import numpy as np
import pytest

from binarydm_jax.evaluation.kid import kid, kid_x1e3


def _reference_mmd2(x: np.ndarray, y: np.ndarray) -> float:
  """Unbiased MMD^2 by the definition: explicit loops over the pairs, no vectorised sums."""
  m, d = x.shape

  def k(a, b):
    return (float(np.dot(a, b)) / d + 1.0) ** 3

  within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
  across = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
  return within / (m * (m - 1)) - 2.0 * across / (m * m)


def _reference_kid(a, b, subset_size, num_subsets, seed):
  """torch-fidelity 0.4's loop: RandomState(seed), per subset a choice from a then from b."""
  rng = np.random.RandomState(seed)
  size = min(subset_size, len(a), len(b))
  values = []
  for _ in range(num_subsets):
    x = a[rng.choice(len(a), size, replace=False)]
    y = b[rng.choice(len(b), size, replace=False)]
    values.append(_reference_mmd2(x, y))
  return np.mean(values), np.std(values)


@pytest.mark.parametrize("sizes", [(30, 40), (25, 12)])
def test_kid_matches_a_loop_reference(sizes):
  rng = np.random.default_rng(0)
  a = rng.standard_normal((sizes[0], 5)).astype(np.float32)
  b = rng.standard_normal((sizes[1], 5)) + 0.3
  result = kid(a, b, subset_size=20, num_subsets=6, seed=3)
  mean, std = _reference_kid(a.astype(np.float64), b, 20, 6, 3)
  assert set(result) == {"kid", "kid_std"}
  np.testing.assert_allclose(result["kid"], mean, rtol=1e-9)
  np.testing.assert_allclose(result["kid_std"], std, rtol=1e-9)
  assert result["kid_std"] > 0


def test_kid_is_near_zero_for_one_distribution_and_positive_for_a_shift():
  rng = np.random.default_rng(1)
  a = rng.standard_normal((600, 8))
  same = kid(a, a, subset_size=200, num_subsets=20)
  other_draw = kid(a, rng.standard_normal((600, 8)), subset_size=200, num_subsets=20)
  shifted = kid(a, a + 1.0, subset_size=200, num_subsets=20)
  # Two draws of one distribution: unbiased, so centred on 0 within the subsets' spread.
  assert abs(other_draw["kid"]) < 2 * other_draw["kid_std"] / np.sqrt(20)
  assert shifted["kid"] > 10 * shifted["kid_std"] > 0
  # The same rows (subsets that overlap: slightly negative) and another draw: ~0 next to a shift.
  assert shifted["kid"] > 100 * max(abs(same["kid"]), abs(other_draw["kid"]))


def test_kid_is_deterministic_given_the_seed():
  rng = np.random.default_rng(2)
  a, b = rng.standard_normal((50, 4)), rng.standard_normal((60, 4)) + 0.5
  first = kid(a, b, subset_size=20, num_subsets=5, seed=7)
  assert kid(a, b, subset_size=20, num_subsets=5, seed=7) == first
  assert kid(a, b, subset_size=20, num_subsets=5, seed=8) != first


def test_subset_size_is_clipped_to_the_smaller_set():
  rng = np.random.default_rng(3)
  a, b = rng.standard_normal((12, 3)), rng.standard_normal((40, 3)) + 1.0
  # Every subset holds all 12 rows of `a`, so only b's draws vary: as asking for 12 outright.
  clipped = kid(a, b, subset_size=1000, num_subsets=4, seed=0)
  assert clipped == kid(a, b, subset_size=12, num_subsets=4, seed=0)
  np.testing.assert_allclose(clipped["kid"], _reference_kid(a, b, 12, 4, 0)[0], rtol=1e-9)


def test_results_carry_kid_times_1e3_in_keys_that_say_so():
  rng = np.random.default_rng(4)
  a, b = rng.standard_normal((12, 3)), rng.standard_normal((40, 3)) + 1.0
  raw = kid(a, b, subset_size=20, num_subsets=4, seed=1)
  scaled = kid_x1e3(a, b, subset_size=20, num_subsets=4, seed=1)
  assert set(scaled) == {"kid_x1e3", "kid_std_x1e3", "kid_subset_size"}
  assert scaled["kid_x1e3"] == pytest.approx(1e3 * raw["kid"], rel=1e-12)
  assert scaled["kid_std_x1e3"] == pytest.approx(1e3 * raw["kid_std"], rel=1e-12)
  assert scaled["kid_subset_size"] == 12 and raw["kid"] > 0.01  # A shifted set: a clear KID.


@pytest.mark.parametrize(
  "a,b,kwargs,match",
  [
    (np.zeros((5, 3)), np.zeros((5, 4)), {}, r"same width"),
    (np.zeros((5,)), np.zeros((5, 3)), {}, r"feature matrices"),
    (np.zeros((1, 3)), np.zeros((5, 3)), {}, r"at least 2 rows.*got 1 and 5"),
    (np.zeros((5, 3)), np.zeros((5, 3)), {"subset_size": 1}, r"subset_size >= 2"),
    (np.zeros((5, 3)), np.zeros((5, 3)), {"num_subsets": 0}, r"num_subsets >= 1"),
  ],
)
def test_kid_rejects_bad_input(a, b, kwargs, match):
  with pytest.raises(ValueError, match=match):
    kid(a, b, **kwargs)
