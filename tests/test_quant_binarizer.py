"""Multi-basis weight binarizer: scale init, Eq. 5 forward, distinct values, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from binarydm_jax.quant.weight_binarizer import binarize_kernel, init_scales, int_quantize_kernel


def _kernel(shape=(3, 3, 8, 6)):
  return 0.7 * jax.random.normal(jax.random.key(0), shape)


def _np_sign(x):
  return np.where(x >= 0, 1.0, -1.0)


def test_init_scales_are_mean_abs_of_residuals():
  w = np.asarray(_kernel())
  s1, s2, s3 = init_scales(w, 3)
  e1 = np.abs(w).mean(axis=(0, 1, 2))
  r2 = w - e1 * _np_sign(w)
  e2 = np.abs(r2).mean(axis=(0, 1, 2))
  r3 = r2 - e2 * _np_sign(r2)
  for got, want in zip((s1, s2, s3), (e1, e2, np.abs(r3).mean(axis=(0, 1, 2))), strict=True):
    assert got.shape == (6,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_eq5_forward_matches_plain_reference():
  w = np.asarray(_kernel((16, 5)))  # A dense kernel (in, out).
  s = (np.linspace(0.5, 1.0, 5, dtype=np.float32), np.linspace(0.1, 0.2, 5, dtype=np.float32))
  first = s[0] * _np_sign(w)
  expected = first + s[1] * _np_sign(
    w - first
  )  # sigma_I sign(w) + sigma_II sign(w - sigma_I sign(w))
  np.testing.assert_allclose(binarize_kernel(w, s), expected, rtol=1e-6)


@pytest.mark.parametrize("bases", [1, 2, 3])
def test_at_most_2_pow_k_values_per_output_channel(bases):
  w = _kernel()
  wb = np.asarray(binarize_kernel(w, init_scales(w, bases))).reshape(-1, w.shape[-1])
  for c in range(w.shape[-1]):
    assert len(np.unique(wb[:, c])) <= 2**bases


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_more_bases_approximate_the_kernel_better(seed):
  w = np.asarray(jax.random.normal(jax.random.key(seed), (3, 3, 8, 6)))
  w = w * np.linspace(0.1, 2.0, 6, dtype=np.float32)  # Output channels of different magnitudes.
  errors = []  # Per output channel, for k = 1, 2, 3.
  for bases in (1, 2, 3):
    wb = np.asarray(binarize_kernel(w, init_scales(w, bases)))
    errors.append(np.mean((wb - w) ** 2, axis=(0, 1, 2)))
  errors = np.stack(errors)
  assert np.all(errors[1:] < errors[:-1]), errors  # In every output channel (hence overall too).
  assert np.all(errors[0] < np.mean(w**2, axis=(0, 1, 2)))  # One basis beats an all-zero kernel.


def test_gradients_follow_the_ste():
  w = _kernel((4, 3))
  scales = init_scales(w, 2)
  g = jax.random.normal(jax.random.key(1), w.shape)
  loss = lambda w, s: jnp.sum(binarize_kernel(w, s) * g)  # noqa: E731
  gw, (g1, g2) = jax.grad(loss, argnums=(0, 1))(w, scales)
  for x in (gw, g1, g2):
    assert np.all(np.isfinite(x))
  # Hand derivation with the clipped STE (mask m(x) = 1[|x| <= 1]), r = w - s1 sign(w):
  #   dL/ds2 = sum g sign(r);  dL/ds1 = sum g sign(w) (1 - s2 m(r));
  #   dL/dw = g (s1 m(w) + s2 m(r) (1 - s1 m(w))).
  wn, gn = np.asarray(w), np.asarray(g)
  s1, s2 = (np.asarray(s) for s in scales)
  r = wn - s1 * _np_sign(wn)
  m = lambda x: (np.abs(x) <= 1).astype(np.float32)  # noqa: E731
  np.testing.assert_allclose(g2, (gn * _np_sign(r)).sum(0), rtol=1e-5)
  np.testing.assert_allclose(g1, (gn * _np_sign(wn) * (1 - s2 * m(r))).sum(0), rtol=1e-5)
  np.testing.assert_allclose(gw, gn * (s1 * m(wn) + s2 * m(r) * (1 - s1 * m(wn))), rtol=1e-5)


def test_int8_kernel_quantizer():
  w = _kernel()
  wq = np.asarray(int_quantize_kernel(w, 8)).reshape(-1, w.shape[-1])
  for c in range(w.shape[-1]):
    assert len(np.unique(wq[:, c])) <= 255
  np.testing.assert_allclose(wq, np.asarray(w).reshape(wq.shape), atol=np.abs(w).max() / 127)
