"""The policy applied to a tiny UNet: FP equivalence, binarize(), gradients, 8-device sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from binarydm_jax.models.unet import UNet
from binarydm_jax.quant import (
  FULL_PRECISION_POLICY,
  binarize,
  default_quant_config,
  layer_paths,
  layers,
  lsq,
  param_labels,
  policy_from_config,
  with_policy,
)

SHAPE = (16, 16, 3)
RECORD = "quantized_inputs"  # Collection of the recorded layer inputs.
# A code may flip between two programs only where its pre-rounding value x/step lies this close
# (in steps) to a rounding boundary n + 0.5: float reassociation moves x/step by ~1e-6 steps.
BOUNDARY_TOLERANCE = 1e-3


def _teacher_params(model, x, t):
  """A stand-in for a trained teacher (no zero-initialised kernels), made without compiling."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), x, t)["params"]
  rng = np.random.default_rng(0)

  def make(path, shape):
    name = path[-1].key
    if name == "kernel":
      fan_in = int(np.prod(shape.shape[:-1]))
      return rng.normal(0, 1 / np.sqrt(fan_in), shape.shape).astype(np.float32)
    base = 1.0 if name == "scale" else 0.0
    return (base + 0.1 * rng.normal(size=shape.shape)).astype(np.float32)

  return jax.tree.map_with_path(make, shapes)


@pytest.fixture(scope="module")
def setup():
  model = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), norm_groups=8)
  x = jax.random.normal(jax.random.key(1), (8, *SHAPE))
  t = jnp.arange(8) * 120
  teacher = _teacher_params(model, x, t)
  policy = policy_from_config(default_quant_config(), model, SHAPE)
  student_params = binarize({"params": teacher}, policy, (x, t), model=model)
  return model, policy, teacher, student_params["params"], x, t


def _recording_quantize_input(calls):
  """`layers.quantize_input` that also sows each quantized input `x` and the `x_q` the layer uses.

  At trace time it fills `calls` ({layer path: LayerQuant}) in call order.
  """
  quantize = layers.quantize_input

  def record(module, x, spec, input_split=None):
    x_q = quantize(module, x, spec, input_split)
    if spec.quantizes_activations:
      module.sow(RECORD, "x", x)
      module.sow(RECORD, "x_q", x_q)
      calls["/".join(module.path)] = spec
    return x_q

  return record


def _recording_apply(model):
  """`model.apply` returning (output, {layer path: {'x': input, 'x_q': quantized input}})."""

  def apply(variables, x, t):
    y, state = model.apply(variables, x, t, mutable=[RECORD])
    recorded = {}
    for (*path, name), (value,) in traverse_util.flatten_dict(state[RECORD]).items():
      recorded.setdefault("/".join(path), {})[name] = value
    return y, recorded

  return apply


@pytest.fixture(scope="module")
def student_forward_and_grads(setup):
  """Unsharded (one device) loss, output, grads, recorded quantized inputs and their layers' specs.

  The specs are {layer path: LayerQuant} in call order (keep it away from jax.tree, which sorts).
  """
  model, policy, _, student, x, t = setup
  calls = {}
  apply = _recording_apply(with_policy(model, policy))

  @jax.jit
  def run(params):
    def loss(p):
      y, recorded = apply({"params": p}, x, t)
      return jnp.mean((y - x) ** 2), (y, recorded)

    return jax.value_and_grad(loss, has_aux=True)(params)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(layers, "quantize_input", _recording_quantize_input(calls))
    (loss, (y, recorded)), grads = run(student)
  return loss, y, grads, recorded, calls


def _leaves(tree):
  return {"/".join(k.key for k in path): v for path, v in jax.tree.leaves_with_path(tree)}


def test_all_fp_policy_reproduces_the_fp_unet_exactly(setup):
  model, _, teacher, _, x, t = setup
  fp_model = with_policy(model, FULL_PRECISION_POLICY)
  fp_shapes = jax.eval_shape(fp_model.init, jax.random.key(0), x, t)["params"]
  assert jax.tree.map(jnp.shape, fp_shapes) == jax.tree.map(jnp.shape, teacher)
  y = jax.jit(model.apply)({"params": teacher}, x, t)
  y_fp = jax.jit(fp_model.apply)({"params": teacher}, x, t)
  np.testing.assert_array_equal(y_fp, y)


def _np_scales(kernel, bases):
  residual, scales = np.asarray(kernel, np.float64), []
  for _ in range(bases):
    scales.append(np.abs(residual).reshape(-1, residual.shape[-1]).mean(0))
    residual = residual - scales[-1] * np.where(residual >= 0, 1.0, -1.0)
  return scales


def test_binarize_copies_teacher_and_inits_scales_and_steps(setup):
  _, policy, teacher, student, _, _ = setup
  student = jax.device_get(student)
  flat_teacher, flat_student = _leaves(teacher), _leaves(student)
  for name, value in flat_teacher.items():
    np.testing.assert_array_equal(flat_student[name], value)  # kernel, bias, norm: copied.
  extra = set(flat_student) - set(flat_teacher)
  assert extra and all(n.rsplit("/", 1)[1] in ("scale_1", "scale_2", "act_step") for n in extra)
  for path in layer_paths(student):
    layer, q = student, policy.resolve(path)
    for part in path:
      layer = layer[part]
    scales = [layer[k] for k in sorted(layer) if k.startswith("scale_")]
    assert len(scales) == q.bases
    for got, want in zip(scales, _np_scales(layer["kernel"], q.bases), strict=True):
      np.testing.assert_allclose(got, want, rtol=1e-5)
    assert ("act_step" in layer) == q.quantizes_activations
    if "act_step" in layer:
      assert np.isfinite(layer["act_step"]) and layer["act_step"] > 0
  # conv_in/conv_out/time_embed stay FP: nothing added.
  assert set(student["conv_in"]) == {"kernel", "bias"}
  assert set(student["input_blocks_1"]["res"]["conv_1"]) == {
    "kernel",
    "bias",
    "scale_1",
    "scale_2",
    "act_step",
  }
  assert "scale_2" not in student["middle_res_0"]["conv_1"]


def test_gradients_reach_kernels_scales_and_steps(student_forward_and_grads):
  loss, _, g, _, _ = student_forward_and_grads
  loss, g = jax.device_get((loss, g))
  assert np.isfinite(loss) and loss > 0
  labels = _leaves(param_labels(g))
  flat = _leaves(g)
  assert all(np.all(np.isfinite(v)) for v in flat.values())
  for group in ("kernel", "scale_first", "scale_higher", "act_quant"):
    names = [n for n, label in labels.items() if label == group]
    assert names, group
    nonzero = [n for n in names if np.any(flat[n] != 0)]
    assert len(nonzero) == len(names), (group, sorted(set(names) - set(nonzero)))


def _input_grid(layer_params, spec):
  """(offset, step, Q_n, Q_p): the layer's codes are round(clip((x - offset) / step, Q_n, Q_p)).

  Only the signed LSQ grid (offset 0) that the default policy uses; an LSQ+ ('asymmetric') layer
  would give (act_offset, act_step, *lsq.unsigned_range(bits)).
  """
  assert spec.act_quantizer == lsq.SIGNED, f"add the {spec.act_quantizer} grid to _input_grid"
  return 0.0, np.float64(layer_params["act_step"]), *lsq.signed_range(spec.act_bits)


def _codes(runs, params, calls):
  """{layer path: (codes of each run, pre-rounding values of the first run)} in call order.

  `runs` are recorded quantized inputs ({layer path: {'x', 'x_q'}}) of the same batch.
  """
  out = {}
  for path, spec in calls.items():
    layer_params = params
    for name in path.split("/"):
      layer_params = layer_params[name]
    offset, step, q_n, q_p = _input_grid(layer_params, spec)
    # x_q = code * step (to the last bit of the step), so the division recovers the exact code.
    codes = [np.round((np.float64(run[path]["x_q"]) - offset) / step) for run in runs]
    pre_rounding = np.clip((np.float64(runs[0][path]["x"]) - offset) / step, q_n, q_p)
    out[path] = codes, pre_rounding
  return out


def test_w1a4_unet_runs_sharded_on_8_devices(setup, student_forward_and_grads):
  model, policy, _, student, x, t = setup
  _, expected, _, recorded, calls = student_forward_and_grads  # One device.
  assert jax.device_count() == 8
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  batch, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  params = jax.device_put({"params": student}, replicated)
  sharded_calls = {}
  sharded_apply = jax.jit(_recording_apply(with_policy(model, policy)), out_shardings=batch)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(layers, "quantize_input", _recording_quantize_input(sharded_calls))
    y, sharded = sharded_apply(params, jax.device_put(x, batch), jax.device_put(t, batch))
  assert y.sharding.spec == P("data") and len(y.addressable_shards) == 8
  assert list(sharded_calls) == list(calls) and len(calls) > 20
  # The partitioned program rounds differently in the last float bits. That may move a
  # pre-rounding value x/step across a 4-bit rounding boundary n + 0.5 (the clip edges are no
  # boundaries: clip-then-round gives Q_n or Q_p on both sides), and nothing else. A UNet mixes no
  # examples, so up to an example's first layer (in call order) with a flipped code, its inputs
  # agree up to float noise: those flips must sit on a boundary. Its later layers diverge.
  y, expected, *runs, student = jax.device_get((y, expected, recorded, sharded, student))
  codes = _codes(runs, student, calls)
  flipped_examples = np.zeros(len(x), bool)
  for path, ((unsharded_codes, sharded_codes), pre_rounding) in codes.items():
    flipped = unsharded_codes != sharded_codes
    first = flipped & ~flipped_examples.reshape(-1, *[1] * (flipped.ndim - 1))
    distance = np.abs(pre_rounding[first] - np.floor(pre_rounding[first]) - 0.5)
    off_boundary = distance >= BOUNDARY_TOLERANCE
    assert not off_boundary.any(), (path, "flipped x/step", pre_rounding[first][off_boundary])
    np.testing.assert_array_equal(np.abs(unsharded_codes - sharded_codes)[first], 1)
    flipped_examples |= flipped.reshape(len(x), -1).any(axis=1)
  # The examples whose codes all agree must agree tightly.
  np.testing.assert_allclose(
    y[~flipped_examples], expected[~flipped_examples], rtol=1e-5, atol=1e-5
  )
