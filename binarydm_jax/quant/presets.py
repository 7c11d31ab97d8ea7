"""The `config.quant` section: presets, head/tail placement of the multi-basis binarizer, parsing.

`policy_from_config` turns the config into a `QuantPolicy`: the user's `rules` first (they win),
then the preset's rules:
  1. boundary layers (time_embed_*, conv_in, conv_out): full precision (`fp_boundary_bits=32`, the
     released code) or 8-bit weights and inputs (`fp_boundary_bits=8`, the paper appendix);
  2. head/tail blocks: binary with `head_tail_bases` bases (EBB, k=2 by default);
  3. everything else: binary with `body_bases` bases (k=1).
All binarized layers quantize their input to the preset's activation bits, with the activation
quantizer the section describes (`act_quantizer`, `act_init`, `act_t_groups`, `bias_correction`;
`act_split` for the layers whose input is a concatenation; `temb_act_bits` for the timestep
projections, whose input is a function of t alone).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from binarydm_jax.quant.lsq import ACT_INITS, ACT_QUANTIZERS, FULL_PRECISION_BITS
from binarydm_jax.quant.policy import (
  BINARY,
  DEFAULT_NUM_TIMESTEPS,
  FP,
  INT,
  MAX_BASES,
  LayerQuant,
  QuantPolicy,
  QuantRule,
  check_rule_fields,
  unmatched_rules,
)
from binarydm_jax.quant.table import concatenated_inputs, layer_shapes

# Preset -> (activation bits, multi-basis head/tail?). 'fp' quantizes nothing; 'W32A4' and 'W32A8'
# keep every weight full precision and quantize the same inputs as W1A4/W1A8 (the activations'
# share of the error).
PRESETS = {
  "W1A4": (4, True),
  "W1A8": (8, True),
  "W1A32": (32, True),
  "baseline": (4, False),
  "W32A4": (4, False),
  "W32A8": (8, False),
  "fp": (32, False),
}
FP_WEIGHT_PRESETS = ("W32A4", "W32A8")
BOUNDARY_REGEX = r"(?:.*/)?(?:time_embed_\d+|conv_in|conv_out)"
RULE_FIELDS = (
  "regex",
  "treatment",
  "bases",
  "act_bits",
  "act_quantizer",
  "weight_bits",
  "act_init",
  "act_t_groups",
  "act_split",
  "bias_correction",
)
# The activation-quantizer fields a rule inherits from the section when it does not set them.
ACT_FIELDS = ("act_quantizer", "act_init", "act_t_groups", "bias_correction")
TEMB_REGEX = r"(?:.*/)?temb_proj"
_BLOCK = re.compile(r"(input_blocks|output_blocks)_(\d+)")


def default_quant_config() -> ml_collections.ConfigDict:
  """The `config.quant` section; the defaults reproduce the paper's W1A4 BinaryDM."""
  quant = ml_collections.ConfigDict()
  quant.preset = "W1A4"  # 'W1A4', 'W1A8', 'W1A32', 'baseline' (k=1 everywhere, A4) or 'fp'.
  quant.act_bits = -1  # Input bits of binarized layers: -1 = the preset's; else 2..8 or 32.
  # Activation quantizer of every quantized input (docs/quantization.md): 'signed' LSQ
  # (paper), 'asymmetric' (LSQ+'s offset grid: step and offset) or 'dynamic' (a per-sample step
  # computed on the fly, as the released code in effect does).
  quant.act_quantizer = "signed"
  quant.act_init = "lsq"  # Steps from calibration: 'lsq' (2 mean|x| / sqrt(Q_p)) or 'mse' (search).
  quant.act_t_groups = 1  # One step (and offset) per K equal ranges of the timestep; 1 = one step.
  quant.act_split = False  # One step per part of a concatenated input (the decoder's skip convs).
  quant.bias_correction = False  # Remove the mean output shift that input quantization causes.
  quant.temb_act_bits = -1  # Input bits of the timestep projections: -1 = act_bits; 8; 32 = FP.
  quant.calib_batches = 1  # Batches (at timesteps spread over 0..T-1) that calibrate the steps.
  quant.head_tail_blocks = -1  # EBB in the first/last N blocks; -1 = blocks at >= 1/2 input res.
  quant.head_tail_middle = False  # Also give the middle block EBB (paper Table 9 "Central").
  quant.head_tail_bases = 2  # Binary bases k in the head/tail blocks (EBB stage 1: 2).
  quant.body_bases = 1  # Binary bases k in all other binarized layers.
  quant.fp_boundary_bits = 32  # time_embed, conv_in, conv_out: 32 = FP (code), 8 = W8A8 (paper).
  # Extra rules, tried before the preset's, first match wins. Each is a dict (regex, treatment
  # 'fp'|'binary'|'int', bases, act_bits, act_quantizer, weight_bits) or a tuple in that order.
  # Use tuples if the config is frozen (FrozenConfigDict rejects dicts inside tuples).
  quant.rules = ()
  return quant


def check_act_fields(get, key: str, num_timesteps: int) -> dict[str, Any]:
  """The section's activation-quantizer fields, checked; raises one line naming a bad one."""
  fields = {name: get(name) for name in ACT_FIELDS}
  if fields["act_quantizer"] not in ACT_QUANTIZERS:
    _fail(f"{key}.act_quantizer", fields["act_quantizer"], f"one of {', '.join(ACT_QUANTIZERS)}")
  if fields["act_init"] not in ACT_INITS:
    _fail(f"{key}.act_init", fields["act_init"], f"one of {', '.join(ACT_INITS)}")
  groups = fields["act_t_groups"]
  if not _is_int(groups) or not 1 <= groups <= num_timesteps:
    _fail(f"{key}.act_t_groups", groups, f"an integer in 1..{num_timesteps} (the timesteps)")
  for name in ("bias_correction", "act_split"):
    if not isinstance(get(name), bool):
      _fail(f"{key}.{name}", get(name), "True or False")
  temb_bits = get("temb_act_bits")
  if temb_bits != -1:
    check_rule_fields({"act_bits": temb_bits}, f"{key}.temb_act_bits")
  calib = get("calib_batches")
  if not _is_int(calib) or calib < 1:
    _fail(f"{key}.calib_batches", calib, "an integer >= 1")
  return fields


def _block_order(name: str) -> tuple[int, int]:
  match = _BLOCK.fullmatch(name)
  if match:
    return (0 if match.group(1) == "input_blocks" else 2, int(match.group(2)))
  return (1, 0)  # middle_block


def _block_name(module_name: str) -> str | None:
  if module_name == "conv_in":
    return "input_blocks_0"
  if module_name.startswith("middle_"):
    return "middle_block"
  return module_name if _BLOCK.fullmatch(module_name) else None


def block_resolutions(model: nn.Module, image_shape: Sequence[int]) -> dict[str, tuple[int, int]]:
  """Input and output feature resolution (height) of every timestep block, in network order.

  Read from the shapes seen by the UNet's top-level children under jax.eval_shape: `conv_in` is
  input_blocks_0, `middle_*` form middle_block, `input_blocks_i`/`output_blocks_i` are themselves.

  Args:
    model: the UNet.
    image_shape: (H, W, C) of the input.

  Returns:
    {block name: (input height, output height)}.
  """
  seen: dict[str, tuple[int, int]] = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    path = context.module.path
    name = _block_name(path[0]) if len(path) == 1 else None
    if context.method_name == "__call__" and name is not None:
      first_input = seen[name][0] if name in seen else args[0].shape[1]
      seen[name] = (first_input, out.shape[1])
    return out

  def init(x, t):
    with nn.intercept_methods(record):
      return model.init(jax.random.key(0), x, t)

  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  jax.eval_shape(init, x, jax.ShapeDtypeStruct((1,), jnp.int32))
  return {name: seen[name] for name in sorted(seen, key=_block_order)}


def head_tail_blocks(
  model: nn.Module, image_shape: Sequence[int], count: int = -1
) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """The head (input) and tail (output) blocks that get the multi-basis binarizer.

  Args:
    model: the UNet.
    image_shape: (H, W, C) of the input.
    count: N first input blocks and N last output blocks; -1 = every block whose smallest
      feature map (input or output) is at least half the input resolution (paper §3.2: the first 6
      and last 6 blocks of LDM-4, the 32x32 and 16x16 levels of the CIFAR-10 UNet).

  Returns:
    (head block names, tail block names).
  """
  resolutions = block_resolutions(model, image_shape)
  inputs = [n for n in resolutions if n.startswith("input_blocks_")]
  outputs = [n for n in resolutions if n.startswith("output_blocks_")]
  if count >= 0:
    return tuple(inputs[:count]), tuple(outputs[len(outputs) - count :] if count else ())
  half = image_shape[0] / 2
  keep = [n for n in inputs + outputs if min(resolutions[n]) >= half]
  return (
    tuple(n for n in keep if n in inputs),
    tuple(n for n in keep if n in outputs),
  )


def blocks_regex(names: Sequence[str]) -> str:
  """A regex matching every layer inside the named blocks (with any module prefix)."""
  groups: dict[str, list[str]] = {}
  for name in names:
    match = _BLOCK.fullmatch(name)
    prefix, index = (match.group(1) + "_", match.group(2)) if match else (name, "")
    groups.setdefault(prefix, []).append(re.escape(index))
  alternatives = "|".join(
    re.escape(prefix) + (f"(?:{'|'.join(ix)})" if ix != [""] else "")
    for prefix, ix in groups.items()
  )
  return rf"(?:.*/)?(?:{alternatives})(?:/.*)?"


def _fail(key: str, value: Any, expected: str) -> NoReturn:
  raise ValueError(f"{key}={value!r}: expected {expected}")


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _parse_rule(raw: Any, key: str, preset_bits: int, act_fields: Mapping[str, Any]) -> QuantRule:
  if isinstance(raw, Mapping):
    fields = dict(raw)
  elif isinstance(raw, Sequence) and not isinstance(raw, str):
    if not 1 <= len(raw) <= len(RULE_FIELDS):
      _fail(key, raw, f"a dict or a tuple ({', '.join(RULE_FIELDS)})")
    fields = dict(zip(RULE_FIELDS, raw, strict=False))
  else:
    _fail(key, raw, f"a dict or a tuple ({', '.join(RULE_FIELDS)})")
  if "regex" not in fields:
    raise ValueError(f"{key}.regex: missing; every rule needs a regex")
  check_rule_fields(fields, key)
  treatment = fields.setdefault("treatment", BINARY)
  fields.setdefault("weight_bits", 8)
  default_bits = {FP: FULL_PRECISION_BITS, BINARY: preset_bits, INT: fields["weight_bits"]}
  fields.setdefault("act_bits", default_bits[treatment])
  for name, value in act_fields.items():
    fields.setdefault(name, value)
  return QuantRule(**fields)


def multi_basis_configured(quant_config: ml_collections.ConfigDict) -> bool:
  """Whether `config.quant` gives some binarized layer more than one basis (something for EBB).

  True for a multi-basis preset with head/tail blocks and `head_tail_bases` > 1, `body_bases` > 1,
  or a user rule with `bases` > 1.
  """
  defaults = default_quant_config()
  get = lambda name: quant_config.get(name, defaults[name])  # noqa: E731
  preset = get("preset")
  if preset == "fp":
    return False
  head_tail = PRESETS.get(preset, (0, False))[1] and get("head_tail_blocks") != 0
  rule_bases = [
    raw.get("bases", 1) if isinstance(raw, Mapping) else (raw[2] if len(raw) > 2 else 1)
    for raw in get("rules")
  ]
  return (
    (head_tail and get("head_tail_bases") > 1)
    or get("body_bases") > 1
    or any((b or 1) > 1 for b in rule_bases)
  )


def policy_from_config(
  quant_config: ml_collections.ConfigDict,
  model: nn.Module,
  image_shape: Sequence[int],
  *,
  key: str = "config.quant",
  num_timesteps: int = DEFAULT_NUM_TIMESTEPS,
) -> QuantPolicy:
  """Builds and validates the quantization policy of `model` from the `config.quant` section.

  Args:
    quant_config: the section made by `default_quant_config()` (missing fields take its defaults).
    model: the UNet (its policy, if any, is ignored); used for layer paths and block resolutions.
    image_shape: (H, W, C) of the model input.
    key: config key named in error messages.
    num_timesteps: T of the diffusion (`act_t_groups` divides it).

  Returns:
    QuantPolicy: the user's rules followed by the preset's.

  Raises:
    ValueError: one line naming the key, for a bad field or a user rule that matches no layer.
  """
  defaults = default_quant_config()
  get = lambda name: quant_config.get(name, defaults[name])  # noqa: E731
  preset = get("preset")
  if preset not in PRESETS:
    _fail(f"{key}.preset", preset, f"one of {', '.join(PRESETS)}")
  preset_bits, multi_basis = PRESETS[preset]
  act_bits = get("act_bits")
  if act_bits != -1:
    check_rule_fields({"act_bits": act_bits}, key)
    preset_bits = act_bits if preset != "fp" else FULL_PRECISION_BITS
  act_fields = check_act_fields(get, key, num_timesteps)
  count = get("head_tail_blocks")
  if not _is_int(count) or count < -1:
    _fail(f"{key}.head_tail_blocks", count, "-1 (by resolution) or an integer >= 0")
  middle = get("head_tail_middle")
  if not isinstance(middle, bool):
    _fail(f"{key}.head_tail_middle", middle, "True or False")
  for name in ("head_tail_bases", "body_bases"):
    bases = get(name)
    if not _is_int(bases) or not 1 <= bases <= MAX_BASES:
      _fail(f"{key}.{name}", bases, f"an integer in 1..{MAX_BASES}")
  boundary_bits = get("fp_boundary_bits")
  if boundary_bits not in (8, FULL_PRECISION_BITS) or not _is_int(boundary_bits):
    _fail(f"{key}.fp_boundary_bits", boundary_bits, "8 or 32")
  raw_rules = get("rules")
  if not isinstance(raw_rules, Sequence) or isinstance(raw_rules, str):
    _fail(f"{key}.rules", raw_rules, "a list or tuple of rules")
  user_rules = [
    _parse_rule(raw, f"{key}.rules[{i}]", preset_bits, act_fields)
    for i, raw in enumerate(raw_rules)
  ]

  layers = layer_shapes(model, image_shape)
  paths = [path for path, _ in layers]
  for i in unmatched_rules(QuantPolicy(tuple(user_rules)), paths):
    raise ValueError(f"{key}.rules[{i}].regex={user_rules[i].regex!r}: matches no layer")

  if preset == "fp":
    preset_rules = [QuantRule(".*", treatment=FP, act_bits=FULL_PRECISION_BITS)]
  else:
    weights = FP if preset in FP_WEIGHT_PRESETS else BINARY
    binary = dict(treatment=weights, act_bits=preset_bits, **act_fields)
    if boundary_bits == FULL_PRECISION_BITS:
      boundary = dict(treatment=FP, act_bits=FULL_PRECISION_BITS)
    else:
      boundary = dict(treatment=INT, weight_bits=8, act_bits=8, **act_fields)
    preset_rules = [QuantRule(BOUNDARY_REGEX, **boundary)]
    if multi_basis:
      head, tail = head_tail_blocks(model, image_shape, count)
      # Layer names of the blocks: the stem conv is input_blocks_0, middle_* the middle block.
      modules = ["conv_in" if name == "input_blocks_0" else name for name in (*head, *tail)]
      if middle:
        modules += sorted({p.split("/")[0] for p in paths if p.startswith("middle_")})
      if modules:
        rule = QuantRule(blocks_regex(modules), bases=get("head_tail_bases"), **binary)
        preset_rules.append(rule)
    preset_rules.append(QuantRule(".*", bases=get("body_bases"), **binary))
  policy = QuantPolicy(tuple(user_rules) + tuple(preset_rules), num_timesteps=num_timesteps)
  concatenated = concatenated_inputs(model, image_shape)
  _check_splits(QuantPolicy(tuple(user_rules)), paths, concatenated, key)
  refined = _input_rules(policy, len(user_rules), paths, concatenated, get)
  return QuantPolicy(
    tuple(user_rules) + refined + tuple(preset_rules), layers=layers, num_timesteps=num_timesteps
  )


def _check_splits(
  user: QuantPolicy, paths: Sequence[str], concatenated: set[str], key: str
) -> None:
  """A user rule's `act_split` must only reach layers whose input is a concatenation."""
  for path in paths:
    index = user.matching_rule(path)
    if index is not None and user.rules[index].act_split and path not in concatenated:
      raise ValueError(
        f"{key}.rules[{index}]: act_split on {path}, whose input is not a concatenation "
        f"(split quantization applies to: {', '.join(sorted(concatenated)) or 'no layer'})"
      )


def _exact_rule(path: str, q: LayerQuant, **changes: Any) -> QuantRule:
  """A rule for exactly `path` giving the treatment `q` with `changes`."""
  fields = dataclasses.asdict(q) | changes
  fields["bases"] = max(fields["bases"], 1)
  if q.treatment != INT:
    fields["weight_bits"] = 8
  return QuantRule(re.escape(path), **fields)


def _input_rules(
  policy: QuantPolicy, num_user_rules: int, paths: Sequence[str], concatenated: set[str], get
) -> tuple[QuantRule, ...]:
  """Exact-path rules for the section's `act_split` and `temb_act_bits` (user rules win)."""
  rules = []
  for path in paths:
    index = policy.matching_rule(path)
    q = policy.resolve(path)
    if index is None or index < num_user_rules or not q.quantizes_activations:
      continue
    changes: dict[str, Any] = {}
    if get("act_split") and path in concatenated:
      changes["act_split"] = True
    if get("temb_act_bits") != -1 and re.fullmatch(TEMB_REGEX, path):
      changes["act_bits"] = get("temb_act_bits")
    if changes:
      rules.append(_exact_rule(path, q, **changes))
  return tuple(rules)
