"""Quantization policy: rules, presets, head/tail placement, validation, table, param groups."""

import pathlib

import jax.numpy as jnp
import pytest

from binarydm_jax.models.unet import UNet
from binarydm_jax.quant import (
  QuantPolicy,
  QuantRule,
  default_quant_config,
  head_tail_blocks,
  param_group,
  param_labels,
  policy_from_config,
  policy_table,
)

TINY = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), norm_groups=8)
TINY_SHAPE = (16, 16, 3)
CIFAR = UNet()
CIFAR_SHAPE = (32, 32, 3)


def _config(**updates):
  config = default_quant_config()
  config.update(updates)
  return config


def test_first_match_wins_and_unmatched_is_fp():
  policy = QuantPolicy(
    (QuantRule(r".*attn/q", treatment="fp", act_bits=8), QuantRule(r".*attn/.*", bases=2))
  )
  assert hash(policy) == hash(QuantPolicy(policy.rules))
  assert policy.resolve(("middle_attn", "q")).treatment == "fp"
  assert policy.resolve(("middle_attn", "q")).act_bits == 8
  assert policy.resolve("middle_attn/k").bases == 2
  assert policy.resolve("conv_in").treatment == "fp"
  assert policy.resolve("conv_in").act_bits == 32


def test_cifar_default_head_and_tail_are_the_32_and_16_levels():
  head, tail = head_tail_blocks(CIFAR, CIFAR_SHAPE)
  assert head == tuple(f"input_blocks_{i}" for i in range(6))
  assert tail == tuple(f"output_blocks_{i}" for i in range(6, 12))
  ldm4 = UNet(ch=32, ch_mult=(1, 2, 3, 4), attn_resolutions=(32, 16, 8), norm_groups=8)
  head, tail = head_tail_blocks(ldm4, (64, 64, 3))  # LDM-4 layout on a 64x64 latent.
  assert head == tuple(f"input_blocks_{i}" for i in range(6))
  assert tail == tuple(f"output_blocks_{i}" for i in range(6, 12))
  head, tail = head_tail_blocks(ldm4, (64, 64, 3), count=3)
  assert head == ("input_blocks_0", "input_blocks_1", "input_blocks_2")
  assert tail == ("output_blocks_9", "output_blocks_10", "output_blocks_11")


def test_cifar_default_w1a4_table_and_docs():
  policy = policy_from_config(default_quant_config(), CIFAR, CIFAR_SHAPE)
  rows = {path: policy.resolve(path) for path, _ in policy.layers}
  assert len(rows) == 113
  for path in ("time_embed_0", "time_embed_1", "conv_in", "conv_out"):
    assert rows[path].treatment == "fp" and rows[path].act_bits == 32
  assert rows["input_blocks_3"].bases == 2  # Downsample 32 -> 16.
  assert rows["input_blocks_6"].bases == 1  # Downsample 16 -> 8.
  assert rows["output_blocks_5/upsample"].bases == 1  # Works at 8x8.
  assert rows["output_blocks_8/upsample"].bases == 2
  assert rows["middle_attn/q"].bases == 1 and rows["middle_attn/q"].act_bits == 4
  table = str(policy)
  assert "113 layers: 50 binary k=1 A4, 59 binary k=2 A4, 4 fp A32" in table.splitlines()
  assert "| input_blocks_1/res/conv_1 | 3x3x128x128 | binary | 2 | 4 |" in table.splitlines()
  guide = pathlib.Path(__file__).parent.parent / "docs" / "quantization.md"
  assert table in guide.read_text(), "docs/quantization.md's policy table is out of date"


def test_policy_table_of_a_hand_built_policy():
  policy = QuantPolicy((QuantRule(".*skip", bases=3, act_bits=8, act_quantizer="asymmetric"),))
  table = policy_table(policy, TINY, TINY_SHAPE)
  assert "| output_blocks_3/res/skip | 1x1x64x32 | binary | 3 | 8 asym |" in table
  assert "| conv_in | 3x3x3x32 | fp | - | 32 |" in table
  assert table.endswith("51 layers: 5 binary k=3 A8 asym, 46 fp A32")
  assert str(policy).startswith("| # | regex |")  # No layers known: the rules only.


@pytest.mark.parametrize(
  "updates, path, expected",
  [
    (dict(preset="baseline"), "input_blocks_1/res/conv_1", ("binary", 1, 4)),
    (dict(preset="W1A8"), "input_blocks_1/res/conv_1", ("binary", 2, 8)),
    (dict(preset="W1A32"), "middle_res_0/conv_1", ("binary", 1, 32)),
    (dict(preset="fp"), "middle_res_0/conv_1", ("fp", 0, 32)),
    (dict(preset="baseline", act_bits=8), "output_blocks_3/res/skip", ("binary", 1, 8)),
    (dict(fp_boundary_bits=8), "conv_in", ("int", 0, 8)),
    (dict(head_tail_blocks=0), "input_blocks_1/res/conv_1", ("binary", 1, 4)),
    (dict(head_tail_middle=True), "middle_res_0/conv_1", ("binary", 2, 4)),
    (dict(rules=[dict(regex=".*attn/.*", treatment="fp")]), "middle_attn/v", ("fp", 0, 32)),
    (dict(rules=[(".*skip", "binary", 3, 8)]), "output_blocks_3/res/skip", ("binary", 3, 8)),
  ],
)
def test_presets_and_rules(updates, path, expected):
  q = policy_from_config(_config(**updates), TINY, TINY_SHAPE).resolve(path)
  assert (q.treatment, q.bases, q.act_bits) == expected


def test_asymmetric_option_reaches_binarized_layers_only():
  policy = policy_from_config(_config(act_quantizer="asymmetric"), TINY, TINY_SHAPE)
  assert policy.resolve("middle_res_0/conv_1").act_quantizer == "asymmetric"
  assert not policy.resolve("conv_in").quantizes_activations


@pytest.mark.parametrize(
  "updates, message",
  [
    (dict(preset="W2A4"), "config.quant.preset='W2A4': expected one of"),
    (dict(act_bits=16), "config.quant.act_bits=16: expected one of 2..8 or 32"),
    (dict(body_bases=0), "config.quant.body_bases=0: expected an integer in 1..3"),
    (dict(fp_boundary_bits=16), "config.quant.fp_boundary_bits=16: expected 8 or 32"),
    (dict(head_tail_blocks=-2), "config.quant.head_tail_blocks=-2"),
    (dict(act_quantizer="unsigned"), "config.quant.act_quantizer='unsigned'"),
    (
      dict(rules=[dict(regex="conv_in"), dict(regex="conv_out"), dict(regex=".*", act_bits=5.5)]),
      "config.quant.rules[2].act_bits=5.5: expected one of 2..8 or 32",
    ),
    (dict(rules=[dict(regex=".*", bases=0)]), "config.quant.rules[0].bases=0: expected"),
    (dict(rules=[dict(regex=".*", bits=4)]), "config.quant.rules[0].bits: unknown rule field"),
    (dict(rules=[dict(treatment="fp")]), "config.quant.rules[0].regex: missing"),
    (dict(rules=[dict(regex="(")]), "config.quant.rules[0].regex='(': expected a valid"),
    (
      dict(rules=[dict(regex=".*conv_1"), dict(regex="decoder/.*")]),
      "config.quant.rules[1].regex='decoder/.*': matches no layer",
    ),
  ],
)
def test_bad_config_is_one_line_naming_the_key(updates, message):
  with pytest.raises(ValueError) as error:
    policy_from_config(_config(**updates), TINY, TINY_SHAPE)
  assert message in str(error.value)
  assert "\n" not in str(error.value)


def test_param_groups():
  assert param_group(("input_blocks_1", "res", "conv_1", "kernel")) == "kernel"
  assert param_group(("input_blocks_1", "res", "conv_1", "scale_1")) == "scale_first"
  assert param_group(("input_blocks_1", "res", "conv_1", "scale_2")) == "scale_higher"
  assert param_group(("a", "scale_3")) == "scale_higher"
  assert param_group(("a", "act_step")) == "act_quant"
  assert param_group(("a", "act_offset")) == "act_quant"
  assert param_group(("a", "bias")) == "other"
  assert param_group(("norm_out", "norm", "scale")) == "other"
  labels = param_labels({"params": {"c": {"kernel": jnp.ones(2), "scale_2": jnp.ones(1)}}})
  assert labels == {"params": {"c": {"kernel": "kernel", "scale_2": "scale_higher"}}}
