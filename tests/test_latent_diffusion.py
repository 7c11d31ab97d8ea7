"""Latent diffusion: the first stage around the UNet (encode for training, decode samples), its
checkpoint and export, the LDM configs and their data sources.

The `:smoke` jobs of the three LDM configs (train, sample, evaluate, export) are slow tests.
"""

import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from binarydm_jax import diffusion, efficiency
from binarydm_jax.data import first_stage
from binarydm_jax.data.input_pipeline import DatasetNotFoundError, load_dataset
from binarydm_jax.errors import ConfigError
from binarydm_jax.evaluation import evaluator, inception
from binarydm_jax.export import manifest
from binarydm_jax.models import autoencoder
from binarydm_jax.runtime import sharding
from binarydm_jax.sampling import sampleable, samplers
from binarydm_jax.training import pipeline
from binarydm_jax.training.config_validation import validate_config
from configs import ffhq, lsun_bedrooms, lsun_churches
from tests.test_score import weights_dir  # noqa: F401 (a fixture)

LDM_CONFIGS = {"lsun_bedrooms": lsun_bedrooms, "ffhq": ffhq, "lsun_churches": lsun_churches}


@pytest.fixture(scope="module")
def churches_smoke():
  """The LDM-8 smoke config with a 2-level KL first stage (factor 2: quick to compile)."""
  config = lsun_churches.get_config("smoke")
  config.first_stage.ch_mult = (1, 2)
  return config, first_stage.from_config(config)


def test_smoke_configs_are_valid_and_keep_the_paper_architecture():
  for name, module in LDM_CONFIGS.items():
    full, smoke = module.get_config(), module.get_config("smoke")
    validate_config(smoke)
    assert smoke.first_stage.kind == full.first_stage.kind
    assert smoke.first_stage.ch_mult == full.first_stage.ch_mult, name  # Same factor.
    for key in ("use_scale_shift_norm", "resblock_updown", "flip_sin_to_cos", "freq_shift"):
      assert smoke.model.get(key) == full.model.get(key), (name, key)
    assert not smoke.sampling.clip_denoised and smoke.diffusion.beta_schedule == "scaled_linear"
  with pytest.raises(ValueError, match="unknown variant 'tiny'"):
    lsun_bedrooms.get_config("tiny")


def test_paper_settings_of_the_ldm_configs():
  """Paper §1.7 / Table 12 and the published yamls (betas, factors, latent shapes)."""
  for module, beta_end, factor, latent in [
    (lsun_bedrooms, 0.0195, 4, (64, 64, 3)),
    (ffhq, 0.0195, 4, (64, 64, 3)),
    (lsun_churches, 0.0155, 8, (32, 32, 4)),
  ]:
    config = module.get_config()
    ae = first_stage.autoencoder_config(config)
    assert ae.factor == factor and first_stage.image_size(config) == 256
    assert ae.latent_shape(256) == latent
    assert config.diffusion.beta_end == beta_end and config.diffusion.beta_start == 0.0015
    assert (config.qat.batch_size, config.qat.num_steps, config.qat.switch_step) == (
      4,
      200_000,
      100_000,
    )
    assert config.quant.head_tail_blocks == 6 and config.sampling.ddim_steps == 100
    assert config.eval.num_samples == 50_000 and config.eval.metric == "inception"


def test_churches_efficiency_matches_table_2():
  """LDM-8 Churches: FP 1125.2 MB and W1A4 38.1 MB (paper Table 2), the latter within 5%."""
  result = efficiency.account(lsun_churches.get_config())
  assert round(result["fp"]["size_mb"], 1) == 1125.2
  assert result["deployed"]["size_mb"] == pytest.approx(38.1, rel=0.05)


@pytest.mark.parametrize(
  ("update", "match"),
  [
    ({"sampling.clip_denoised": True}, r"sampling\.clip_denoised=True: expected False"),
    ({"model.channels": 3}, r"model\.channels=3: .*first_stage\.embed_dim=4"),
    ({"first_stage.random_init": False}, r"first_stage\.source is not set"),
    ({"first_stage.kind": "vqgan"}, r"first_stage\.kind='vqgan'"),
    ({"data.name": "digits", "eval.metric": "none"}, r"digits are grayscale"),
  ],
)
def test_bad_first_stage_configs_are_one_line_errors(update, match):
  config = lsun_churches.get_config("smoke")
  for key, value in update.items():
    section, field = key.split(".")
    config[section][field] = value
  with pytest.raises(ConfigError, match=match):
    validate_config(config)


def test_synthetic_images_are_deterministic_smooth_rgb():
  data = ml_collections.ConfigDict(
    {"name": "synthetic", "image_size": 64, "seed": 0, "random_flip": False, "num_images": 20}
  )
  first, second = load_dataset(data), load_dataset(data)
  np.testing.assert_array_equal(first.train, second.train)
  assert first.train.shape == (15, 64, 64, 3) and first.heldout.shape == (5, 64, 64, 3)
  assert -1.0 <= first.train.min() < -0.5 and 0.5 < first.train.max() <= 1.0
  # Smooth: neighbouring pixels differ far less than the image's spread.
  step = np.abs(np.diff(first.train, axis=2)).mean()
  assert step < 0.25 * first.train.std()


def test_lsun_offline_error_says_how_to_prepare_it(tmp_path):
  data = ml_collections.ConfigDict(
    {"name": "lsun_churches", "image_size": 32, "seed": 0, "random_flip": False}
  )
  data.data_dir = str(tmp_path)
  with pytest.raises(DatasetNotFoundError, match=r"lsun/church_outdoor.*download_and_prepare"):
    load_dataset(data)


def test_lsun_images_are_center_cropped_from_tfds(tmp_path):
  """Mocked tfds LSUN (random non-square JPEG-sized images): square crops at image_size."""
  builder = tfds.builder("lsun/bedroom", data_dir=str(tmp_path))
  builder.data_path.mkdir(parents=True)
  builder.info.write_to_directory(builder.data_path)
  data = ml_collections.ConfigDict(
    {"name": "lsun_bedrooms", "image_size": 16, "seed": 0, "random_flip": True}
  )
  data.data_dir, data.max_images = str(tmp_path), 5
  with tfds.testing.mock_data(num_examples=7, data_dir=str(tmp_path)):
    loaded = load_dataset(data)
  assert loaded.train.shape == (5, 16, 16, 3) and loaded.heldout.shape == (7, 16, 16, 3)
  assert loaded.train.dtype == np.float32 and -1.0 <= loaded.train.min() <= loaded.train.max() <= 1


def test_latent_dataset_flips_by_encoding_flipped_images(churches_smoke):
  config, first = churches_smoke
  data = ml_collections.ConfigDict(
    {"name": "synthetic", "image_size": 16, "seed": 3, "random_flip": True, "num_images": 8}
  )
  images = load_dataset(data)
  latents = first_stage.latent_dataset(first, images, batch_size=4)
  assert latents.train.shape == (6, 8, 8, 4) and latents.heldout.shape == (2, 8, 8, 4)
  encode = first.encoder
  np.testing.assert_allclose(latents.train, encode(images.train), atol=1e-5)
  flipped = encode(images.train[:, :, ::-1])
  np.testing.assert_allclose(latents.train_flipped, flipped, atol=1e-5)
  # A batch row is the latent of the image or of its flip, as the image batch says.
  image_batch = images.batch(0, 6, 0, 1)
  latent_batch = latents.batch(0, 6, 0, 1)
  was_flipped = [not np.array_equal(row, images.train[i]) for i, row in enumerate(image_batch)]
  assert any(was_flipped)
  np.testing.assert_allclose(latent_batch, encode(image_batch), atol=1e-5)


class ShrinkingEps:
  """A stand-in UNet: eps = 0.1 x (sampling needs only `apply`)."""

  def apply(self, variables, x, t, train=False):
    return 0.1 * x


def test_sampler_decodes_latents_to_images(churches_smoke):
  config, first = churches_smoke
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1}), jax.devices()[:1])
  schedule = diffusion.schedule_from_config(config.diffusion)
  make = functools.partial(
    samplers.make_sampler, ShrinkingEps(), schedule, config.sampling, mesh, (8, 8, 4)
  )
  key = jax.random.PRNGKey(1)
  images = make(first.decode)({}, key, 2)
  assert images.shape == (2, 16, 16, 3) and np.abs(images).max() <= 1.0
  # The same latents, undecoded (scaled into the sampler's [-1, 1] output clip and back).
  latents = jnp.asarray(make(lambda z: z / 1000.0)({}, key, 2)) * 1000.0
  assert np.abs(latents).max() > 1.0  # Latents are not images: decoding is what clips.
  expected = autoencoder.decode(first.model, first.params, latents)
  np.testing.assert_allclose(images, np.clip(expected, -1, 1), atol=1e-4)


def test_first_stage_checkpoint_round_trip_and_refusals(churches_smoke, tmp_path):
  config, first = churches_smoke
  path = first_stage.save(tmp_path / "fs", first.config, first.params)
  loaded_config, params = first_stage.load(path)
  assert loaded_config == first.config
  jax.tree.map(np.testing.assert_array_equal, params, first.params)
  with pytest.raises(first_stage.FirstStageError, match="already exists"):
    first_stage.save(path, first.config, first.params)

  config = config.copy_and_resolve_references()
  config.first_stage.source = str(path)
  assert first_stage.from_config(config).config == first.config
  config.first_stage.ch = 64
  with pytest.raises(first_stage.FirstStageError, match=r"ch: config 64 vs checkpoint 32"):
    first_stage.from_config(config)
  config.first_stage.source = str(tmp_path / "nothing")
  with pytest.raises(first_stage.FirstStageError, match=r"no first-stage checkpoint.*--ldm_che"):
    first_stage.from_config(config)


def _job_config(module, tmp_path, inception_dir):
  config = module.get_config("smoke")
  if config.data.name == "folder":  # ffhq: the smoke variant's synthetic images.
    raise AssertionError("the smoke variant should not need a folder")
  config.eval.update(inception_dir=str(inception_dir), cache_dir=str(tmp_path / "cache"))
  return config


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LDM_CONFIGS))
def test_smoke_job_trains_samples_evaluates_and_exports(
  name,
  weights_dir,  # noqa: F811
  tmp_path,
  monkeypatch,
):
  monkeypatch.setattr(inception, "WEIGHTS_SHA256", "ab" * 32)  # Take the random weights.
  config = _job_config(LDM_CONFIGS[name], tmp_path, weights_dir)
  workdir = tmp_path / "work"
  results = pipeline.run(config, str(workdir))
  size = first_stage.image_size(config)
  for model in ("teacher", "student"):
    scores = results[model]
    assert np.isfinite(scores["fid"]) and scores["fid"] > 0, model
    assert scores["reference"]["dataset"] == evaluator.reference_label(config, size)
    assert (workdir / "samples" / f"{model}_final.png").is_file()

  # The export ships the decoder beside the UNet and samples images; its bytes stay the UNet's.
  export = workdir / "export"
  info = json.loads((export / manifest.MANIFEST).read_text())
  first_files = [f for f in info["files"] if f.startswith(manifest.FIRST_STAGE + "/")]
  assert first_files and info["first_stage"]["bytes"] == sum(
    info["files"][f]["bytes"] for f in first_files
  )
  unet_bytes = (
    sum(p.stat().st_size for p in export.rglob("*") if p.is_file()) - (info["first_stage"]["bytes"])
  )
  assert info["export_bytes"] == unet_bytes
  source = sampleable.load(str(export), None, "student")
  assert source.sample_shape == (size, size, 3)
  exported = sampleable.draw(source, 2, None, None, seed=0, batch=2)
  trained = sampleable.draw(sampleable.load(None, str(workdir), "student"), 2, None, None, 0, 2)
  assert exported.shape == (2, size, size, 3)
  np.testing.assert_allclose(exported, trained, atol=1e-4)
