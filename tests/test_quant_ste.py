"""Sign STE, rounding STE and gradient scaling."""

import jax
import jax.numpy as jnp
import numpy as np

from binarydm_jax.quant.ste import round_ste, scale_grad, sign, sign_ste


def _inputs():
  x = 2.0 * jax.random.normal(jax.random.key(0), (257,))  # Plenty of values outside [-1, 1].
  return jnp.concatenate([x, jnp.array([0.0, 1.0, -1.0, 1.0001, -1.0001])])


def test_sign_ste_forward_is_exactly_plus_minus_one():
  x = _inputs()
  y = sign_ste(x)
  assert set(np.unique(np.asarray(y)).tolist()) == {-1.0, 1.0}
  np.testing.assert_array_equal(y, np.where(np.asarray(x) >= 0, 1.0, -1.0))
  assert float(sign_ste(jnp.float32(0.0))) == 1.0  # sign(0) = +1 by design.
  assert sign_ste(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_sign_ste_gradient_matches_formula_and_reference():
  x = _inputs()
  g = jax.random.normal(jax.random.key(1), x.shape)
  grad = jax.grad(lambda v: jnp.sum(sign_ste(v) * g))(x)
  expected = np.where(np.abs(np.asarray(x)) <= 1, np.asarray(g), 0.0)
  np.testing.assert_array_equal(grad, expected)

  def reference(v):  # The qwix-style fake-quant reference, masked to |x| <= 1.
    ste = v + jax.lax.stop_gradient(sign(v) - v)
    mask = jax.lax.stop_gradient(jnp.abs(v) <= 1)
    return jnp.where(mask, ste, jax.lax.stop_gradient(sign(v)))

  np.testing.assert_array_equal(sign_ste(x), reference(x))
  ref_grad = jax.grad(lambda v: jnp.sum(reference(v) * g))(x)
  np.testing.assert_array_equal(grad, ref_grad)
  assert np.sum(expected == 0) > 50  # The clipping was exercised.


def test_round_ste_and_scale_grad():
  x = jnp.array([-1.5, -0.5, 0.5, 1.4, 2.5])
  np.testing.assert_array_equal(round_ste(x), [-2.0, -0.0, 0.0, 1.0, 2.0])  # Half to even.
  np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(round_ste(v)))(x), np.ones(5))
  s = jnp.float32(3.0)
  assert float(scale_grad(s, 0.25)) == 3.0
  assert float(jax.grad(lambda v: 2.0 * scale_grad(v, 0.25))(s)) == 0.5
