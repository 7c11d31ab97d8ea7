"""Binarized layers (sign STE, multi-basis binarizer, LSQ activations) applied by a path policy."""

from binarydm_jax.quant.binarize import binarize, calibrate, with_policy
from binarydm_jax.quant.int8 import INFERENCE_MODES, int8_params, runs_int8
from binarydm_jax.quant.layers import CALIB_COLLECTION, QuantConv, QuantDense
from binarydm_jax.quant.lsq import (
  calibrate_asymmetric,
  calibrate_signed,
  lsq_plus_quantize,
  lsq_quantize,
)
from binarydm_jax.quant.params import PARAM_GROUPS, param_group, param_labels
from binarydm_jax.quant.policy import (
  FULL_PRECISION_POLICY,
  LayerQuant,
  QuantPolicy,
  QuantRule,
  format_policy_table,
  layer_paths,
)
from binarydm_jax.quant.presets import (
  FP_WEIGHT_PRESETS,
  PRESETS,
  block_resolutions,
  default_quant_config,
  head_tail_blocks,
  multi_basis_configured,
  policy_from_config,
)
from binarydm_jax.quant.ste import round_ste, sign, sign_ste
from binarydm_jax.quant.table import layer_rows, layer_shapes, policy_table
from binarydm_jax.quant.weight_binarizer import binarize_kernel, init_scales, int_quantize_kernel

__all__ = [
  "CALIB_COLLECTION",
  "FP_WEIGHT_PRESETS",
  "FULL_PRECISION_POLICY",
  "INFERENCE_MODES",
  "PARAM_GROUPS",
  "PRESETS",
  "LayerQuant",
  "QuantConv",
  "QuantDense",
  "QuantPolicy",
  "QuantRule",
  "binarize",
  "binarize_kernel",
  "block_resolutions",
  "calibrate",
  "calibrate_asymmetric",
  "calibrate_signed",
  "default_quant_config",
  "format_policy_table",
  "head_tail_blocks",
  "init_scales",
  "int8_params",
  "int_quantize_kernel",
  "layer_paths",
  "layer_rows",
  "layer_shapes",
  "lsq_plus_quantize",
  "lsq_quantize",
  "multi_basis_configured",
  "param_group",
  "param_labels",
  "policy_from_config",
  "policy_table",
  "round_ste",
  "runs_int8",
  "sign",
  "sign_ste",
  "with_policy",
]
