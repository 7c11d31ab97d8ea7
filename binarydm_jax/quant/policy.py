"""Quantization policy: ordered regex rules on module paths that decide each layer's treatment.

A layer's path is its module path joined by '/', e.g. `input_blocks_1/res/conv_1` (the same path as
its entry in the param tree). Rules are tried in order with `re.fullmatch`; the first match wins,
and a layer that no rule matches stays full precision. Treatments:
  - 'fp': full-precision weights;
  - 'binary': weights binarized with `bases` binary bases (k = 1 plain, k >= 2 multi-basis EBB);
  - 'int': weights fake-quantized to `weight_bits` (the 8-bit boundary layers of the paper appendix).
Independently, `act_bits` < 32 quantizes the layer's input (`act_quantizer`: 'signed' LSQ, the
paper's form; 'asymmetric', LSQ+'s offset grid; 'dynamic', a per-sample step computed on the fly, as
the released code behaves), with steps initialised by `act_init` ('lsq' or 'mse'), one step per
timestep group (`act_t_groups`), one per part of a concatenated input (`act_split`), and the
expected quantization error removed from the output (`bias_correction`). docs/quantization.md
("Activation quantizers") says what each costs.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from binarydm_jax.quant.lsq import (
  ACT_BITS_CHOICES,
  ACT_INITS,
  ACT_QUANTIZERS,
  ASYMMETRIC,
  DYNAMIC,
  FULL_PRECISION_BITS,
  LSQ_INIT,
  MSE_INIT,
  SIGNED,
)

FP = "fp"
BINARY = "binary"
INT = "int"
TREATMENTS = (FP, BINARY, INT)
MAX_BASES = 3
WEIGHT_BITS_CHOICES = tuple(range(2, 9))
DEFAULT_NUM_TIMESTEPS = 1000


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def check_rule_fields(fields: Mapping[str, Any], key: str) -> None:
  """Raises a one-line ValueError naming `key.field` for the first invalid rule field.

  Args:
    fields: any subset of the `QuantRule` fields.
    key: prefix of the message, e.g. 'config.quant.rules[2]'.
  """
  checks = {
    "regex": (lambda v: isinstance(v, str) and _compiles(v), "a valid regular expression"),
    "treatment": (lambda v: v in TREATMENTS, f"one of {', '.join(TREATMENTS)}"),
    "bases": (lambda v: _is_int(v) and 1 <= v <= MAX_BASES, f"an integer in 1..{MAX_BASES}"),
    "act_bits": (lambda v: _is_int(v) and v in ACT_BITS_CHOICES, "one of 2..8 or 32"),
    "act_quantizer": (lambda v: v in ACT_QUANTIZERS, f"one of {', '.join(ACT_QUANTIZERS)}"),
    "weight_bits": (lambda v: _is_int(v) and v in WEIGHT_BITS_CHOICES, "one of 2..8"),
    "act_init": (lambda v: v in ACT_INITS, f"one of {', '.join(ACT_INITS)}"),
    "act_t_groups": (lambda v: _is_int(v) and v >= 1, "an integer >= 1 (1 = one step for all t)"),
    "act_split": (lambda v: isinstance(v, bool), "True or False"),
    "bias_correction": (lambda v: isinstance(v, bool), "True or False"),
  }
  for name, value in fields.items():
    if name not in checks:
      raise ValueError(f"{key}.{name}: unknown rule field; expected one of {', '.join(checks)}")
    ok, expected = checks[name]
    if not ok(value):
      raise ValueError(f"{key}.{name}={value!r}: expected {expected}")


def _compiles(pattern: str) -> bool:
  try:
    re.compile(pattern)
  except re.error:
    return False
  return True


@dataclasses.dataclass(frozen=True)
class LayerQuant:
  """The resolved treatment of one layer.

  Attributes:
    treatment: 'fp', 'binary' or 'int'.
    bases: number of binary bases k (binary only).
    weight_bits: weight bits (int only; 32 otherwise).
    act_bits: input activation bits; 32 = not quantized.
    act_quantizer: 'signed' (LSQ), 'asymmetric' (LSQ+) or 'dynamic' (per-sample step).
    act_init: how calibration sets the steps: 'lsq' (2 mean|x| / sqrt(Q_p); LSQ+: min..max) or
      'mse' (searched for the least squared error).
    act_t_groups: K: one step (and offset) per group of K equal ranges of the timestep.
    act_split: one step per part of a concatenated input (the decoder's skip 1x1 convs).
    bias_correction: subtract the output shift that input quantization causes on average (per
      output channel and timestep group, measured at calibration).
  """

  treatment: str = FP
  bases: int = 0
  weight_bits: int = FULL_PRECISION_BITS
  act_bits: int = FULL_PRECISION_BITS
  act_quantizer: str = SIGNED
  act_init: str = LSQ_INIT
  act_t_groups: int = 1
  act_split: bool = False
  bias_correction: bool = False

  @property
  def quantizes_activations(self) -> bool:
    return self.act_bits != FULL_PRECISION_BITS


FULL_PRECISION = LayerQuant()


@dataclasses.dataclass(frozen=True)
class QuantRule:
  """One policy rule: layers whose path fully matches `regex` get this treatment.

  Attributes:
    regex: pattern matched with re.fullmatch against the '/'-joined module path.
    treatment: 'fp', 'binary' or 'int'.
    bases: binary bases k in 1..3 (used by 'binary').
    act_bits: input activation bits, one of 2..8 or 32 (32 = not quantized).
    act_quantizer: 'signed' (the paper's LSQ), 'asymmetric' (LSQ+) or 'dynamic'.
    weight_bits: weight bits in 2..8 (used by 'int').
    act_init, act_t_groups, act_split, bias_correction: as in `LayerQuant`.
  """

  regex: str
  treatment: str = BINARY
  bases: int = 1
  act_bits: int = 4
  act_quantizer: str = SIGNED
  weight_bits: int = 8
  act_init: str = LSQ_INIT
  act_t_groups: int = 1
  act_split: bool = False
  bias_correction: bool = False

  def __post_init__(self):
    check_rule_fields(dataclasses.asdict(self), "QuantRule")

  def matches(self, path: str) -> bool:
    """Whether the '/'-joined layer path fully matches this rule's regex."""
    return re.fullmatch(self.regex, path) is not None

  def layer_quant(self) -> LayerQuant:
    """The treatment this rule gives (fields that do not apply are normalised)."""
    return LayerQuant(
      treatment=self.treatment,
      bases=self.bases if self.treatment == BINARY else 0,
      weight_bits=self.weight_bits if self.treatment == INT else FULL_PRECISION_BITS,
      act_bits=self.act_bits,
      act_quantizer=self.act_quantizer,
      act_init=self.act_init,
      act_t_groups=self.act_t_groups,
      act_split=self.act_split,
      bias_correction=self.bias_correction,
    )


def path_str(path: str | Sequence[str]) -> str:
  """A module path as the '/'-joined string the rules match."""
  return path if isinstance(path, str) else "/".join(str(p) for p in path)


LayerShape = tuple[str, tuple[int, ...]]
LayerRow = tuple[str, tuple[int, ...], LayerQuant]


@dataclasses.dataclass(frozen=True)
class QuantPolicy:
  """Ordered rules; frozen and hashable, so it can be a flax module field.

  Attributes:
    rules: tried in order; the first rule whose regex fully matches a layer path decides it.
    layers: (path, kernel shape) of the model's layers, when known (`policy_from_config` fills
      it); only used by `str(policy)` to print the per-layer table. Not part of equality/hash.
    num_timesteps: T of the diffusion; `act_t_groups` split 0..T-1 into equal ranges.
  """

  rules: tuple[QuantRule, ...] = ()
  layers: tuple[LayerShape, ...] = dataclasses.field(default=(), compare=False)
  num_timesteps: int = DEFAULT_NUM_TIMESTEPS

  def __post_init__(self):
    object.__setattr__(self, "rules", tuple(self.rules))
    object.__setattr__(self, "layers", tuple(self.layers))

  def resolve(self, path: str | Sequence[str]) -> LayerQuant:
    """The treatment of the layer at `path` (full precision when no rule matches)."""
    return _resolve(self, path_str(path))

  def matching_rule(self, path: str | Sequence[str]) -> int | None:
    """Index of the rule deciding `path`, or None when no rule matches."""
    path = path_str(path)
    for i, rule in enumerate(self.rules):
      if rule.matches(path):
        return i
    return None

  def rules_table(self) -> str:
    """A markdown table of the rules, in matching order."""
    lines = ["| # | regex | treatment | bases | weight bits | act bits | act quantizer |"]
    lines.append("|---|---|---|---|---|---|---|")
    # The act quantizer column: 'signed', 'asymmetric' or 'dynamic', then `act_options` tags.
    for i, rule in enumerate(self.rules):
      q = rule.layer_quant()
      regex = rule.regex.replace("|", r"\|")  # A bare pipe would split the markdown cell.
      lines.append(
        f"| {i} | `{regex}` | {q.treatment} | {q.bases or '-'} | "
        f"{q.weight_bits if q.treatment == INT else '-'} | "
        f"{q.act_bits} | {_quantizer_cell(q)} |"
      )
    return "\n".join(lines)

  def __str__(self) -> str:
    """The per-layer table when the layers are known, then the rules."""
    if not self.layers:
      return self.rules_table()
    rows = [(path, shape, self.resolve(path)) for path, shape in self.layers]
    return f"{format_policy_table(rows)}\n\nRules (first match wins):\n\n{self.rules_table()}"


def _quantizer_cell(q: LayerQuant) -> str:
  if not q.quantizes_activations:
    return "-"
  extra = act_options(dataclasses.replace(q, act_quantizer=SIGNED))
  return q.act_quantizer + (f" ({extra})" if extra else "")


def act_options(q: LayerQuant) -> str:
  """The activation quantizer of `q` in short, e.g. 'asym mse t10 split bc' ('' for signed LSQ)."""
  if not q.quantizes_activations:
    return ""
  tags = [{ASYMMETRIC: "asym", DYNAMIC: "dyn"}.get(q.act_quantizer, "")]
  tags.append("mse" if q.act_init == MSE_INIT and q.act_quantizer != DYNAMIC else "")
  tags.append(f"t{q.act_t_groups}" if q.act_t_groups > 1 else "")
  tags.append("split" if q.act_split else "")
  tags.append("bc" if q.bias_correction else "")
  return " ".join(tag for tag in tags if tag)


def _describe(q: LayerQuant) -> tuple[str, str, str]:
  treatment = f"int{q.weight_bits}" if q.treatment == INT else q.treatment
  bases = str(q.bases) if q.treatment == BINARY else "-"
  options = act_options(q)
  return treatment, bases, f"{q.act_bits}{' ' + options if options else ''}"


def format_policy_table(rows: Sequence[LayerRow]) -> str:
  """Markdown table (layer path, kernel shape, treatment, bases, act bits) plus a count line."""
  lines = ["| layer | kernel shape | treatment | bases | act bits |", "|---|---|---|---|---|"]
  counts: collections.Counter[str] = collections.Counter()
  for path, shape, q in rows:
    treatment, bases, act = _describe(q)
    lines.append(f"| {path} | {'x'.join(map(str, shape))} | {treatment} | {bases} | {act} |")
    counts[treatment + (f" k={bases}" if bases != "-" else "") + f" A{act}"] += 1
  summary = ", ".join(f"{n} {label}" for label, n in sorted(counts.items()))
  return "\n".join([*lines, "", f"{len(rows)} layers: {summary}"])


@functools.lru_cache(maxsize=4096)
def _resolve(policy: QuantPolicy, path: str) -> LayerQuant:
  index = policy.matching_rule(path)
  return FULL_PRECISION if index is None else policy.rules[index].layer_quant()


FULL_PRECISION_POLICY = QuantPolicy((QuantRule(".*", treatment=FP, act_bits=FULL_PRECISION_BITS),))


def unwrap_params(params: Mapping[str, Any]) -> Mapping[str, Any]:
  """The inner param dict of `{'params': ...}` (returned as is when not wrapped)."""
  if isinstance(params, Mapping) and set(params) == {"params"}:
    return params["params"]
  return params


def layer_paths(params: Mapping[str, Any]) -> list[tuple[str, ...]]:
  """Paths of every Conv/Dense layer (a dict holding a `kernel`) of a param tree, in tree order.

  Args:
    params: `{'params': ...}` or the inner dict; arrays or jax.ShapeDtypeStruct leaves.
  """
  found: list[tuple[str, ...]] = []

  def walk(tree: Mapping[str, Any], prefix: tuple[str, ...]) -> None:
    if "kernel" in tree and not isinstance(tree["kernel"], Mapping):
      found.append(prefix)
    for name, value in tree.items():
      if isinstance(value, Mapping):
        walk(value, (*prefix, name))

  walk(unwrap_params(params), ())
  return found


def unmatched_rules(policy: QuantPolicy, paths: Iterable[str | Sequence[str]]) -> list[int]:
  """Indices of the rules that match none of `paths`."""
  paths = [path_str(p) for p in paths]
  return [i for i, rule in enumerate(policy.rules) if not any(rule.matches(p) for p in paths)]
