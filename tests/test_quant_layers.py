"""QuantConv / QuantDense against plain-jnp references; param names; calibration; dtypes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from binarydm_jax.quant import QuantConv, QuantDense, QuantPolicy, QuantRule, calibrate
from binarydm_jax.quant.policy import FULL_PRECISION_POLICY


def _sign(x):
  return jnp.where(x >= 0, 1.0, -1.0)


def _policy(**kwargs):
  return QuantPolicy((QuantRule(".*", **kwargs),))


def _x(shape=(2, 8, 8, 5)):
  return jax.random.normal(jax.random.key(3), shape)


@pytest.mark.parametrize("bases", [1, 2, 3])
def test_binary_conv_equals_plain_reference(bases):
  layer = QuantConv(7, (3, 3), padding=((1, 1), (1, 1)), policy=_policy(bases=bases, act_bits=4))
  x = _x()
  params = layer.init(jax.random.key(0), x)["params"]
  assert set(params) == {"kernel", "bias", "act_step"} | {f"scale_{i + 1}" for i in range(bases)}
  params = dict(params, bias=jnp.linspace(-1, 1, 7), act_step=jnp.float32(0.3))
  # Plain reference: x_q = round(clip(x / s, -8, 7)) * s, w = sum_i sigma_i sign(r_i).
  xq = jnp.round(jnp.clip(x / 0.3, -8, 7)) * 0.3
  residual, w = params["kernel"], 0.0
  for i in range(bases):
    basis = params[f"scale_{i + 1}"] * _sign(residual)
    w, residual = w + basis, residual - basis
  expected = (
    jax.lax.conv_general_dilated(
      xq, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    + params["bias"]
  )
  np.testing.assert_allclose(layer.apply({"params": params}, x), expected, rtol=1e-5, atol=1e-5)


def test_binary_dense_asymmetric_equals_plain_reference():
  layer = QuantDense(6, policy=_policy(bases=2, act_bits=3, act_quantizer="asymmetric"))
  x = nn.swish(_x((4, 9)))
  params = layer.init(jax.random.key(0), x)["params"]
  assert set(params) == {"kernel", "bias", "scale_1", "scale_2", "act_step", "act_offset"}
  s, b = params["act_step"], params["act_offset"]
  np.testing.assert_allclose(b, jnp.min(x))  # Init on the init batch: offset = min(x).
  xq = jnp.round(jnp.clip((x - b) / s, 0, 7)) * s + b
  k = params["kernel"]
  w = params["scale_1"] * _sign(k)
  w = w + params["scale_2"] * _sign(k - w)
  np.testing.assert_allclose(layer.apply({"params": params}, x), xq @ w, rtol=1e-5, atol=1e-5)


def test_full_precision_layers_equal_flax_layers_exactly():
  x = _x()
  conv = nn.Conv(4, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)))
  qconv = QuantConv(
    4, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)), policy=FULL_PRECISION_POLICY
  )
  params = conv.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, qconv.init(jax.random.key(0), x)) == jax.tree.map(
    jnp.shape, params
  )
  np.testing.assert_array_equal(qconv.apply(params, x), conv.apply(params, x))
  dense, qdense = nn.Dense(3), QuantDense(3, policy=None)
  params = dense.init(jax.random.key(0), x)
  np.testing.assert_array_equal(qdense.apply(params, x), dense.apply(params, x))


def test_calibration_pass_sets_step_from_the_batch_and_forward_never_resets_it():
  layer = QuantConv(4, (1, 1), padding="VALID", policy=_policy(act_bits=4))
  x = 3.0 * _x()
  params = layer.init(jax.random.key(0), jnp.ones_like(x))["params"]
  params = calibrate(layer, params, x)
  np.testing.assert_allclose(
    params["act_step"], 2 * jnp.mean(jnp.abs(x)) / jnp.sqrt(7.0), rtol=1e-6
  )
  y = layer.apply({"params": params}, x)
  y_small = layer.apply({"params": dict(params, act_step=params["act_step"] / 4)}, x)
  assert not np.allclose(y, y_small)  # The stored (learned) step is what the forward uses.

  dense = QuantDense(3, policy=_policy(act_bits=4, act_quantizer="asymmetric"))
  params = dense.init(jax.random.key(0), jnp.ones_like(x))["params"]
  params = calibrate(dense, params, x)
  np.testing.assert_allclose(params["act_offset"], jnp.min(x))
  np.testing.assert_allclose(params["act_step"], (jnp.max(x) - jnp.min(x)) / 15.0, rtol=1e-6)


def test_int_treatment_and_bf16_compute():
  x = _x()
  layer = QuantConv(4, (3, 3), dtype=jnp.bfloat16, policy=_policy(treatment="int", act_bits=8))
  params = layer.init(jax.random.key(0), x)["params"]
  assert set(params) == {"kernel", "bias", "act_step"}
  assert params["kernel"].dtype == jnp.float32
  assert layer.apply({"params": params}, x).dtype == jnp.bfloat16
  binary = QuantConv(4, (3, 3), dtype=jnp.bfloat16, policy=_policy(bases=2))
  params = binary.init(jax.random.key(0), x)["params"]
  assert params["scale_2"].dtype == jnp.float32
  assert binary.apply({"params": params}, x).dtype == jnp.bfloat16
