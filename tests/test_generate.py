"""Sharded, resumable generation: sample i depends only on the seed and i; shards; load_samples."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from binarydm_jax.errors import FlagError
from binarydm_jax.models.unet import unet_from_config
from binarydm_jax.sampling.sample_shards import (
  SamplesError,
  generate,
  load_samples,
  shard_path,
)
from binarydm_jax.sampling.sampleable import Sampleable, settings
from tests.test_export import one_line, tiny_config


def tiny_source(num_timesteps=1000):
  """A random 8x8 float UNet sampled with DDIM (3 steps, eta 1: fresh noise every step)."""
  config = tiny_config()
  config.diffusion.num_timesteps = num_timesteps
  config.sampling.eta = 1.0
  model = unet_from_config(config.model)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), int))
  return Sampleable("tiny", model, params["params"], (8, 8, 1), config.diffusion, config.sampling)


@pytest.fixture(scope="module")
def source():
  return tiny_source()


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory):
  """10 samples on 8 devices, batches of 8, shards of 4: (directory, samples)."""
  out = tmp_path_factory.mktemp("reference")
  result = generate(source, out, 10, seed=3, batch_size=8, shard_size=4, log=lambda _: None)
  assert result["drawn"] == 3
  return out, load_samples(out)


def test_shards_are_uint8_nhwc_arr_0(reference):
  out, samples = reference
  assert samples.shape == (10, 8, 8, 1) and samples.dtype == np.uint8
  assert [np.load(shard_path(out, s))["arr_0"].shape[0] for s in range(3)] == [4, 4, 2]
  assert len({image.tobytes() for image in samples}) == 10  # Every sample is its own.


@pytest.mark.parametrize("num_devices, batch_size", [(1, 2), (8, 16)])
def test_samples_do_not_depend_on_devices_or_batch_size(
  source, reference, tmp_path, num_devices, batch_size
):
  generate(
    source,
    tmp_path,
    10,
    seed=3,
    batch_size=batch_size,
    shard_size=4,
    devices=jax.devices()[:num_devices],
    log=lambda _: None,
  )
  np.testing.assert_array_equal(load_samples(tmp_path), reference[1])


def test_a_killed_generation_resumes_at_the_missing_shards(source, reference, tmp_path):
  out, samples = reference
  for s in range(3):
    shard_path(tmp_path, s).write_bytes(shard_path(out, s).read_bytes())
  (tmp_path / "generation.json").write_bytes((out / "generation.json").read_bytes())
  shard_path(tmp_path, 1).unlink()
  # A truncated shard (as a copy cut short would leave) and a temp file of a killed write.
  shard_path(tmp_path, 2).write_bytes(shard_path(out, 2).read_bytes()[:100])
  (tmp_path / ".samples_00001.npz.tmp").write_bytes(b"half")
  with pytest.raises(SamplesError, match="misses 1 shard"):
    load_samples(tmp_path)
  lines = []
  result = generate(source, tmp_path, 10, seed=3, batch_size=8, shard_size=4, log=lines.append)
  assert result["drawn"] == 2
  assert [line.split(":")[0] for line in lines] == ["shard 2/3", "shard 3/3"]
  assert "images/s, ETA" in lines[-1]
  np.testing.assert_array_equal(load_samples(tmp_path), samples)
  assert generate(source, tmp_path, 10, seed=3, shard_size=4, batch_size=8)["drawn"] == 0


def test_other_settings_are_refused(source, reference):
  with pytest.raises(SamplesError) as excinfo:
    generate(source, reference[0], 10, seed=3, steps=2, shard_size=4, batch_size=8)
  assert "ddim_steps 3 -> 2" in one_line(excinfo) and "pass the same flags" in one_line(excinfo)


def test_a_batch_that_does_not_split_over_the_devices_is_refused(source, tmp_path):
  with pytest.raises(SamplesError, match="multiple of the 8 devices, got 10, 4 and 12"):
    generate(source, tmp_path, 10, batch_size=12, shard_size=4)


def test_ddpm_is_sharded_the_same_way(tmp_path):
  source = tiny_source(num_timesteps=6)
  generate(source, tmp_path / "a", 3, sampler="ddpm", batch_size=8, log=lambda _: None)
  generate(
    source, tmp_path / "b", 3, sampler="ddpm", batch_size=1, devices=jax.devices()[:1], log=len
  )
  np.testing.assert_array_equal(load_samples(tmp_path / "a"), load_samples(tmp_path / "b"))


def test_load_samples_reads_an_npz_and_refuses_what_is_not_samples(tmp_path):
  images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
  np.savez(tmp_path / "one.npz", arr_0=images)
  np.testing.assert_array_equal(load_samples(tmp_path / "one.npz"), images)
  np.savez(tmp_path / "other.npz", images=images)
  for path, message in [
    (tmp_path / "other.npz", "not an .npz with the samples under arr_0"),
    (tmp_path / "none", "does not exist"),
    (tmp_path, "holds no samples_NNNNN.npz shards"),
  ]:
    with pytest.raises(SamplesError) as excinfo:
      load_samples(path)
    assert message in one_line(excinfo)


def test_steps_beyond_the_models_timesteps_are_a_flag_error(source, tmp_path):
  with pytest.raises(FlagError) as excinfo:
    generate(source, tmp_path, 4, steps=1001, batch_size=8)
  assert one_line(excinfo).startswith("--steps=1001: DDIM steps must be in [1, 1000]")
  assert settings(source, steps=1000).ddim_steps == 1000
