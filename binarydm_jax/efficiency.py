"""Efficiency accounting of a binarized diffusion UNet: params, FP MACs, BOPs, OPs, stored size.

`python -m binarydm_jax.efficiency --config=configs/lsun_bedrooms.py [--json=OUT]` prints the
per-layer table and the totals; `account(config)` returns the same numbers as a JSON-able dict.

Everything is read from the model's own shapes: one `jax.eval_shape` of `model.init` under
`nn.intercept_methods` records every Conv/Dense call (kernel shape, output positions), every
attention block and every other module that owns params (GroupNorm). Each layer's treatment comes
from the quantization policy (`policy.resolve(path)`). Conventions (paper App. B.1 Eq. 16-17,
App. B.2 Eq. 18), per sample (batch 1):

- MACs of a conv or linear = output positions x prod(kernel shape), i.e. positions x C_in x C_out
  x k^2 (dense: tokens x in x out). Their sum over the FP model is what the paper calls FLOPs.
  Attention matmuls (q@k, attn@v: 2 x tokens^2 x C) are reported but not counted unless
  `count_attention=True` (then as FP FLOPs everywhere); the paper's 96.0 G excludes them.
- BOPs of a binarized layer = MACs x b_a x b_w, b_w = 1 per basis (k bases count k times), b_a the
  layer's input bits (32 when not quantized); of an integer layer MACs x b_a x weight bits.
- FLOPs = MACs of the layers that stay full precision. OPs = BOPs / 64 + FLOPs.
- Size: bits stored. Binarized: 1 bit per weight per basis + one float32 scale per output channel
  per basis; integer: weight bits + one float32 scale per output channel; LSQ step (and LSQ+
  offset) float32; FP kernels, biases and norms at `fp_dtype`. MB = 2^20 bytes.

Forms: `fp` (every param float32, every MAC a FLOP), `deployed` (the policy with one basis per
binarized layer: the pure 1-bit model after basis evolution), `high_order` (two bases in every
binarized layer: paper Eq. 18, its 70.2 MB / 12.6 G OPs row) and `stage1` (the student's policy as
trained: EBB stage 1, head/tail with `head_tail_bases`, also the released code's "W1.1" model;
one basis everywhere without EBB).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from binarydm_jax import student
from binarydm_jax.errors import one_line_errors
from binarydm_jax.models.unet import AttnBlock, unet_from_config
from binarydm_jax.quant import LayerQuant, QuantConv, QuantDense, QuantPolicy
from binarydm_jax.quant.lsq import FULL_PRECISION_BITS, SIGNED
from binarydm_jax.quant.policy import BINARY, FP, FULL_PRECISION
from binarydm_jax.runtime.flag_parsing import parse_flags

FORMS = ("fp", "deployed", "high_order", "stage1")
HIGH_ORDER_BASES = 2  # Eq. 18: sigma_I sign(w) + sigma_II sign(residual) in every binarized layer.
BOPS_PER_OP = 64  # OPs = BOPs / 64 + FLOPs (Eq. 17).
FP_DTYPE_BITS = {"float32": 32, "bfloat16": 16, "float16": 16}
SCALE_BITS = 32  # Per-channel binary/integer scales and LSQ steps/offsets are stored as float32.
MB = 2**20
_CONV_TYPES = (nn.Conv, QuantConv)
_DENSE_TYPES = (nn.Dense, QuantDense)


@dataclasses.dataclass(frozen=True)
class Layer:
  """One traced module that costs params or MACs.

  Attributes:
    path: '/'-joined module path (the path of its params; what the policy rules match).
    kind: 'conv', 'dense', 'attention' (q@k and attn@v of an attention block) or the lower-cased
      class name of any other module that owns params (e.g. 'groupnorm').
    kernel_shape: HWIO / (in, out) kernel shape; () for other kinds.
    params: number of params the module owns (kernel + bias, norm scale + bias; 0 for attention).
    positions: output positions per sample summed over calls (tokens for dense and attention).
    macs: multiply-accumulates per sample summed over calls.
  """

  path: str
  kind: str
  kernel_shape: tuple[int, ...]
  params: int
  positions: int
  macs: int

  @property
  def is_linear(self) -> bool:
    """Conv or dense: a layer the policy quantizes."""
    return self.kind in ("conv", "dense")

  @property
  def out_channels(self) -> int:
    return self.kernel_shape[-1] if self.kernel_shape else 0


def _module_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, int]:
  """{module path: number of params it owns directly}, for every module holding array leaves."""
  out: dict[str, int] = {}
  own = sum(math.prod(v.shape) for v in params.values() if not isinstance(v, Mapping))
  if own:
    out[prefix] = own
  for name, value in params.items():
    if isinstance(value, Mapping):
      out.update(_module_params(value, f"{prefix}/{name}" if prefix else name))
  return out


def _kind(module: nn.Module) -> str:
  if isinstance(module, _CONV_TYPES):
    return "conv"
  if isinstance(module, _DENSE_TYPES):
    return "dense"
  return "attention" if isinstance(module, AttnBlock) else type(module).__name__.lower()


def trace_layers(model: nn.Module, inputs: Sequence[jax.ShapeDtypeStruct]) -> list[Layer]:
  """Every module of `model` that owns params or is an attention block, in call order.

  Args:
    model: a full-precision Flax model (the UNet, or any module of Conv/Dense layers).
    inputs: abstract inputs of `model.init` after the rng, batch first (e.g. x and t).

  Returns:
    The layers; their `params` sum to the model's param count.

  Raises:
    ValueError: a module owns params but was never called, so its cost is unknown.
  """
  calls: dict[str, tuple[str, tuple[int, ...], int, int]] = {}  # path -> kind, kernel, pos, macs

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name != "__call__":
      return out
    module = context.module
    path = "/".join(module.path)
    kind = _kind(module)
    kernel, positions, macs = (), 0, 0
    if kind in ("conv", "dense"):
      kernel = tuple(module.variables["params"]["kernel"].shape)
      positions = math.prod(out.shape[1:-1])  # Per sample: the batch axis is excluded.
      macs = positions * math.prod(kernel)
    elif kind == "attention":
      x = args[0]
      positions, channels = math.prod(x.shape[1:-1]), x.shape[-1]
      macs = 2 * positions * positions * channels  # q@k and attn@v, summed over heads.
    _, _, pos0, macs0 = calls.get(path, (kind, kernel, 0, 0))
    calls[path] = (kind, kernel, pos0 + positions, macs0 + macs)
    return out

  def init(*args):
    with nn.intercept_methods(record):
      return model.init(jax.random.key(0), *args)["params"]

  owned = _module_params(jax.eval_shape(init, *inputs))
  never_called = sorted(set(owned) - set(calls))
  if never_called:
    raise ValueError(f"module {never_called[0]} owns params but was never called; cannot cost it")
  return [
    Layer(path, kind, kernel, owned.get(path, 0), positions, macs)
    for path, (kind, kernel, positions, macs) in calls.items()
    if path in owned or kind == "attention"
  ]


def _act_params(q: LayerQuant) -> int:
  if not q.quantizes_activations:
    return 0
  return 1 if q.act_quantizer == SIGNED else 2  # LSQ step; LSQ+ step and offset.


def layer_cost(layer: Layer, q: LayerQuant, fp_bits: int, count_attention: bool) -> dict[str, Any]:
  """The cost of one layer under treatment `q`.

  Args:
    layer: a traced layer.
    q: its treatment (ignored unless the layer is a conv or dense).
    fp_bits: storage bits of full-precision kernels, biases and norms.
    count_attention: count attention matmuls as FP FLOPs.

  Returns:
    {'treatment', 'bases', 'weight_bits', 'act_bits', 'bops', 'flops', 'size_bits'}.
  """
  if not layer.is_linear:
    q = FULL_PRECISION
  flops = layer.macs if layer.kind != "attention" or count_attention else 0
  bops, size_bits = 0, layer.params * fp_bits
  if layer.is_linear and q.treatment != FP:
    # Bits per weight (a basis is one bit) and float32 scales per output channel.
    weight_bits, scales = (q.bases, q.bases) if q.treatment == BINARY else (q.weight_bits, 1)
    kernel = math.prod(layer.kernel_shape)
    bops, flops = layer.macs * q.act_bits * weight_bits, 0
    size_bits = (layer.params - kernel) * fp_bits + kernel * weight_bits
    size_bits += scales * layer.out_channels * SCALE_BITS
  size_bits += _act_params(q) * SCALE_BITS
  return {
    "treatment": q.treatment,
    "bases": q.bases,
    "weight_bits": 1 if q.treatment == BINARY else q.weight_bits,
    "act_bits": q.act_bits,
    "bops": bops,
    "flops": flops,
    "size_bits": size_bits,
  }


def _with_bases(policy: QuantPolicy, bases: int | None) -> Callable[[str], LayerQuant]:
  """Treatment by path: the policy's, with every binarized layer's bases set to `bases`."""

  def resolve(path: str) -> LayerQuant:
    q = policy.resolve(path)
    if bases is None or q.treatment != BINARY:
      return q
    return dataclasses.replace(q, bases=bases)

  return resolve


def _totals(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  bops = sum(r["bops"] for r in rows)
  flops = sum(r["flops"] for r in rows)
  size_bits = sum(r["size_bits"] for r in rows)
  return {
    "bops": bops,
    "flops": flops,
    "ops": bops / BOPS_PER_OP + flops,
    "size_bits": size_bits,
    "size_mb": size_bits / 8 / MB,
  }


def account_model(
  model: nn.Module,
  inputs: Sequence[jax.ShapeDtypeStruct],
  policy: QuantPolicy,
  *,
  fp_dtype: str = "float32",
  count_attention: bool = False,
) -> dict[str, Any]:
  """Params, MACs, BOPs, OPs and sizes of `model` under `policy`, per layer and in total.

  Args:
    model: the full-precision model (no policy of its own: its params are kernels, biases, norms).
    inputs: abstract inputs of `model.init` after the rng, batch 1.
    policy: the quantization policy (paths as in the param tree).
    fp_dtype: storage dtype of what stays full precision in the quantized forms ('float32',
      'bfloat16', 'float16'); the `fp` form is always float32.
    count_attention: count attention matmuls (q@k, attn@v) as FP FLOPs in every form.

  Returns:
    The dict described in docs/export.md ("Efficiency accounting"): `params`, `attention_macs`, one
    entry per form in FORMS (`bops`, `flops`, `ops`, `size_bits`, `size_mb`; `fp` also `macs`),
    `saving` and `layers`.
  """
  if fp_dtype not in FP_DTYPE_BITS:
    raise ValueError(f"fp_dtype={fp_dtype!r}: expected one of {', '.join(FP_DTYPE_BITS)}")
  fp_bits = FP_DTYPE_BITS[fp_dtype]
  forms = {
    "fp": (lambda _: FULL_PRECISION, FULL_PRECISION_BITS),
    "deployed": (_with_bases(policy, 1), fp_bits),
    "high_order": (_with_bases(policy, HIGH_ORDER_BASES), fp_bits),
    "stage1": (_with_bases(policy, None), fp_bits),
  }
  layers = []
  for layer in trace_layers(model, inputs):
    row = {
      "path": layer.path,
      "kind": layer.kind,
      "kernel_shape": list(layer.kernel_shape),
      "positions": layer.positions,
      "params": layer.params,
      "macs": layer.macs,
    }
    for name, (resolve, bits) in forms.items():
      row[name] = layer_cost(layer, resolve(layer.path), bits, count_attention)
    layers.append(row)
  result: dict[str, Any] = {
    "params": sum(r["params"] for r in layers),
    "attention_macs": sum(r["macs"] for r in layers if r["kind"] == "attention"),
    "count_attention": count_attention,
    "fp_dtype": fp_dtype,
  }
  for name in FORMS:
    result[name] = _totals([r[name] for r in layers])
  result["fp"]["macs"] = result["fp"]["flops"]
  fp, deployed, high = result["fp"], result["deployed"], result["high_order"]
  result["saving"] = {
    "size": fp["size_bits"] / deployed["size_bits"],
    "ops": fp["ops"] / deployed["ops"],
    "size_vs_high_order": high["size_bits"] / deployed["size_bits"],
    "ops_vs_high_order": high["ops"] / deployed["ops"],
  }
  result["layers"] = layers
  return result


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(H, W, C) of the model input from `config.data.image_size` and `config.model.channels`."""
  size = config.data.image_size
  return (size, size, config.model.channels)


def account(
  config: ml_collections.ConfigDict, *, fp_dtype: str = "float32", count_attention: bool = False
) -> dict[str, Any]:
  """`account_model` for the UNet and the quantization policy of a job config's student.

  The policy is the one the student stage trains (`student.student_policy` with the settings
  resolved from `config.qat` and `config.quant`): a run without EBB (e.g. qat.method='baseline')
  has one basis in every binarized layer, so its `stage1` form equals `deployed`. Reads only
  `config.model`, `config.quant`, `config.qat` and `config.data.image_size`.

  Args:
    config: a job config (configs/*.py).
    fp_dtype: storage dtype of the full-precision parts of the quantized forms.
    count_attention: count attention matmuls as FP FLOPs.

  Returns:
    The `account_model` dict plus `config`: image shape, quant preset and activation bits.
  """
  shape = image_shape(config)
  model = unet_from_config(config.model)
  settings = student.resolve_settings(config.qat, config.quant)
  policy = student.student_policy(config, settings, model, shape)
  inputs = (
    jax.ShapeDtypeStruct((1, *shape), jnp.float32),
    jax.ShapeDtypeStruct((1,), jnp.int32),
  )
  result = account_model(model, inputs, policy, fp_dtype=fp_dtype, count_attention=count_attention)
  result["config"] = {"image_shape": list(shape), "quant_preset": config.quant.preset}
  return result


def _dump(result: Mapping[str, Any], path: str | os.PathLike) -> None:
  epath.Path(path).write_text(json.dumps(result, indent=1))


def write_json(
  config: ml_collections.ConfigDict, path: str | os.PathLike, **kwargs: Any
) -> dict[str, Any]:
  """Writes `account(config, **kwargs)` to `path` as JSON and returns it."""
  result = account(config, **kwargs)
  _dump(result, path)
  return result


def treatment_label(cost: Mapping[str, Any]) -> str:
  """'FP', 'W1A4', 'W1x2A4' (two bases), 'W8A8' or 'W32A8' for one layer's cost entry."""
  act = cost["act_bits"]
  if cost["treatment"] == BINARY:
    weights = "W1" if cost["bases"] == 1 else f"W1x{cost['bases']}"
  elif act == FULL_PRECISION_BITS:
    return "FP"
  else:
    weights = f"W{cost['weight_bits']}"
  return f"{weights}A{act}"


def _shape(shape: Sequence[int]) -> str:
  return "x".join(map(str, shape)) or "-"


def _form_label(row: Mapping[str, Any], form: str, count_attention: bool) -> str:
  if row["kind"] == "attention" and not count_attention:
    return "not counted"
  return treatment_label(row[form])


def format_report(result: Mapping[str, Any]) -> str:
  """Markdown: the per-layer table, then the totals per form and the savings."""
  counted = result["count_attention"]
  lines = [
    "| layer | kind | kernel | positions | params | MACs (M) | deployed | BOPs (M) | FLOPs (M) "
    "| size (KB) | high-order | size (KB) |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for row in result["layers"]:
    deployed, high = row["deployed"], row["high_order"]
    lines.append(
      f"| {row['path']} | {row['kind']} | {_shape(row['kernel_shape'])} | {row['positions']} "
      f"| {row['params']:,} | {row['macs'] / 1e6:.2f} | {_form_label(row, 'deployed', counted)} "
      f"| {deployed['bops'] / 1e6:.1f} | {deployed['flops'] / 1e6:.2f} "
      f"| {deployed['size_bits'] / 8 / 2**10:.1f} | {_form_label(row, 'high_order', counted)} "
      f"| {high['size_bits'] / 8 / 2**10:.1f} |"
    )
  lines += [
    "",
    "| form | FP FLOPs (G) | BOPs (G) | OPs (G) | size (MB) |",
    "|---|---|---|---|---|",
  ]
  names = {
    "fp": "FP32",
    "deployed": "deployed (1 basis)",
    "high_order": f"high-order ({HIGH_ORDER_BASES} bases)",
    "stage1": "stage 1 (as configured)",
  }
  for form in FORMS:
    t = result[form]
    lines.append(
      f"| {names[form]} | {t['flops'] / 1e9:.3f} | {t['bops'] / 1e9:.3f} | {t['ops'] / 1e9:.3f} "
      f"| {t['size_mb']:.2f} |"
    )
  saving = result["saving"]
  attention = "counted as FP FLOPs" if counted else "not counted"
  lines += [
    "",
    f"params: {result['params']:,}; FP parts stored as {result['fp_dtype']}; attention matmuls "
    f"(q@k, attn@v): {result['attention_macs'] / 1e9:.3f} G MACs, {attention}.",
    f"saving (FP / deployed): size {saving['size']:.1f}x, OPs {saving['ops']:.1f}x; "
    f"high-order / deployed: size {saving['size_vs_high_order']:.2f}x, "
    f"OPs {saving['ops_vs_high_order']:.2f}x.",
  ]
  return "\n".join(lines)


def _define_flags() -> None:
  """The CLI flags; defined only when run as a script, so importing this module defines none."""
  config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py[:arg]).", lock_config=True
  )
  flags.DEFINE_string("json", None, "Also write the result to this JSON file.")
  flags.DEFINE_enum(
    "fp_dtype", "float32", list(FP_DTYPE_BITS), "Storage dtype of the quantized forms' FP parts."
  )
  flags.DEFINE_bool("count_attention", False, "Count attention matmuls as FP FLOPs.")
  flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
  """Prints the report of `--config` and writes `--json`."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = flags.FLAGS.config
  with one_line_errors():
    result = account(
      config, fp_dtype=flags.FLAGS.fp_dtype, count_attention=flags.FLAGS.count_attention
    )
  print(format_report(result))
  if flags.FLAGS.json:
    _dump(result, flags.FLAGS.json)
    print(f"\nwrote {flags.FLAGS.json}")


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=parse_flags)
