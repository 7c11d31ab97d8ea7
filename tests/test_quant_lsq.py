"""LSQ / LSQ+ forward, gradients and calibration against hand computations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from binarydm_jax.quant import lsq


def test_ranges():
  assert lsq.signed_range(4) == (-8, 7)
  assert lsq.signed_range(8) == (-128, 127)
  assert lsq.unsigned_range(4) == (0, 15)


def test_lsq_forward_and_gradients_by_hand():
  # 4 bits: Q_n = -8, Q_p = 7; step 0.5; values inside, on a half (ties to even) and clipped.
  x = jnp.array([0.3, -1.26, 0.75, 10.0, -10.0, 1.25])
  step = jnp.float32(0.5)
  # x / s = [0.6, -2.52, 1.5, 20, -20, 2.5] -> round/clip [1, -3, 2, 7, -8, 2].
  expected = np.array([1, -3, 2, 7, -8, 2]) * 0.5
  np.testing.assert_allclose(lsq.lsq_quantize(x, step, 4), expected, rtol=1e-6)

  g_x, g_s = jax.grad(lambda v, s: jnp.sum(lsq.lsq_quantize(v, s, 4)), argnums=(0, 1))(x, step)
  np.testing.assert_array_equal(g_x, [1, 1, 1, 0, 0, 1])  # STE inside the range, 0 outside.
  # dx_q/ds = round(x/s) - x/s inside, Q_n or Q_p when clipped; times g = 1/sqrt(numel * Q_p).
  v = np.asarray(x) / 0.5
  per_elem = np.where(v > 7, 7.0, np.where(v < -8, -8.0, np.round(v) - v))
  g = 1.0 / math.sqrt(x.size * 7)
  np.testing.assert_allclose(g_s, per_elem.sum() * g, rtol=1e-5)


def test_lsq_plus_forward_and_gradients_by_hand():
  x = jnp.array([-0.25, 0.0, 0.6, 3.0, 100.0])
  step, offset = jnp.float32(0.2), jnp.float32(-0.3)
  # (x - b) / s = [0.25, 1.5, 4.5, 16.5, 501.5] -> round/clip(0, 15) [0, 2, 4, 15, 15].
  expected = np.array([0, 2, 4, 15, 15]) * 0.2 - 0.3
  np.testing.assert_allclose(lsq.lsq_plus_quantize(x, step, offset, 4), expected, atol=1e-6)
  g_s, g_b = jax.grad(lambda s, b: jnp.sum(lsq.lsq_plus_quantize(x, s, b, 4)), argnums=(0, 1))(
    step, offset
  )
  v = (np.asarray(x) + 0.3) / 0.2
  clipped = v > 15
  d_s = np.where(clipped, 15.0, np.round(v) - v)
  d_b = np.where(clipped, 1.0, 0.0)  # Inside the range x_q - x does not depend on b.
  g = 1.0 / math.sqrt(x.size * 15)
  np.testing.assert_allclose(g_s, d_s.sum() * g, rtol=1e-4)
  np.testing.assert_allclose(g_b, d_b.sum() * g, rtol=1e-5)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_calibration_formulas(bits):
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 16))
  q_p = 2 ** (bits - 1) - 1
  np.testing.assert_allclose(
    lsq.calibrate_signed(x, bits), 2 * np.mean(np.abs(x)) / math.sqrt(q_p), rtol=1e-5
  )
  step, offset = lsq.calibrate_asymmetric(x, bits)
  np.testing.assert_allclose(offset, np.min(x))
  # The LSQ+ grid spans the data: min .. max in 2^b - 1 steps.
  np.testing.assert_allclose(step, (np.max(x) - np.min(x)) / (2**bits - 1), rtol=1e-5)
  assert float(lsq.calibrate_signed(jnp.zeros(3), bits)) > 0  # Floored, never zero.
