"""The int8 inference path: equal to the fake-quant forward per layer and on whole UNets, in int8.

Per layer the two paths see identical LSQ codes, so they agree to float rounding. On a whole UNet
such a rounding difference can move a later activation across a 4-bit rounding boundary; with
dyadic params (power-of-two steps and scales, offsets on the step grid) every float sum of the
fake-quant path is exact, so the int8 UNet must then equal it bit for bit.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from binarydm_jax import quant
from binarydm_jax.models.unet import unet_from_config
from binarydm_jax.quant import QuantConv, QuantDense, QuantPolicy, QuantRule
from binarydm_jax.quant.int8 import input_codes
from configs import cifar, digits

LAYERS = {
  "conv3x3_same": lambda **kw: QuantConv(6, (3, 3), padding="SAME", **kw),
  # The UNet's downsampling conv: stride 2, one row/column of padding at the bottom/right.
  "conv3x3_stride2": lambda **kw: QuantConv(6, (3, 3), (2, 2), ((0, 1), (0, 1)), **kw),
  "conv1x1": lambda **kw: QuantConv(6, (1, 1), padding=((0, 0), (0, 0)), **kw),
  "dense": lambda **kw: QuantDense(6, **kw),
}
C_IN = 13  # Not a multiple of 8.


def _policy(**kwargs):
  return QuantPolicy((QuantRule(".*", **kwargs),))


def _layer_input(name):
  shape = (2, 5, C_IN) if name == "dense" else (2, 8, 8, C_IN)
  return nn.swish(2.0 * jax.random.normal(jax.random.key(3), shape))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("act_quantizer", ["signed", "asymmetric"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_int8_layer_equals_fake_quant(name, act_quantizer, bits):
  policy = _policy(bases=1, act_bits=bits, act_quantizer=act_quantizer)
  fake, int8 = (LAYERS[name](policy=policy, inference=mode) for mode in ("float", "int8"))
  x = _layer_input(name)
  params = fake.init(jax.random.key(0), x)["params"]  # Steps (and offset) calibrated on x.
  params = dict(params, bias=jnp.linspace(-1.0, 1.0, 6))
  if act_quantizer == "asymmetric":
    assert params["act_offset"] < -0.1  # min(swish): the border term below is not trivial.
  expected = fake.apply({"params": params}, x)
  got = int8.apply({"params": params}, x)
  scale = float(jnp.max(jnp.abs(expected)))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * scale)
  converted = quant.int8_params({"params": params}, policy)
  assert converted["params"]["kernel"].dtype == jnp.int8
  np.testing.assert_array_equal(int8.apply(converted, x), got)
  # The float mode reads converted params too (sign(+-1) = +-1), with the same result.
  np.testing.assert_array_equal(fake.apply(converted, x), expected)


def _popcount_dot(codes, signs, bits):
  """sum_i codes[n, i] * signs[i, o] from bit planes: AND and popcount on 32-bit words."""
  words = -(-codes.shape[-1] // 32)

  def pack(b):  # (..., K) of 0/1 -> (..., words) uint32.
    pad = [(0, 0)] * (b.ndim - 1) + [(0, 32 * words - b.shape[-1])]
    b = jnp.pad(b.astype(jnp.uint32), pad).reshape(*b.shape[:-1], words, 32)
    return jnp.sum(b << jnp.arange(32, dtype=jnp.uint32), axis=-1)

  unsigned = codes.astype(jnp.int32) & (2**bits - 1)  # Two's complement, b bits.
  positive = pack((signs > 0).T)  # (out, words)
  total = 0
  for j in range(bits):
    plane = pack((unsigned >> j) & 1)  # (n, words)
    both = jax.lax.population_count(plane[:, None, :] & positive[None]).sum(-1)
    ones = jax.lax.population_count(plane).sum(-1)[:, None]
    weight = -(2 ** (bits - 1)) if j == bits - 1 else 2**j
    total = total + weight * (2 * both.astype(jnp.int32) - ones.astype(jnp.int32))
  return total


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_int32_accumulation_equals_xnor_popcount(bits):
  rng = np.random.default_rng(bits)
  grid = np.arange(-(2 ** (bits - 1)) - 2, 2 ** (bits - 1) + 2)  # Past both ends: clipped.
  x = 0.4 * rng.permutation(np.resize(grid, 350)) + rng.uniform(-0.1, 0.1, 350)
  codes, _, _ = input_codes(
    jnp.asarray(x.reshape(5, 70), jnp.float32), jnp.float32(0.4), None, bits
  )
  signs = quant.sign(jax.random.normal(jax.random.key(1), (70, 9))).astype(jnp.int8)
  assert len(np.unique(codes)) == 2**bits  # Every code of the grid occurs.
  acc = jax.lax.dot_general(
    codes, signs, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32
  )
  np.testing.assert_array_equal(_popcount_dot(codes, signs, bits), acc)


def _student_params(student, x, t, dyadic):
  """Random student params; `dyadic`: steps and scales powers of two, offsets on the step grid."""
  shapes = jax.eval_shape(student.init, jax.random.key(0), x, t)["params"]
  rng = np.random.default_rng(0)

  def fill(path, shape):
    name = path[-1].key
    if name == "kernel":
      return rng.normal(0, 1 / np.sqrt(np.prod(shape.shape[:-1])), shape.shape)
    if name == "act_step":
      return np.asarray(0.25 if dyadic else 0.25 * (1 + 0.2 * rng.uniform()))
    if name == "act_offset":
      return np.asarray(-0.25 if dyadic else -0.3 * rng.uniform())
    return (1.0 if name == "scale" else 0.0) + 0.1 * rng.normal(size=shape.shape)

  params = jax.tree.map_with_path(fill, shapes)
  for path in quant.layer_paths(params):
    layer = params
    for part in path:
      layer = layer[part]
    if "scale_1" in layer:  # The binarizer's init, mean|W| per output channel.
      kernel = layer["kernel"]
      scale = np.mean(np.abs(kernel), axis=tuple(range(kernel.ndim - 1)))
      layer["scale_1"] = 2.0 ** np.round(np.log2(scale)) if dyadic else scale
  return {"params": jax.tree.map(lambda v, s: jnp.asarray(v, s.dtype), params, shapes)}


def _compile(model, params, x, t):
  """`model.apply` compiled for these arguments, with cheaper LLVM passes (seconds for CIFAR-10)."""
  options = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
  return jax.jit(model.apply).lower(params, x, t).compile(compiler_options=options)


def _int_ops(jaxpr):
  """The conv/dot_general equations with int8 operands and int32 results, sub-jaxprs included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
      dtypes = [v.aval.dtype for v in eqn.invars]
      if dtypes == [jnp.int8, jnp.int8] and eqn.outvars[0].aval.dtype == jnp.int32:
        found.append(eqn)
    for value in eqn.params.values():
      for sub in value if isinstance(value, tuple | list) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          found += _int_ops(inner)
  return found


def _compiled_ops(hlo, dtype, op):
  return re.findall(rf"= {dtype}\[[\d,]*\]\{{[\d,]*\}} {op}\(", hlo)


class UNetCase:
  """A UNet config's model under the single-basis W1A4 policy, its float and int8 forms, a batch."""

  def __init__(self, get_config, batch, act_quantizer="signed"):
    config = get_config()
    self.model = unet_from_config(config.model)
    image_shape = (config.data.image_size,) * 2 + (config.model.channels,)
    qc = quant.default_quant_config()
    qc.head_tail_bases = 1
    qc.act_quantizer = act_quantizer
    self.policy = quant.policy_from_config(qc, self.model, image_shape)
    self.fake = quant.with_policy(self.model, self.policy)
    self.int8 = quant.with_policy(self.model, self.policy, inference="int8")
    self.x = jax.random.normal(jax.random.key(1), (batch, *image_shape))
    self.t = jnp.arange(batch, dtype=jnp.int32) * 397 + 5

  def params(self, dyadic):
    return _student_params(self.fake, self.x, self.t, dyadic)

  def int8_layers(self, params):
    return [p for p in quant.layer_paths(params) if quant.runs_int8(self.policy.resolve(p))]

  def outputs(self, params):
    """(fake-quant output, int8 output on int8-converted params, the int8 compiled program)."""
    converted = quant.int8_params(params, self.policy)
    compiled = _compile(self.int8, converted, self.x, self.t)
    expected = _compile(self.fake, params, self.x, self.t)(params, self.x, self.t)
    return expected, compiled(converted, self.x, self.t), compiled


@pytest.mark.parametrize(
  "act_quantizer", ["signed", pytest.param("asymmetric", marks=pytest.mark.slow)]
)
def test_digits_unet_int8_equals_fake_quant_exactly_with_dyadic_params(act_quantizer):
  case = UNetCase(digits.get_config, 2, act_quantizer)
  params = case.params(dyadic=True)
  # W1A4 single basis: every layer but the four FP boundary layers runs in int8.
  assert len(case.int8_layers(params)) == len(quant.layer_paths(params)) - 4
  expected, got, _ = case.outputs(params)
  assert float(jnp.std(expected)) > 0.1
  np.testing.assert_array_equal(got, expected)


def test_digits_unet_int8_equals_fake_quant_within_float_tolerance():
  case = UNetCase(digits.get_config, 2)
  expected, got, _ = case.outputs(case.params(dyadic=False))
  np.testing.assert_allclose(
    got, expected, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(expected)))
  )
  assert not np.array_equal(got, expected)  # Different arithmetic: not the same program.


def test_int8_unet_computes_in_int8_with_int32_accumulation():
  case = UNetCase(digits.get_config, 1)
  params = quant.int8_params(case.params(dyadic=True), case.policy)
  int_ops = _int_ops(jax.make_jaxpr(case.int8.apply)(params, case.x, case.t).jaxpr)
  assert len(int_ops) == len(case.int8_layers(params)) > 40
  assert {e.primitive.name for e in int_ops} == {"conv_general_dilated", "dot_general"}
  assert _int_ops(jax.make_jaxpr(case.fake.apply)(params, case.x, case.t).jaxpr) == []


@pytest.mark.slow  # 16 s; the digits UNet checks the same in the default suite.
def test_cifar_unet_int8_equals_fake_quant_exactly_and_compiles_to_integer_ops():
  case = UNetCase(cifar.get_config, 1)
  params = case.params(dyadic=True)
  assert len(case.int8_layers(params)) == 109  # All but the 4 FP layers of 113.
  expected, got, compiled = case.outputs(params)
  assert float(jnp.std(expected)) > 0.1
  np.testing.assert_array_equal(got, expected)
  # XLA keeps the integer ops: s32 convolutions and dots; float convolutions only for the FP
  # conv_in and conv_out.
  hlo = compiled.as_text()
  assert _compiled_ops(hlo, "s32", "convolution") and _compiled_ops(hlo, "s32", "dot")
  assert len(_compiled_ops(hlo, "f32", "convolution")) <= 2


def test_inference_mode_errors():
  case = UNetCase(digits.get_config, 1)
  with pytest.raises(ValueError, match="inference='int4': expected one of 'float', 'int8'"):
    quant.with_policy(case.model, case.policy, inference="int4")
  with pytest.raises(ValueError, match="needs a quantization policy"):
    quant.with_policy(case.model, None, inference="int8")
