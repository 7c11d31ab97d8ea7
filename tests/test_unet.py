"""The DDPM UNet: paper param counts, sown block outputs, dropout, bf16 compute, time embedding."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from binarydm_jax.models.layers import LayerFactory, timestep_embedding
from binarydm_jax.models.unet import BLOCK_OUTPUT_SUFFIX, UNet, count_params, unet_from_config
from configs import cifar

# A model that compiles in seconds: two levels (one downsampling), attention at 4x4.
TINY = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), norm_groups=8)
TINY_SHAPE = (2, 8, 8, 3)


def _abstract_init(model, shape):
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  t = jax.ShapeDtypeStruct(shape[:1], jnp.int32)
  return jax.eval_shape(model.init, jax.random.key(0), x, t)


def _random_params(model, shape, seed=0):
  """Params with non-zero values everywhere (the real init zeroes `conv_out`, so the output is 0)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    if "scale" in name:  # GroupNorm scale.
      return jnp.asarray(1.0 + 0.1 * rng.standard_normal(leaf.shape), leaf.dtype)
    if "bias" in name:
      return jnp.asarray(0.1 * rng.standard_normal(leaf.shape), leaf.dtype)
    fan_in = math.prod(leaf.shape[:-1])
    return jnp.asarray(rng.standard_normal(leaf.shape) / math.sqrt(fan_in), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, _abstract_init(model, shape))


def _inputs(shape=TINY_SHAPE, seed=1):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.uniform(-1, 1, shape), jnp.float32)
  t = jnp.asarray(rng.integers(0, 1000, shape[:1]), jnp.int32)
  return x, t


# ------------------------------------------------------------------------ param counts


def test_cifar10_param_count():
  """DDPM CIFAR-10 (the paper's 35.7M model)."""
  params = _abstract_init(UNet(), (1, 32, 32, 3))["params"]
  assert count_params(params) == 35_746_307
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))


def test_ldm4_bedroom_param_count():
  """LDM-4 LSUN-Bedrooms UNet; the paper's FP size 1045.4 MB is its float32 params."""
  model = UNet(
    ch=224,
    ch_mult=(1, 2, 3, 4),
    attn_resolutions=(32, 16, 8),
    num_head_channels=32,
    downsample_padding="symmetric",
    norm_eps=1e-5,
  )
  n = count_params(_abstract_init(model, (1, 64, 64, 3))["params"])
  assert n == 274_056_163
  assert round(n * 4 / 2**20, 1) == 1045.4


def test_unet_from_cifar_config():
  config = cifar.get_config()
  model = unet_from_config(config.model)
  assert (model.ch, model.ch_mult, model.num_res_blocks) == (128, (1, 2, 2, 2), 2)
  assert (model.attn_resolutions, model.out_channels, model.dropout) == ((16,), 3, 0.1)
  assert model.layers.dtype == jnp.float32
  size = config.data.image_size
  assert count_params(_abstract_init(model, (1, size, size, 3))["params"]) == 35_746_307
  config.model.dtype = "bfloat16"
  assert unet_from_config(config.model).layers.dtype == jnp.bfloat16


def test_bad_downsample_padding():
  with pytest.raises(ValueError, match="downsample_padding"):
    _abstract_init(UNet(**TINY, downsample_padding="same"), TINY_SHAPE)


# ------------------------------------------------------------------------ sown block outputs


def _block_names(num_input, num_output):
  """The sown names: `<openaimodel block name>_out` (the block's own module scope is its name)."""
  names = (
    [f"input_blocks_{i}" for i in range(num_input)]
    + ["middle_block"]
    + [f"output_blocks_{i}" for i in range(num_output)]
  )
  return {name + BLOCK_OUTPUT_SUFFIX for name in names}


def test_cifar_intermediates_layout():
  """openaimodel numbering: 12 input blocks, the middle block, 12 output blocks (25 in all)."""
  model = UNet()
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  variables = _abstract_init(model, (1, 32, 32, 3))
  out, state = jax.eval_shape(
    lambda v, x, t: model.apply(v, x, t, mutable=["intermediates"]), variables, x, t
  )
  assert out.shape == (1, 32, 32, 3) and out.dtype == jnp.float32
  inter = state["intermediates"]
  assert len(inter) == 25
  assert set(inter) == _block_names(12, 12)
  for value in inter.values():
    assert isinstance(value, tuple) and len(value) == 1
  # Channels and resolutions of a few blocks (DDPM CIFAR-10: 128-256-256-256 at 32-16-8-4).
  assert inter["input_blocks_0_out"][0].shape == (1, 32, 32, 128)
  assert inter["input_blocks_3_out"][0].shape == (1, 16, 16, 128)  # first downsampling
  assert inter["input_blocks_11_out"][0].shape == (1, 4, 4, 256)
  assert inter["middle_block_out"][0].shape == (1, 4, 4, 256)
  assert inter["output_blocks_2_out"][0].shape == (1, 8, 8, 256)  # last block of a level upsamples
  assert inter["output_blocks_11_out"][0].shape == (1, 32, 32, 128)


@functools.cache
def _tiny():
  """(model, params, x, t, apply); one jitted apply shared by the tests (compiles once per `train`)."""
  model = UNet(**TINY, dropout=0.5)

  @functools.partial(jax.jit, static_argnames="train")
  def apply(params, x, t, rng, train):
    return model.apply(params, x, t, train=train, rngs={"dropout": rng}, mutable=["intermediates"])

  return model, _random_params(model, TINY_SHAPE), *_inputs(), apply


def test_tiny_forward_shape_and_intermediates():
  _, params, x, t, apply = _tiny()
  out, state = apply(params, x, t, jax.random.key(0), train=False)
  assert out.shape == x.shape and out.dtype == jnp.float32
  assert np.all(np.isfinite(out)) and float(jnp.std(out)) > 0
  inter = state["intermediates"]
  # Inputs: stem, res, downsample, res. Outputs: 2 levels x (num_res_blocks + 1).
  assert set(inter) == _block_names(4, 4)
  for name, value in inter.items():
    assert isinstance(value, tuple) and len(value) == 1, name
    assert value[0].shape[0] == x.shape[0]
  assert inter["input_blocks_2_out"][0].shape == (2, 4, 4, 16)
  assert inter["middle_block_out"][0].shape == (2, 4, 4, 32)
  assert inter["output_blocks_3_out"][0].shape == (2, 8, 8, 16)
  assert inter["output_blocks_1_out"][0].shape == (2, 8, 8, 32)  # upsampled at the level end


def test_dropout_only_in_training():
  _, params, x, t, apply = _tiny()
  key_a, key_b = jax.random.key(1), jax.random.key(2)
  eval_a, _ = apply(params, x, t, key_a, train=False)
  eval_b, _ = apply(params, x, t, key_b, train=False)
  np.testing.assert_array_equal(eval_a, eval_b)
  train_a, _ = apply(params, x, t, key_a, train=True)
  train_a2, _ = apply(params, x, t, key_a, train=True)
  train_b, _ = apply(params, x, t, key_b, train=True)
  np.testing.assert_array_equal(train_a, train_a2)
  assert not np.allclose(train_a, train_b)
  assert not np.allclose(train_a, eval_a)
  with pytest.raises(Exception, match="dropout"):  # train=True needs a dropout rng
    jax.eval_shape(functools.partial(_tiny()[0].apply, train=True), params, x, t)


def test_bf16_compute_keeps_f32_params_and_output():
  model32, params, x, t, apply = _tiny()
  model16 = model32.clone(layers=LayerFactory(dtype=jnp.bfloat16))
  params16 = jax.eval_shape(model16.init, jax.random.key(0), x, t)["params"]
  assert {leaf.dtype for leaf in jax.tree.leaves(params16)} == {jnp.dtype(jnp.float32)}
  assert jax.tree.structure(params["params"]) == jax.tree.structure(params16)
  out32, _ = apply(params, x, t, jax.random.key(0), train=False)
  out16 = jax.jit(model16.apply)(params, x, t)
  assert out16.dtype == jnp.float32
  assert not np.array_equal(out16, out32)  # bf16 really was used
  scale = float(jnp.max(jnp.abs(out32)))
  assert scale > 0.1
  np.testing.assert_allclose(out16, out32, atol=0.05 * scale)


# ------------------------------------------------------------------------ timestep embedding


@pytest.mark.parametrize("freq_shift,flip", [(1.0, False), (0.0, True), (1.0, True), (0.0, False)])
@pytest.mark.parametrize("dim", [16, 7])
def test_timestep_embedding_matches_numpy(freq_shift, flip, dim):
  t = np.array([0, 1, 17, 500, 999])
  half = dim // 2
  freqs = np.exp(-np.log(10000.0) * np.arange(half) / (half - freq_shift))
  args = t[:, None].astype(np.float64) * freqs[None]
  parts = [np.cos(args), np.sin(args)] if flip else [np.sin(args), np.cos(args)]
  expected = np.concatenate(parts + [np.zeros((len(t), dim % 2))], axis=1)
  got = timestep_embedding(jnp.asarray(t), dim, freq_shift, flip)
  assert got.shape == (len(t), dim) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, expected, atol=5e-4)
  if not flip:  # DDPM (and its t=0 row): sin 0 = 0, cos 0 = 1.
    np.testing.assert_array_equal(got[0, :half], 0.0)
    np.testing.assert_array_equal(got[0, half : 2 * half], 1.0)
