"""The policy applied to a tiny UNet: FP equivalence, binarize(), gradients, 8-device sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from binarydm_jax.models.unet import UNet
from binarydm_jax.quant import (
  FULL_PRECISION_POLICY,
  binarize,
  default_quant_config,
  layer_paths,
  param_labels,
  policy_from_config,
  with_policy,
)

SHAPE = (16, 16, 3)


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


@pytest.fixture(scope="module")
def student_forward_and_grads(setup):
  model, policy, _, student, x, t = setup
  student_model = with_policy(model, policy)

  @jax.jit
  def run(params):
    def loss(p):
      y = student_model.apply({"params": p}, x, t)
      return jnp.mean((y - x) ** 2), y

    return jax.value_and_grad(loss, has_aux=True)(params)

  (loss, y), grads = run(student)
  return loss, y, grads


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
  loss, _, g = jax.device_get(student_forward_and_grads)
  assert np.isfinite(loss) and loss > 0
  labels = _leaves(param_labels(g))
  flat = _leaves(g)
  assert all(np.all(np.isfinite(v)) for v in flat.values())
  for group in ("kernel", "scale_first", "scale_higher", "act_quant"):
    names = [n for n, label in labels.items() if label == group]
    assert names, group
    nonzero = [n for n in names if np.any(flat[n] != 0)]
    assert len(nonzero) == len(names), (group, sorted(set(names) - set(nonzero)))


def test_w1a4_unet_runs_sharded_on_8_devices(setup, student_forward_and_grads):
  model, policy, _, student, x, t = setup
  _, expected, _ = student_forward_and_grads  # Unsharded, one device.
  assert jax.device_count() == 8
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  batch, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  params = jax.device_put({"params": student}, replicated)
  sharded_apply = jax.jit(with_policy(model, policy).apply, out_shardings=batch)
  y = sharded_apply(params, jax.device_put(x, batch), jax.device_put(t, batch))
  assert y.sharding.spec == P("data") and len(y.addressable_shards) == 8
  # The partitioned program rounds differently in the last float bits, which can move an activation
  # across a 4-bit rounding boundary: allow a few such flips, nothing systematic.
  close = np.isclose(y, expected, rtol=1e-4, atol=1e-4)
  assert close.mean() > 0.9, close.mean()
  assert np.mean(np.abs(y - expected)) < 1e-3
