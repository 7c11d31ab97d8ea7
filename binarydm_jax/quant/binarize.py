"""Teacher -> student params: binarization always starts from the pretrained FP model.

`binarize` copies every teacher leaf (kernels, biases, norms), initialises the binary scales from
the teacher kernels (`init_scales`) and the activation steps by one explicit calibration forward
pass on real data (`calibrate`). Nothing is re-initialised later: the steps are then learned.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from binarydm_jax.quant.int8 import FLOAT
from binarydm_jax.quant.layers import CALIB_COLLECTION
from binarydm_jax.quant.params import scale_index
from binarydm_jax.quant.policy import QuantPolicy
from binarydm_jax.quant.weight_binarizer import init_scales

_ACT_LEAVES = ("act_step", "act_offset", "bias_correction")


def with_policy(model: nn.Module, policy: QuantPolicy | None, inference: str = FLOAT) -> nn.Module:
  """A copy of the UNet whose `LayerFactory` builds layers under `policy` (None = plain FP).

  Args:
    model: the UNet (its `layers` factory is replaced; its dtype is kept).
    policy: the quantization policy, or None for the plain FP UNet.
    inference: 'float' (the fake-quant forward, for training and as the reference) or 'int8':
      every single-basis binary layer with quantized inputs runs on int8 operands with int32
      accumulation, all other layers stay float (`quant/int8.py`). Same params in both modes.
  """
  return model.clone(layers=dataclasses.replace(model.layers, policy=policy, inference=inference))


def _transfer(teacher: Mapping[str, Any], shapes: Mapping[str, Any], path: str) -> dict[str, Any]:
  missing = sorted(set(teacher) - set(shapes))
  if missing:
    raise ValueError(f"teacher param {path}{missing[0]} has no counterpart in the student")
  bases = sum(1 for name in shapes if scale_index(name) is not None)
  scales = init_scales(teacher["kernel"], bases) if bases else ()
  out = {}
  for name, shape in shapes.items():
    where = f"{path}{name}"
    if isinstance(shape, Mapping):
      out[name] = _transfer(teacher.get(name, {}), shape, f"{where}/")
    elif name in teacher:
      value = jnp.asarray(teacher[name])
      if value.shape != shape.shape:
        raise ValueError(f"teacher param {where} has shape {value.shape}, student {shape.shape}")
      out[name] = value.astype(shape.dtype)
    elif scale_index(name) is not None:
      out[name] = scales[scale_index(name) - 1].astype(shape.dtype)
    elif name in _ACT_LEAVES:
      out[name] = jnp.full(shape.shape, jnp.nan, shape.dtype)  # Set by the calibration pass.
    else:
      raise ValueError(f"student param {where} has no teacher counterpart")
  return out


def _calibration_stats(
  student: nn.Module, params: Mapping[str, Any], *inputs: jax.Array
) -> Mapping[str, Any]:
  _, state = student.apply({"params": params}, *inputs, mutable=[CALIB_COLLECTION])
  return state.get(CALIB_COLLECTION, {})


def _merge(tree: Mapping[str, Any], calib: Mapping[str, Any], path: str) -> dict[str, Any]:
  out = {}
  for name, value in tree.items():
    if isinstance(value, Mapping):
      out[name] = _merge(value, calib.get(name, {}), f"{path}{name}/")
    elif name in _ACT_LEAVES:
      if name not in calib:
        raise ValueError(f"{path}{name}: the calibration pass never reached this layer")
      out[name] = calib[name].astype(value.dtype)
    else:
      out[name] = value
  return out


def calibrate(student: nn.Module, params: Mapping[str, Any], *inputs: jax.Array) -> dict[str, Any]:
  """One forward pass that sets every `act_step`/`act_offset`/`bias_correction` from the data.

  Layers are calibrated in network order within the pass: each layer's input already went
  through the quantized layers before it (with their freshly calibrated steps).

  Args:
    student: the model with its policy (a UNet, or a single QuantConv/QuantDense).
    params: inner student params (act leaves may hold anything).
    *inputs: the model's inputs, e.g. (x_t, t): noisy real images (NHWC) and their timesteps.

  Returns:
    `params` with the act leaves replaced by the calibrated values.
  """
  stats = jax.jit(functools.partial(_calibration_stats, student))(params, *inputs)
  return _merge(params, stats, "")


def binarize(
  teacher_params: Mapping[str, Any],
  policy: QuantPolicy,
  calibration_batch: tuple[jax.Array, jax.Array],
  *,
  model: nn.Module,
) -> dict[str, Any]:
  """Student params for `policy`, initialised from the FP teacher and calibrated on real data.

  Args:
    teacher_params: the FP UNet's params, either `{'params': inner}` or the inner dict; the
      result has the same form.
    policy: the quantization policy of the student.
    calibration_batch: (x_t, t): noisy real images (NHWC) and their timesteps, e.g. q_sample of a
      training batch at uniformly drawn t.
    model: the UNet architecture (its own policy is replaced by `policy`).

  Returns:
    Student params: teacher kernels/biases/norms copied, `scale_i` from the teacher kernels
    (mean|residual| per output channel), `act_step`/`act_offset` from the calibration pass.
  """
  wrapped = isinstance(teacher_params, Mapping) and set(teacher_params) == {"params"}
  teacher = teacher_params["params"] if wrapped else teacher_params
  student = with_policy(model, policy)
  x, t = calibration_batch
  init = functools.partial(student.init, mutable=["params"])
  shapes = jax.eval_shape(init, jax.random.key(0), x, t)["params"]

  @jax.jit
  def run(teacher, x, t):  # One compiled program: scales from kernels, then calibration.
    params = _transfer(teacher, shapes, "")
    return _merge(params, _calibration_stats(student, params, x, t), "")

  params = run(teacher, x, t)
  return {"params": params} if wrapped else params
