"""The activation quantizers: MSE-searched grids, timestep groups, split inputs, dynamic steps and
the bias correction, each against a numpy reference, and on the int8 path."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from binarydm_jax.models.unet import UNet
from binarydm_jax.quant import QuantConv, QuantDense, calibrate, default_quant_config, lsq
from binarydm_jax.quant.activations import timestep_groups, timestep_scope
from binarydm_jax.quant.policy import QuantPolicy, QuantRule
from binarydm_jax.quant.presets import policy_from_config
from binarydm_jax.training import qat_optim
from configs import digits

POST_SILU = jax.nn.silu(3.0 * jax.random.normal(jax.random.key(0), (16, 6, 6, 8)))
T = jnp.arange(16) * 62  # 0 .. 930: all four groups of 250 steps.


def np_quantize(x, step, bits, offset=None):
  """Reference fake quantization (signed LSQ, or LSQ+ with `offset`) in numpy."""
  x = np.asarray(x, np.float64)
  if offset is None:
    q_n, q_p = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return np.clip(np.round(x / step), q_n, q_p) * step
  return np.clip(np.round((x - offset) / step), 0, 2**bits - 1) * step + offset


def np_search(x, bits, asymmetric):
  """Brute force over the same candidates as `lsq.search_*`: the least squared error grid."""
  x = np.asarray(x, np.float64).ravel()
  fractions = np.asarray(lsq.SEARCH_FRACTIONS)
  if not asymmetric:
    steps = np.maximum(fractions * np.abs(x).max() / (2 ** (bits - 1) - 1), lsq.MIN_STEP)
    return min(steps, key=lambda s: np.sum((np_quantize(x, s, bits) - x) ** 2)), None
  lo, hi = x.min(), x.max()
  los = fractions * lo if lo < 0 else np.full_like(fractions, lo)
  his = fractions * hi if hi > 0 else np.full_like(fractions, hi)
  grid = [((h - low) / (2**bits - 1), low) for h in his for low in los]
  return min(grid, key=lambda c: np.sum((np_quantize(x, c[0], bits, c[1]) - x) ** 2))


@pytest.mark.parametrize("asymmetric", [False, True])
def test_mse_search_finds_the_least_error_candidate(asymmetric):
  x = POST_SILU[:4]  # 1,152 elements: the search scores every one of them.
  if asymmetric:
    step, offset = lsq.search_asymmetric(x, 4)
  else:
    step, offset = lsq.search_signed(x, 4), None
  ref_step, ref_offset = np_search(x, 4, asymmetric)
  np.testing.assert_allclose(step, ref_step, rtol=1e-5)
  if asymmetric:
    np.testing.assert_allclose(offset, ref_offset, rtol=1e-5)
  # Better than the 'lsq' start on post-SiLU data, as the point of the search.
  lsq_error = np.sum((np_quantize(x, lsq.calibrate_signed(x, 4), 4) - np.asarray(x)) ** 2)
  assert np.sum((np_quantize(x, step, 4, offset) - np.asarray(x)) ** 2) < lsq_error


def test_weighted_fit_uses_only_the_weighted_samples():
  x = jnp.concatenate([POST_SILU[:8], 10.0 * POST_SILU[8:]])
  low = jnp.arange(16) < 8
  for init in ("lsq", "mse"):
    step_low = lsq.fit_signed(x, 4, init, low.astype(jnp.float32))
    np.testing.assert_allclose(step_low, lsq.fit_signed(x[:8], 4, init), rtol=1e-5)
    step, offset = lsq.fit_asymmetric(x, 4, init, (~low).astype(jnp.float32))
    ref_step, ref_offset = lsq.fit_asymmetric(x[8:], 4, init)
    np.testing.assert_allclose([step, offset], [ref_step, ref_offset], rtol=1e-5)


def policy(**fields):
  return QuantPolicy((QuantRule(".*", treatment="fp", act_bits=4, **fields),))


def calibrated(layer, x, t=T):
  with timestep_scope(t):
    params = layer.init(jax.random.key(1), x)["params"]
    return calibrate(layer, params, x)


def apply(layer, params, x, t=T):
  with timestep_scope(t):
    return layer.apply({"params": params}, x)


def reference_conv(params, x_q):
  y = jax.lax.conv_general_dilated(
    jnp.asarray(x_q, jnp.float32),
    params["kernel"],
    (1, 1),
    "SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  return np.asarray(y + params["bias"])


def test_timestep_groups_give_each_sample_its_group_step():
  np.testing.assert_array_equal(
    timestep_groups(jnp.array([0, 249, 250, 999]), 4, 1000), [0, 0, 1, 3]
  )
  layer = QuantConv(4, policy=policy(act_quantizer="asymmetric", act_init="mse", act_t_groups=4))
  params = calibrated(layer, POST_SILU)
  assert params["act_step"].shape == params["act_offset"].shape == (4, 1)
  groups = np.asarray(timestep_groups(T, 4, 1000))
  for g in range(4):  # Each group's grid is fitted on that group's samples alone.
    step, offset = lsq.search_asymmetric(POST_SILU[groups == g], 4)
    np.testing.assert_allclose(params["act_step"][g, 0], step, rtol=1e-5)
    np.testing.assert_allclose(params["act_offset"][g, 0], offset, rtol=1e-5)
  x_q = np.stack(
    [
      np_quantize(POST_SILU[b], params["act_step"][g, 0], 4, params["act_offset"][g, 0])
      for b, g in enumerate(groups)
    ]
  )
  np.testing.assert_allclose(
    apply(layer, params, POST_SILU), reference_conv(params, x_q), atol=1e-5
  )


def test_split_quantizes_each_part_of_a_concatenated_input_on_its_own_grid():
  x = jnp.concatenate([POST_SILU, 0.1 * POST_SILU[..., :3]], axis=-1)  # Parts 8 + 3 channels.
  layer = QuantConv(4, (1, 1), input_split=8, policy=policy(act_split=True, act_init="mse"))
  params = calibrated(layer, x)
  assert params["act_step"].shape == (1, 2)
  np.testing.assert_allclose(params["act_step"][0, 0], lsq.search_signed(x[..., :8], 4), rtol=1e-5)
  np.testing.assert_allclose(params["act_step"][0, 1], lsq.search_signed(x[..., 8:], 4), rtol=1e-5)
  x_q = np.concatenate(
    [
      np_quantize(x[..., :8], params["act_step"][0, 0], 4),
      np_quantize(x[..., 8:], params["act_step"][0, 1], 4),
    ],
    axis=-1,
  )
  np.testing.assert_allclose(apply(layer, params, x), reference_conv(params, x_q), atol=1e-5)
  with pytest.raises(ValueError, match="act_split needs a concatenated input"):
    calibrated(QuantConv(4, policy=policy(act_split=True)), x)


def test_dynamic_steps_are_per_sample_and_batch_independent():
  layer = QuantDense(5, policy=policy(act_quantizer="dynamic"))
  x = POST_SILU.reshape(16, -1)
  params = layer.init(jax.random.key(1), x)["params"]
  assert set(params) == {"kernel", "bias"}  # Nothing learned, nothing calibrated.
  steps = 2 * np.mean(np.abs(np.asarray(x)), axis=1, keepdims=True) / math.sqrt(7)
  expected = np_quantize(x, steps, 4) @ np.asarray(params["kernel"]) + np.asarray(params["bias"])
  y = layer.apply({"params": params}, x)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(layer.apply({"params": params}, x[3:4]), y[3:4], rtol=1e-6)


@pytest.mark.parametrize("groups", [1, 4])
def test_bias_correction_removes_the_mean_output_shift(groups):
  fields = dict(act_quantizer="asymmetric", act_init="mse", act_t_groups=groups)
  layer = QuantConv(6, policy=policy(bias_correction=True, **fields))
  params = calibrated(layer, POST_SILU)
  assert params["bias_correction"].shape == ((6,) if groups == 1 else (groups, 6))
  exact = reference_conv(params, POST_SILU)
  shift = lambda p: np.mean(apply(layer, p, POST_SILU) - exact, axis=(1, 2))  # noqa: E731
  uncorrected = dict(params, bias_correction=jnp.zeros_like(params["bias_correction"]))
  group_of = np.asarray(timestep_groups(T, groups, 1000))
  for g in range(groups):  # Per channel and group, the mean shift is gone.
    np.testing.assert_allclose(shift(params)[group_of == g].mean(0), 0.0, atol=1e-6)
    assert np.abs(shift(uncorrected)[group_of == g].mean(0)).max() > 1e-4


CASES = {
  "t_groups": (dict(act_quantizer="asymmetric", act_t_groups=4), None),
  "split": (dict(act_split=True), 5),
  "dynamic": (dict(act_quantizer="dynamic"), None),
  "bias_correction": (dict(act_quantizer="asymmetric", act_t_groups=2, bias_correction=True), None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_int8_path_equals_fake_quant(case):
  fields, split = CASES[case]
  rules = lambda: (QuantRule(".*", act_bits=4, act_init="mse", **fields),)  # noqa: E731
  float_layer = QuantConv(4, input_split=split, policy=QuantPolicy(rules()))
  int8_layer = QuantConv(4, input_split=split, policy=QuantPolicy(rules()), inference="int8")
  params = calibrated(float_layer, POST_SILU)
  np.testing.assert_allclose(
    apply(int8_layer, params, POST_SILU),
    apply(float_layer, params, POST_SILU),
    rtol=1e-4,
    atol=1e-4,
  )


def test_a_grouped_layer_outside_a_timestep_scope_says_what_it_needs():
  layer = QuantConv(4, policy=policy(act_t_groups=4))
  with pytest.raises(ValueError, match="act_t_groups=4 needs the timesteps.*timestep_scope"):
    layer.init(jax.random.key(0), POST_SILU)


TINY = UNet(
  ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), out_channels=1, norm_groups=4
)


def tiny_policy(**fields):
  quant = default_quant_config()
  quant.preset = "baseline"
  for key, value in fields.items():
    quant[key] = value
  return policy_from_config(quant, TINY, (8, 8, 1))


def test_preset_fields_reach_the_right_layers():
  policy = tiny_policy(
    act_quantizer="asymmetric", act_init="mse", act_split=True, temb_act_bits=8, act_t_groups=10
  )
  skip = policy.resolve("output_blocks_0/res/skip")
  assert (skip.act_split, skip.act_quantizer, skip.act_init, skip.act_t_groups) == (
    True,
    "asymmetric",
    "mse",
    10,
  )
  assert not policy.resolve("output_blocks_0/res/conv_1").act_split  # Its input is normalised.
  assert policy.resolve("input_blocks_1/res/temb_proj").act_bits == 8
  assert policy.resolve("input_blocks_1/res/conv_1").act_bits == 4
  assert "4 asym mse t10 split" in str(policy)


@pytest.mark.parametrize(
  "fields, message",
  [
    (
      {"act_quantizer": "ternary"},
      r"act_quantizer='ternary': expected one of signed, asymmetric, dynamic",
    ),
    ({"act_init": "max"}, r"act_init='max': expected one of lsq, mse"),
    ({"act_t_groups": 0}, r"act_t_groups=0: expected an integer in 1..1000"),
    ({"act_t_groups": 1001}, r"act_t_groups=1001: expected an integer in 1..1000"),
    ({"calib_batches": 0}, r"calib_batches=0: expected an integer >= 1"),
    (
      {"rules": ({"regex": ".*conv_1", "act_split": True},)},
      r"rules\[0\]: act_split on input_blocks_1/res/conv_1, whose input is not a concatenation",
    ),
    ({"rules": ({"regex": ".*", "act_t_groups": 0},)}, r"rules\[0\].act_t_groups=0"),
  ],
)
def test_bad_quantizer_settings_fail_in_one_line(fields, message):
  with pytest.raises(ValueError, match=message):
    tiny_policy(**fields)


def test_the_search_sees_every_channel_of_a_large_input():
  """Subsampled for speed, but never aliased onto a few channels: a channel whose values are 100x
  the others' sets the range."""
  x = jnp.ones((64, 32, 32, 64)).at[..., 5].set(100.0)
  step = lsq.search_signed(x, 4)
  assert step * 7 >= 100.0 / 24  # The smallest candidate of a range that includes the 100s.
  step, offset = lsq.search_asymmetric(x, 4)
  assert step * 15 + offset > 50.0


def test_the_activation_quantizers_have_their_own_learning_rate():
  """qat.act_learning_rate scales the Adam steps of act_step/act_offset/bias_correction only."""

  params = {
    "conv": {"kernel": jnp.ones((2, 2)), "act_step": jnp.ones(()), "bias_correction": jnp.ones(2)}
  }
  grads = jax.tree.map(jnp.ones_like, params)
  qat_config = digits.get_config().qat
  qat_config.switch_step = 100

  def first_update(act_rate):
    qat_config.act_learning_rate = act_rate
    tx = qat_optim.make_qat_optimizer(qat_config, qat_optim.learning_rate_schedule(qat_config, 100))
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates["conv"]

  same, faster = first_update(-1.0), first_update(10 * qat_config.learning_rate)
  np.testing.assert_allclose(faster["kernel"], same["kernel"])
  np.testing.assert_allclose(faster["act_step"], 10 * same["act_step"], rtol=1e-5)
  np.testing.assert_allclose(faster["bias_correction"], 10 * same["bias_correction"], rtol=1e-5)
