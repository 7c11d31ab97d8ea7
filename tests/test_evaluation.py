"""Tests for the Frechet distance, the digits feature extractor, digits FID and its companions."""

import hashlib
import importlib
import logging
import pathlib
import types

import jax
import ml_collections
import numpy as np
import pytest
import scipy.linalg

from binarydm_jax.data import input_pipeline
from binarydm_jax.errors import ConfigError
from binarydm_jax.evaluation import (
  bootstrap,
  digits_classifier,
  digits_fid,
  evaluator,
  frechet,
  kid,
  minimums,
)
from binarydm_jax.training import pipeline
from binarydm_jax.training.config_validation import validate_config
from configs import cifar as cifar_config
from configs import digits as digits_config

IMAGE_SIZE = 16


def _random_stats(rng: np.random.Generator, dim: int) -> tuple[np.ndarray, np.ndarray]:
  """A random mean and a well-conditioned random covariance."""
  factor = rng.standard_normal((dim, dim))
  return rng.standard_normal(dim), factor @ factor.T / dim + 0.1 * np.eye(dim)


def _scipy_reference(mu1, sigma1, mu2, sigma2) -> float:
  """The pytorch-fid formula, with scipy's general matrix square root."""
  covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2)).real
  diff = mu1 - mu2
  return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


@pytest.fixture(scope="module")
def extractor(tmp_path_factory):
  """The shipped 16px classifier (never trained here: the cache dir stays empty)."""
  cache_dir = tmp_path_factory.mktemp("classifier_cache")
  extractor = digits_classifier.DigitsFeatureExtractor(IMAGE_SIZE, cache_dir=str(cache_dir))
  assert list(cache_dir.iterdir()) == []
  return extractor


def _digits(image_size: int) -> input_pipeline.ImageDataset:
  config = {"name": "digits", "image_size": image_size, "seed": 0, "random_flip": False}
  return input_pipeline.load_dataset(ml_collections.ConfigDict(config))


def _fail_to_train(*args, **kwargs):
  raise AssertionError("trained a classifier although shipped or cached params exist")


@pytest.fixture(scope="module")
def digits():
  return _digits(IMAGE_SIZE)


@pytest.mark.parametrize("dim", [1, 8, 64])
def test_frechet_distance_matches_scipy_sqrtm(dim):
  rng = np.random.default_rng(dim)
  stats1, stats2 = _random_stats(rng, dim), _random_stats(rng, dim)
  expected = _scipy_reference(*stats1, *stats2)
  np.testing.assert_allclose(frechet.frechet_distance(*stats1, *stats2), expected, rtol=1e-6)


def test_frechet_distance_is_zero_for_identical_stats_and_symmetric():
  rng = np.random.default_rng(0)
  stats1, stats2 = _random_stats(rng, 32), _random_stats(rng, 32)
  assert abs(frechet.frechet_distance(*stats1, *stats1)) < 1e-9
  forward = frechet.frechet_distance(*stats1, *stats2)
  assert forward > 1.0
  np.testing.assert_allclose(frechet.frechet_distance(*stats2, *stats1), forward, rtol=1e-9)


def test_frechet_distance_of_rank_deficient_stats_is_finite():
  rng = np.random.default_rng(1)
  stats1 = frechet.feature_statistics(rng.standard_normal((5, 20)))
  stats2 = frechet.feature_statistics(rng.standard_normal((5, 20)) + 1.0)
  distance = frechet.frechet_distance(*stats1, *stats2)
  assert np.isfinite(distance) and distance > 0


def test_frechet_distance_rejects_mismatched_shapes():
  rng = np.random.default_rng(0)
  mu, sigma = _random_stats(rng, 4)
  with pytest.raises(ValueError, match="Shape mismatch"):
    frechet.frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])


def test_feature_statistics_are_float64_mean_and_covariance():
  features = np.random.default_rng(0).standard_normal((50, 3)).astype(np.float32)
  mu, sigma = frechet.feature_statistics(features)
  assert mu.dtype == sigma.dtype == np.float64
  np.testing.assert_allclose(mu, features.mean(axis=0), rtol=1e-6)
  np.testing.assert_allclose(sigma, np.cov(features.T), rtol=1e-6)


def test_shipped_classifier_is_named_by_its_params_and_accurate(extractor, digits, monkeypatch):
  shipped = pathlib.Path(digits_classifier.__file__).parent / "weights"
  payload = (shipped / f"digits_classifier_{IMAGE_SIZE}px_v1.msgpack").read_bytes()
  assert extractor.name == f"digits_cnn_v1_{IMAGE_SIZE}px_{hashlib.sha256(payload).hexdigest()[:8]}"
  assert extractor.accuracy(digits.heldout, digits.heldout_labels) >= 0.95
  monkeypatch.setattr(digits_classifier.DigitsFeatureExtractor, "_train", _fail_to_train)
  assert digits_classifier.DigitsFeatureExtractor(IMAGE_SIZE).name == extractor.name


def test_unshipped_size_is_trained_once_then_loaded_from_the_cache(tmp_path, monkeypatch):
  digits8 = _digits(8)
  trained = digits_classifier.DigitsFeatureExtractor(8, cache_dir=str(tmp_path))
  path = tmp_path / "digits_classifier_8px_v1.msgpack"
  assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left
  assert trained.name == f"digits_cnn_v1_8px_{hashlib.sha256(path.read_bytes()).hexdigest()[:8]}"
  assert trained.accuracy(digits8.heldout, digits8.heldout_labels) >= 0.9

  monkeypatch.setattr(digits_classifier.DigitsFeatureExtractor, "_train", _fail_to_train)
  reloaded = digits_classifier.DigitsFeatureExtractor(8, cache_dir=str(tmp_path))
  features = trained.features(digits8.heldout)
  assert features.shape == (len(digits8.heldout), digits_classifier.FEATURE_DIM)
  assert features.dtype == np.float64
  assert reloaded.name == trained.name
  np.testing.assert_array_equal(reloaded.features(digits8.heldout), features)


def test_features_reject_other_image_sizes(extractor):
  with pytest.raises(ValueError, match=r"16x16x1.*8x8x1"):
    extractor.features(np.zeros((2, 8, 8, 1), np.float32))


def test_digits_fid_orders_real_above_noise(extractor, digits):
  heldout = digits.heldout
  half = len(heldout) // 2
  real = digits_fid.digits_fid(heldout[:half], heldout[half:], extractor)
  noise_images = np.random.default_rng(0).uniform(-1, 1, heldout.shape).astype(np.float32)
  noise = digits_fid.digits_fid(noise_images, heldout, extractor)
  assert set(real) == {"fid", "num_samples", "feature_extractor"}
  assert real["num_samples"] == half
  assert real["feature_extractor"] == extractor.name
  assert 0 < real["fid"] and noise["fid"] > 10 * real["fid"]


def test_digits_fid_clips_samples(extractor, digits):
  samples = 3.0 * digits.heldout[:50]
  clipped = digits_fid.digits_fid(np.clip(samples, -1, 1), digits.heldout, extractor)
  assert digits_fid.digits_fid(samples, digits.heldout, extractor) == clipped


def test_digits_fid_needs_two_samples(extractor, digits):
  with pytest.raises(ValueError, match="at least 2"):
    digits_fid.digits_fid(digits.heldout[:1], digits.heldout, extractor)


def _noisy_digits(images: np.ndarray, num: int, rng: np.random.Generator) -> np.ndarray:
  """`num` of `images` with Gaussian noise: fake samples, neither perfect nor hopeless."""
  picked = images[rng.integers(0, len(images), num)]
  return np.clip(picked + 0.3 * rng.standard_normal(picked.shape), -1, 1).astype(np.float32)


@pytest.fixture(scope="module")
def metrics(extractor, digits):
  samples = _noisy_digits(digits.train, 300, np.random.default_rng(0))
  return samples, digits_fid.digits_metrics(
    samples, digits.heldout, digits.train, extractor, seed=5
  )


def test_digits_metrics_keep_the_held_out_fid_and_add_the_rest(metrics, extractor, digits):
  samples, result = metrics
  assert set(result) == {
    "fid",
    "fid_all",
    "fid_ci",
    "kid_x1e3",
    "kid_std_x1e3",
    "kid_subset_size",
    "num_samples",
    "feature_extractor",
  }
  assert result["fid"] == digits_fid.digits_fid(samples, digits.heldout, extractor)["fid"]
  whole = np.concatenate([digits.train, digits.heldout])
  assert result["fid_all"] == pytest.approx(
    digits_fid.digits_fid(samples, whole, extractor)["fid"], rel=1e-9
  )
  assert abs(result["fid_all"] - result["fid"]) > 0.01 * result["fid"]
  # Noisy digits are measurably not digits; KID x 1e3, in subsets of all 300 samples.
  assert result["kid_x1e3"] > 3 * result["kid_std_x1e3"] > 0 and result["kid_subset_size"] == 300
  features = extractor.features(samples), extractor.features(digits.heldout)
  assert result["kid_x1e3"] == pytest.approx(1e3 * kid.kid(*features, seed=5)["kid"], rel=1e-9)
  assert (result["num_samples"], result["feature_extractor"]) == (300, extractor.name)


def test_fid_bootstrap_interval_holds_the_estimate_and_follows_the_seed(metrics, extractor, digits):
  samples, result = metrics
  low, high = result["fid_ci"]
  assert low < result["fid"] < high
  again = digits_fid.digits_metrics(samples, digits.heldout, digits.train, extractor, seed=5)
  other = digits_fid.digits_metrics(samples, digits.heldout, digits.train, extractor, seed=6)
  assert again == result
  assert other["fid_ci"] != result["fid_ci"] and other["fid"] == result["fid"]


def test_frechet_distance_interval_matches_its_definition():
  rng = np.random.default_rng(0)
  features, reference = rng.standard_normal((40, 3)), rng.standard_normal((80, 3)) + 0.5
  reference_stats = frechet.feature_statistics(reference)
  interval = bootstrap.frechet_distance_interval(features, *reference_stats, num_draws=50, seed=3)
  draws = np.random.default_rng(3)
  distances = [
    frechet.frechet_distance(
      *frechet.feature_statistics(features[draws.integers(0, 40, 40)]), *reference_stats
    )
    for _ in range(50)
  ]
  np.testing.assert_allclose(interval, np.percentile(distances, [2.5, 97.5]), rtol=1e-12)
  with pytest.raises(ValueError, match="num_draws >= 2"):
    bootstrap.frechet_distance_interval(features, *reference_stats, num_draws=1)


class _RecordingWriter:
  """The two MetricWriter methods evaluate_sampler calls; keeps the scalars."""

  def __init__(self):
    self.scalars = {}

  def write_scalars(self, step, scalars):
    self.scalars.update(scalars)

  def write_images(self, step, images):
    del step, images


def test_evaluate_sampler_reports_every_digits_score_and_follows_eval_seed(
  digits, tmp_path, caplog
):
  config = digits_config.get_config("smoke")
  config.eval.num_samples = 96
  config.eval.cache_dir = str(tmp_path / "cache")
  drawn = []

  def sampler(params, rng, num):  # Noisy training digits chosen by the noise key.
    seed = int(jax.random.randint(rng, (), 0, 2**31 - 1))
    drawn.append(_noisy_digits(digits.train, num, np.random.default_rng(seed)))
    return drawn[-1]

  def run(seed):
    config.eval.seed = seed
    writer = _RecordingWriter()
    result = evaluator.evaluate_sampler("m", sampler, None, config, digits, str(tmp_path), writer)
    samples = np.concatenate(drawn)
    drawn.clear()
    return result, writer.scalars, samples

  with caplog.at_level(logging.INFO):
    result, scalars, samples = run(1234)
  assert {"fid", "fid_all", "fid_ci", "kid_x1e3", "kid_std_x1e3", "sampler"} <= set(result)
  low, high = result["fid_ci"]
  assert scalars == {
    "m/digits_fid": result["fid"],
    "m/digits_fid_all": result["fid_all"],
    "m/digits_fid_ci_low": low,
    "m/digits_fid_ci_high": high,
    "m/digits_kid_x1e3": result["kid_x1e3"],
    "m/digits_kid_std_x1e3": result["kid_std_x1e3"],
  }
  # 96 samples: enough for FID (65), not for KID's subsets of 359 (the held-out split); the
  # smoke config allows few samples, so the result and the log line say so.
  assert result["num_samples"] == 96 and result["feature_dims"] == {"fid": 64, "kid": 64}
  assert result["min_samples"] == {"fid": 65, "kid": 359} and result["reliable"] is False
  assert result["unreliable"] == [
    "KID needs at least 359 samples (its subset size, min(1,000, 359 reference rows)), got 96"
  ]
  (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("m evaluation")]
  assert f"fid {result['fid']:.4g}" in line and line.endswith(
    "; UNRELIABLE: " + result["unreliable"][0]
  )
  same, _, same_samples = run(1234)
  other, _, other_samples = run(7)
  np.testing.assert_array_equal(same_samples, samples)
  assert same == result
  assert samples.shape == other_samples.shape and not np.array_equal(other_samples, samples)
  assert other["fid"] != result["fid"]


def test_steady_digits_variant_scores_the_measured_sample_count():
  """configs/digits.py:steady: the job unchanged but eval.num_samples (BENCHMARKS.md's choice)."""
  default, steady = digits_config.get_config(), digits_config.get_config("steady")
  validate_config(steady)
  assert steady.eval.num_samples == digits_config.STEADY_NUM_SAMPLES == 16_384
  assert steady.eval.num_samples % steady.eval.batch_size == 0
  steady.eval.num_samples, steady.eval.batch_size = (
    default.eval.num_samples,
    default.eval.batch_size,
  )
  assert steady.to_dict() == default.to_dict()
  with pytest.raises(ValueError, match="use 'smoke', 'steady' or nothing"):
    digits_config.get_config("noisy")


def test_the_default_digits_job_scores_enough_samples_and_the_smoke_jobs_allow_few(digits):
  """configs/digits.py scores 512 samples: more than FID's 64 dimensions and KID's subset of the
  359 held-out digits. The smoke variants score 8 or 32 and allow it; the full jobs do not."""
  default = evaluator.check_sample_counts(digits_config.get_config(), digits)
  assert default == {
    "reliable": True,
    "unreliable": [],
    "min_samples": {"fid": 65, "kid": 359},
    "feature_dims": {"fid": 64, "kid": digits_classifier.FEATURE_DIM},
  }
  assert len(digits.heldout) == 359 and digits_classifier.FEATURE_DIM == 64
  smoke = digits_config.get_config("smoke")
  assert (
    smoke.eval.allow_few_samples and not evaluator.check_sample_counts(smoke, digits)["reliable"]
  )
  for name in ("lsun_bedrooms", "lsun_churches", "ffhq"):
    module = importlib.import_module(f"configs.{name}")
    assert module.get_config("smoke").eval.allow_few_samples is True
    assert module.get_config().eval.allow_few_samples is False
  assert cifar_config.get_config().eval.allow_few_samples is False


def test_too_few_eval_samples_are_refused_in_one_line_naming_metric_count_minimum_and_fix(digits):
  config = digits_config.get_config("smoke")
  config.eval.allow_few_samples = False
  with pytest.raises(minimums.FewSamplesError) as excinfo:
    evaluator.check_sample_counts(config, digits)
  message = str(excinfo.value)
  assert "\n" not in message
  assert message.startswith(
    "too few samples to score: FID needs at least 65 samples (more than its 64 feature "
    "dimensions, else the covariance is singular), got 32; KID needs at least 359 samples"
  )
  assert message.endswith(
    "pass --config.eval.allow_few_samples=True to score them anyway (the result is then marked "
    "unreliable)"
  )


def test_the_inception_job_needs_more_samples_and_reference_images_than_2048_dimensions():
  config = cifar_config.get_config()
  train = types.SimpleNamespace(train=np.zeros((50_000, 1), np.uint8))
  scores = evaluator.check_sample_counts(config, train)
  assert scores["reliable"] and scores["feature_dims"] == {
    "fid": 2048,
    "sfid": 2023,
    "kid": 2048,
    "precision_recall": 2048,
  }
  assert scores["min_samples"] == {"fid": 2049, "sfid": 2024, "kid": 1000, "precision_recall": 4}
  config.eval.num_samples = 2048
  with pytest.raises(
    minimums.FewSamplesError, match=r"FID needs at least 2,049 samples .*got 2,048: "
  ):
    evaluator.check_sample_counts(config, train)
  config.eval.num_samples = 50_000
  few_real = types.SimpleNamespace(train=np.zeros((2000, 1), np.uint8))  # A small folder.
  config.eval.allow_few_samples = True
  scores = evaluator.check_sample_counts(config, few_real)
  assert scores["unreliable"] == [
    "FID needs at least 2,049 reference images (more than its 2,048 feature dimensions, else the "
    "covariance is singular), got 2,000",
    "sFID needs at least 2,024 reference images (more than its 2,023 feature dimensions, else the "
    "covariance is singular), got 2,000",
  ]


def test_the_job_refuses_too_few_eval_samples_before_sampling_or_training(digits, tmp_path):
  config = digits_config.get_config("smoke")
  config.eval.allow_few_samples = False

  def sampler(params, rng, num):
    raise AssertionError("refused before drawing any sample")

  writer = _RecordingWriter()
  with pytest.raises(minimums.FewSamplesError, match="got 32"):
    evaluator.evaluate_sampler("m", sampler, None, config, digits, str(tmp_path), writer)
  workdir = tmp_path / "work"
  with pytest.raises(minimums.FewSamplesError, match="--config.eval.allow_few_samples=True"):
    pipeline.run(config, str(workdir))
  assert not (workdir / "teacher").exists()  # Before any training.


def test_eval_allow_few_samples_must_be_a_bool():
  config = digits_config.get_config()
  with config.ignore_type():
    config.eval.allow_few_samples = "yes"
  with pytest.raises(
    ConfigError, match=r"config.eval.allow_few_samples='yes': expected True or False"
  ):
    validate_config(config)
