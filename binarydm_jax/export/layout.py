"""Where each param of a single-basis student is stored in an export, and how it is encoded.

An export holds four flat arrays ("blobs"), so that the checkpoint's per-array overhead does not
dominate a small model:
  * `signs` (uint32): the packed sign bits of every binarized kernel (`packing.pack_signs`);
  * `int8` (int8): the weight codes of the layers with int weights (`fp_boundary_bits=8`);
  * `quant` (the export's quant_dtype): binary scales (`scale_1`), activation steps/offsets, int
    weight steps;
  * `fp` (the export's fp_dtype): everything else (FP layers, biases, GroupNorm scales/biases).
Params are visited in the order of `jax.tree.flatten_with_path` of the student's param tree, which
the loader rebuilds from the manifest alone (architecture + per-layer policy); each param takes
the next elements of its blob(s). Only blobs that hold something are written.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from binarydm_jax.models.unet import unet_from_config
from binarydm_jax.quant import with_policy
from binarydm_jax.quant.int8 import check_inference
from binarydm_jax.quant.params import scale_index
from binarydm_jax.quant.policy import (
  BINARY,
  DEFAULT_NUM_TIMESTEPS,
  INT,
  LayerRow,
  QuantPolicy,
  QuantRule,
)
from binarydm_jax.quant.weight_binarizer import int_weight_scale

from .packing import num_words, pack_signs, unpack_signs

SIGNS, INT8, QUANT, FP = "signs", "int8", "quant", "fp"
_ACT_LEAVES = ("act_step", "act_offset", "bias_correction")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One param of the student and its encoding (`kind` is the blob of its main payload)."""

  path: tuple[str, ...]
  shape: tuple[int, ...]
  kind: str
  weight_bits: int = 32  # INT8 kernels only.


POLICY_COLUMNS = (
  "layer",
  "kernel_shape",
  "treatment",
  "bases",
  "weight_bits",
  "act_bits",
  "act_quantizer",
  "act_t_groups",
  "act_split",
  "bias_correction",
)
# Columns a manifest written before they existed lacks, with the value they then had.
POLICY_DEFAULTS = {"act_t_groups": 1, "act_split": False, "bias_correction": False}


def policy_rows(rows: Sequence[LayerRow]) -> list[dict[str, Any]]:
  """The per-layer policy (`POLICY_COLUMNS`); binarized layers are written with one basis."""
  return [
    {
      "layer": path,
      "kernel_shape": list(shape),
      "treatment": q.treatment,
      "bases": 1 if q.treatment == BINARY else 0,
      "weight_bits": q.weight_bits,
      "act_bits": q.act_bits,
      "act_quantizer": q.act_quantizer,
      "act_t_groups": q.act_t_groups,
      "act_split": q.act_split,
      "bias_correction": q.bias_correction,
    }
    for path, shape, q in rows
  ]


def policy_table(rows: Sequence[Mapping[str, Any]], kernel_bytes: Mapping[str, int]) -> dict:
  """The manifest's `policy`: {'columns': [...], 'rows': [[...] per layer]}, plus stored bytes."""
  columns = [*POLICY_COLUMNS, "bytes"]
  return {
    "columns": columns,
    "rows": [[row[c] for c in POLICY_COLUMNS] + [kernel_bytes[row["layer"]]] for row in rows],
  }


def rows_from_table(table: Mapping[str, Any]) -> list[dict[str, Any]]:
  """The per-layer policy dicts of the manifest's `policy` table (older columns defaulted)."""
  return [POLICY_DEFAULTS | dict(zip(table["columns"], row, strict=True)) for row in table["rows"]]


def policy_from_rows(
  rows: Sequence[Mapping[str, Any]], num_timesteps: int = DEFAULT_NUM_TIMESTEPS
) -> QuantPolicy:
  """A policy with one exact-path rule per layer of the manifest's table, for T timesteps."""
  rules = [
    QuantRule(
      re.escape(row["layer"]),
      treatment=row["treatment"],
      bases=max(row["bases"], 1),
      act_bits=row["act_bits"],
      act_quantizer=row["act_quantizer"],
      weight_bits=row["weight_bits"] if row["treatment"] == INT else 8,
      act_t_groups=row["act_t_groups"],
      act_split=row["act_split"],
      bias_correction=row["bias_correction"],
    )
    for row in rows
  ]
  return QuantPolicy(
    tuple(rules),
    layers=tuple((r["layer"], tuple(r["kernel_shape"])) for r in rows),
    num_timesteps=num_timesteps,
  )


def student_model(
  model_config: Mapping[str, Any],
  rows: Sequence[Mapping[str, Any]],
  inference: str = "float",
  num_timesteps: int = DEFAULT_NUM_TIMESTEPS,
) -> nn.Module:
  """The quantized UNet of an export: `with_policy(unet_from_config(model), policy of rows)`.

  Args:
    model_config: the `config.model` section.
    rows: the per-layer policy table (`policy_rows`).
    inference: how the quantized layers compute: 'float' (the fake-quant forward) or 'int8'
      (int8 signs x int8 LSQ codes, int32 accumulation: `quant.int8`).
    num_timesteps: T of the diffusion (what timestep-grouped steps divide).
  """
  check_inference(inference)
  model = unet_from_config(ml_collections.ConfigDict(dict(model_config)))
  return with_policy(model, policy_from_rows(rows, num_timesteps), inference)


def _kind(name: str, treatment: str | None, where: str) -> str:
  if name == "kernel" and treatment in (BINARY, INT):
    return SIGNS if treatment == BINARY else INT8
  if name in _ACT_LEAVES or scale_index(name) == 1:
    return QUANT
  if scale_index(name) is not None:
    raise ValueError(f"{where}: a higher binary basis has no place in a single-basis export")
  return FP


def entries(params: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[Entry]:
  """Every param of `params` (arrays or shapes) with its encoding, in storage order."""
  layers = {row["layer"]: row for row in rows}
  out = []
  for key_path, leaf in jax.tree.flatten_with_path(dict(params))[0]:
    path = tuple(str(k.key) for k in key_path)
    row = layers.get("/".join(path[:-1]))
    kind = _kind(path[-1], row and row["treatment"], "/".join(path))
    bits = row["weight_bits"] if kind == INT8 else 32
    out.append(Entry(path, tuple(leaf.shape), kind, bits))
  return out


def encode(
  entry: Entry, value: np.ndarray, dtypes: Mapping[str, np.dtype]
) -> list[tuple[str, np.ndarray]]:
  """The flat (blob, values) segments that store one param; `dtypes` of the QUANT and FP blobs."""
  value = np.asarray(value, np.float32)
  if entry.kind == SIGNS:
    return [(SIGNS, pack_signs(value).ravel())]
  if entry.kind == INT8:
    q_p = 2 ** (entry.weight_bits - 1) - 1
    scale = np.asarray(int_weight_scale(value, entry.weight_bits))
    codes = np.round(np.clip(value / scale, -q_p, q_p)).astype(np.int8)
    # The codes the student trained with; a 16-bit step only rescales each channel slightly.
    return [(INT8, codes.ravel()), (QUANT, scale.astype(dtypes[QUANT]))]
  return [(entry.kind, value.astype(dtypes[entry.kind]).ravel())]


def decode(entry: Entry, take: Callable[[str, int], np.ndarray]) -> np.ndarray:
  """One float32 param from its segments; `take(blob, n)` returns the blob's next n values."""
  if entry.kind in (QUANT, FP):
    return take(entry.kind, math.prod(entry.shape)).astype(np.float32).reshape(entry.shape)
  *spatial, c_in, c_out = entry.shape
  if entry.kind == SIGNS:
    shape = (c_out, *spatial, num_words(c_in))
    return unpack_signs(take(SIGNS, math.prod(shape)).reshape(shape), c_in)
  codes = take(INT8, math.prod(entry.shape)).reshape(entry.shape)
  return codes.astype(np.float32) * take(QUANT, c_out).astype(np.float32)


def pack(
  params: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], dtypes: Mapping[str, np.dtype]
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """Encodes a student's params into the blobs; `dtypes` of the QUANT and FP blobs.

  Returns:
    (blobs: name -> 1-D array, only the non-empty ones; stored bytes of each layer's kernel).
  """
  segments: dict[str, list[np.ndarray]] = {SIGNS: [], INT8: [], QUANT: [], FP: []}
  kernel_bytes = {}
  for entry in entries(params, rows):
    value = functools.reduce(lambda tree, key: tree[key], entry.path, params)
    encoded = encode(entry, value, dtypes)
    for blob, values in encoded:
      segments[blob].append(values)
    if entry.path[-1] == "kernel":
      kernel_bytes["/".join(entry.path[:-1])] = sum(values.nbytes for _, values in encoded)
  blobs = {name: np.concatenate(parts) for name, parts in segments.items() if parts}
  return {name: blob for name, blob in blobs.items() if blob.size}, kernel_bytes


def unpack(
  blobs: Mapping[str, np.ndarray], abstract: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
  """The student's float32 param tree (shaped like `abstract`) from the blobs.

  Raises:
    ValueError: a blob is shorter or longer than the params need.
  """
  offsets = dict.fromkeys(blobs, 0)

  def take(blob: str, count: int) -> np.ndarray:
    start = offsets.get(blob, 0)
    if start + count > (blobs[blob].size if blob in blobs else 0):
      raise ValueError(f"blob {blob!r} is too short for the params of the manifest's model")
    offsets[blob] = start + count
    return blobs[blob][start : start + count]

  params: dict[str, Any] = {}
  for entry in entries(abstract, rows):
    tree = params
    for key in entry.path[:-1]:
      tree = tree.setdefault(key, {})
    tree[entry.path[-1]] = decode(entry, take)
  unused = [name for name, blob in blobs.items() if offsets[name] != blob.size]
  if unused:
    raise ValueError(f"blob {unused[0]!r} holds more values than the manifest's model has params")
  return params
