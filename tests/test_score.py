"""Scoring samples: reference caching, the Inception metrics, bad input, the CLIs end to end."""

import hashlib
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from PIL import Image

from binarydm_jax.evaluation import evaluator, inception, minimums, reference, score
from binarydm_jax.evaluation.metrics import fid
from binarydm_jax.evaluation.score import check_samples, reference_cache_label, score_inception
from binarydm_jax.models.unet import unet_from_config
from binarydm_jax.sampling.sample_shards import SamplesError, load_samples
from binarydm_jax.training.train_state import create_train_state
from tests.test_export import one_line, run_module, save_stage, tiny_config

NUM = 8  # Images per Inception call (one compiled shape).


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
  """Random FID-Inception weights (He-scaled normal kernels) saved with the project's saver."""
  rng = np.random.default_rng(0)

  def leaf(path, shape):
    if path[-1].key == "bias":
      return np.zeros(shape.shape, np.float32)
    fan_in = int(np.prod(shape.shape[:-1]))
    return rng.normal(0.0, np.sqrt(2.0 / fan_in), shape.shape).astype(np.float32)

  params = jax.tree.map_with_path(leaf, inception.abstract_params())
  out = tmp_path_factory.mktemp("weights") / "inception"
  return inception.save_inception(out, params, source_name="random", source_sha256="ab" * 32)


@pytest.fixture(scope="module")
def extractor(weights_dir):
  return inception.load_inception(weights_dir, allow_other_weights=True)


def images(seed, num=NUM):
  return np.random.default_rng(seed).integers(0, 256, (num, 8, 8, 3), dtype=np.uint8)


@pytest.mark.slow
def test_cifar10_metrics_against_a_cached_reference(extractor, tmp_path):
  real = images(0)
  ref, path = reference.cached_reference("cifar10", extractor, lambda: real, tmp_path)
  assert path.name == f"ref_cifar10_{extractor.name}.npz" and extractor.name.endswith("abababab")
  assert ref["pool"].shape == (NUM, 2048) and ref["num_images"] == NUM

  def no_images():
    raise AssertionError("the cached reference must be reused")

  cached, _ = reference.cached_reference("cifar10", extractor, no_images, tmp_path)
  np.testing.assert_array_equal(cached["sigma_s"], ref["sigma_s"])
  same = score_inception(real, cached, extractor)
  assert same["precision"] == same["recall"] == 1.0
  other = score_inception(images(1), cached, extractor)
  # The cached pool features are all 8 (under the 10,000 cap): FID from them directly.
  assert other["fid"] == pytest.approx(fid(extractor(images(1)).pool, cached["pool"]), rel=1e-9)
  assert abs(same["fid"]) < 1e-4 * other["fid"] and abs(same["sfid"]) < 1e-4 * other["sfid"]
  assert other["kid_x1e3"] > same["kid_x1e3"] and other["kid_subset_size"] == NUM
  assert other["num_samples"] == NUM and other["feature_extractor_sha256"] == "ab" * 32
  assert set(other) >= {"inception_score", "kid_std_x1e3"} and "kid" not in other


def test_a_reference_of_another_dataset_or_network_is_refused(extractor, tmp_path):
  ref = reference.compute_reference(images(0), "cifar10", extractor)
  reference.save_reference(tmp_path / "other_net.npz", {**ref, "network_sha256": "cd" * 32})
  reference.save_reference(tmp_path / "other_data.npz", ref)
  for path, dataset, word in [
    (tmp_path / "other_net.npz", "cifar10", "network_sha256"),
    (tmp_path / "other_data.npz", "imagenet", "dataset"),
  ]:
    with pytest.raises(reference.ReferenceStatsError) as excinfo:
      reference.load_reference(path, dataset, extractor)
    assert f"has {word}" in one_line(excinfo)


@pytest.mark.parametrize(
  "array, ref, message",
  [
    (np.zeros((8, 8, 8, 3), np.float32), "cifar10", "are float32, not uint8"),
    (np.zeros((8, 8, 8, 1), np.uint8), "cifar10", "shape (N, H, W, 3), got (8, 8, 8, 1)"),
    (np.zeros((8, 8, 8), np.uint8), "digits", "shape (N, H, W, 1)"),
    (np.zeros((3, 8, 8, 3), np.uint8), "cifar10", "k-th neighbour needs k + 1 = 4), got 3"),
    (np.zeros((1, 16, 16, 1), np.uint8), "digits", "(a covariance needs 2), got 1"),
  ],
)
def test_bad_samples_are_refused(array, ref, message):
  with pytest.raises(SamplesError) as excinfo:
    check_samples(array, ref)
  assert message in one_line(excinfo)


def test_the_cli_reports_bad_samples_in_one_line(tmp_path):
  np.savez(tmp_path / "s.npz", arr_0=np.zeros((3, 8, 8, 3), np.float64))
  result = run_module(
    "binarydm_jax.evaluate", f"--samples={tmp_path / 's.npz'}", "--ref=cifar10", "--json=x"
  )
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith("error: samples are float64")


@pytest.mark.slow
def test_cifar10_cli_end_to_end(weights_dir, tmp_path):
  np.savez(tmp_path / "real.npz", arr_0=images(0))
  np.savez(tmp_path / "samples.npz", arr_0=images(1))
  args = [
    f"--samples={tmp_path / 'samples.npz'}",
    "--ref=cifar10",
    f"--inception={weights_dir}",
    "--allow_other_weights",
    f"--ref_npz={tmp_path / 'real.npz'}",
    f"--cache_dir={tmp_path / 'cache'}",
    "--allow_few_samples",
  ]
  result = run_module("binarydm_jax.evaluate", *args, f"--json={tmp_path / 'a.json'}")
  assert result.returncode == 0, result.stderr[-2000:]
  scores = json.loads((tmp_path / "a.json").read_text())
  assert scores["num_samples"] == NUM and scores["reference"]["num_images"] == NUM
  assert scores["reliable"] is False and "UNRELIABLE: FID needs at least 2,049" in result.stdout
  assert scores["fid"] > 0 and scores["feature_extractor_sha256"] == "ab" * 32
  assert len(list((tmp_path / "cache").glob("ref_cifar10_inception_2015_12_05_abababab.npz"))) == 1

  # The same real images as --ref=images: the same scores, cached under their own hash.
  args[1] = "--ref=images"
  result = run_module("binarydm_jax.evaluate", *args, f"--json={tmp_path / 'b.json'}")
  assert result.returncode == 0, result.stderr[-2000:]
  again = json.loads((tmp_path / "b.json").read_text())
  assert again["fid"] == pytest.approx(scores["fid"]) and again["ref"] == "images"
  label = reference_cache_label("images", str(tmp_path / "real.npz"))
  assert again["reference"]["dataset"] == label
  assert (tmp_path / "cache" / f"ref_{label}_inception_2015_12_05_abababab.npz").is_file()


def test_images_reference_is_named_by_the_real_images_content(tmp_path):
  """--ref=images caches by a hash of --ref_npz's files: other images, another cache entry."""
  for name, seed in [("a.npz", 0), ("b.npz", 0), ("c.npz", 1)]:
    np.savez(tmp_path / name, arr_0=images(seed))
  label = reference_cache_label
  assert label("images", str(tmp_path / "a.npz")).startswith("images_")
  assert label("images", str(tmp_path / "a.npz")) == label("images", str(tmp_path / "b.npz"))
  assert label("images", str(tmp_path / "a.npz")) != label("images", str(tmp_path / "c.npz"))
  assert label("cifar10", None) == label("cifar10", str(tmp_path / "a.npz")) == "cifar10"
  with pytest.raises(SamplesError, match="--ref=images needs the real images: pass --ref_npz"):
    label("images", None)
  with pytest.raises(SamplesError, match="does not exist"):
    label("images", str(tmp_path / "missing.npz"))


@pytest.mark.slow
def test_digits_generate_then_evaluate(tmp_path):
  """A 16 px teacher workdir: generate 4 samples in 2 shards, then the digits metrics."""
  config = tiny_config()
  config.data.image_size = 16
  model = unet_from_config(config.model)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1)), jnp.zeros((1,), int))
  state = create_train_state(params["params"], optax.adam(1e-3), jax.random.PRNGKey(0))
  save_stage(tmp_path / "teacher", config, state, 5)
  samples = tmp_path / "samples"
  result = run_module(
    "binarydm_jax.generate",
    f"--workdir={tmp_path}",
    "--which=teacher",
    "--num_samples=4",
    "--steps=2",
    "--batch_size=8",
    "--shard_size=2",
    f"--out={samples}",
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert "shard 2/2: 4/4 images drawn" in result.stdout
  assert load_samples(samples).shape == (4, 16, 16, 1)
  out = tmp_path / "eval.json"
  result = run_module(
    "binarydm_jax.evaluate",
    f"--samples={samples}",
    "--ref=digits",
    f"--json={out}",
    "--allow_few_samples",
  )
  assert result.returncode == 0, result.stderr[-2000:]
  scores = json.loads(out.read_text())
  assert scores["num_samples"] == 4 and scores["fid"] > 0 and len(scores["fid_ci"]) == 2
  assert scores["feature_extractor"].startswith("digits_cnn_v1_16px_")
  assert scores["generation"]["ddim_steps"] == 2 and scores["generation"]["model"].startswith(
    "teacher of"
  )


def test_the_job_and_the_cli_name_references_one_way(tmp_path):
  """One cache label: CIFAR-10 at 32 px is 'cifar10' for both; other sources hash their origin
  (the labels of existing caches are kept: sha256 of the files' bytes, or of the job's origin)."""
  cifar = ml_collections.ConfigDict({"data": {"name": "cifar10"}})
  assert evaluator.reference_label(cifar, 32) == reference_cache_label("cifar10", None)
  np.savez(tmp_path / "a.npz", arr_0=images(0))
  digest = hashlib.sha256((tmp_path / "a.npz").read_bytes()).hexdigest()[:8]
  assert reference_cache_label("images", str(tmp_path / "a.npz")) == f"images_{digest}"
  folder = ml_collections.ConfigDict({"data": {"name": "folder", "data_dir": "/x"}})
  origin = json.dumps(["/x", None, None], sort_keys=True).encode()
  expected = f"folder64_{hashlib.sha256(origin).hexdigest()[:8]}"
  assert evaluator.reference_label(folder, 64) == reference.cache_label("folder64", [origin])
  assert evaluator.reference_label(folder, 64) == expected


def digit_images(num, seed=0):
  """`num` random uint8 16x16 grayscale images: the digits metrics' input (not digits)."""
  return np.random.default_rng(seed).integers(0, 256, (num, 16, 16, 1), dtype=np.uint8)


def evaluate_digits(tmp_path, num, *flags):
  np.savez(tmp_path / "s.npz", arr_0=digit_images(num))
  out = tmp_path / "out.json"
  args = [f"--samples={tmp_path / 's.npz'}", "--ref=digits", f"--json={out}", *flags]
  return run_module("binarydm_jax.evaluate", *args), out


def test_the_cli_refuses_fewer_samples_than_fid_needs_in_one_line(tmp_path):
  """3 samples once scored digits-FID 4,556 and exited 0: 3 rows of 64-d features have a
  covariance of rank 2, and the number says more about the count than about the model."""
  result, out = evaluate_digits(tmp_path, 3)
  assert result.returncode == 1 and not out.exists()
  line = result.stderr.strip().splitlines()[-1]
  assert line.startswith(
    "error: too few samples to score: FID needs at least 65 samples (more than its 64 feature "
    "dimensions, else the covariance is singular), got 3; KID needs at least 359 samples"
  )
  assert line.endswith(
    "generate more, or pass --allow_few_samples to score them anyway (the "
    "result is then marked unreliable)"
  )


def test_allowed_few_samples_are_scored_and_marked_unreliable_in_json_and_headline(tmp_path):
  result, out = evaluate_digits(tmp_path, 3, "--allow_few_samples")
  assert result.returncode == 0, result.stderr[-2000:]
  scores = json.loads(out.read_text())
  assert scores["reliable"] is False and scores["num_samples"] == 3
  assert scores["feature_dims"] == {"fid": 64, "kid": 64}
  assert scores["min_samples"] == {"fid": 65, "kid": 359}
  assert [reason.split(" (")[0] for reason in scores["unreliable"]] == [
    "FID needs at least 65 samples",
    "KID needs at least 359 samples",
  ]
  assert np.isfinite(scores["kid_x1e3"]) and scores["kid_subset_size"] == 3
  assert not {"kid", "kid_std"} & set(scores)
  line = result.stdout.strip().splitlines()[-1]
  assert (
    line.startswith(f"{out}: fid ") and "num_samples 3; UNRELIABLE: FID needs at least 65" in line
  )


def test_digits_scores_of_enough_samples_are_reliable(monkeypatch):
  scores = score.score_digits(digit_images(400))
  assert scores["reliable"] is True and scores["unreliable"] == []
  assert scores["num_samples"] == 400 and scores["kid_subset_size"] == 359
  assert "UNRELIABLE" not in minimums.headline(scores)

  def no_features(*args, **kwargs):
    raise AssertionError("too few samples are refused before any feature is computed")

  monkeypatch.setattr(score, "DigitsFeatureExtractor", no_features)
  with pytest.raises(minimums.FewSamplesError, match="got 64"):
    score.score_digits(digit_images(64))


def test_inception_scores_judge_the_samples_then_the_reference(extractor, tmp_path):
  """8 samples: refused before the reference is read or computed; allowed: scored, and every
  shortfall of the samples and of the 8-image reference listed."""

  def no_reference():
    raise AssertionError("the samples alone are too few: refused before the reference")

  with pytest.raises(minimums.FewSamplesError) as excinfo:
    score.score_against_reference(images(1), "cifar10", extractor, no_reference, tmp_path)
  message = one_line(excinfo)
  assert message.startswith(
    "too few samples to score: FID needs at least 2,049 samples (more than its 2,048 feature "
    "dimensions, else the covariance is singular), got 8; sFID needs at least 2,024 samples"
  )
  assert "pass --allow_few_samples to score them anyway" in message

  scores = score.score_against_reference(
    images(1), "cifar10", extractor, lambda: images(0), tmp_path, allow_few_samples=True
  )
  assert scores["reliable"] is False and scores["num_samples"] == NUM
  assert scores["feature_dims"] == {
    "fid": 2048,
    "sfid": 2023,
    "kid": 2048,
    "precision_recall": 2048,
  }
  # KID's subsets: min(1000, the reference's 8 pool features); precision/recall: more than k = 3.
  assert scores["min_samples"] == {"fid": 2049, "sfid": 2024, "kid": 8, "precision_recall": 4}
  assert [reason.split(" (")[0] for reason in scores["unreliable"]] == [
    "FID needs at least 2,049 samples",
    "FID needs at least 2,049 reference images",
    "sFID needs at least 2,024 samples",
    "sFID needs at least 2,024 reference images",
  ]
  # KID x 1e3 (tests/test_kid.py checks the scale) in subsets of all 8 rows.
  assert scores["kid_subset_size"] == NUM and np.isfinite(scores["kid_std_x1e3"])
  assert not {"kid", "kid_std"} & set(scores)


@pytest.mark.parametrize("case", ["empty", "images of mixed sizes"])
def test_the_cli_refuses_a_folder_without_samples_in_one_line(tmp_path, case):
  folder = tmp_path / "samples"
  folder.mkdir()
  if case == "images of mixed sizes":  # Pictures (not generate's shards), 8 and 16 px.
    Image.fromarray(images(0)[0]).save(folder / "a.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "b.png")
    expected = (
      f"error: {folder} holds 2 image file(s) (a.png, ...) but no samples_NNNNN.npz shards: "
      "samples are read from generate's shards or one .npz; pack the images, all of one size"
    )
  else:
    expected = f"error: {folder} holds no samples_NNNNN.npz shards: run generate first"
  result = run_module(
    "binarydm_jax.evaluate", f"--samples={folder}", "--ref=cifar10", f"--json={tmp_path / 'x'}"
  )
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith(expected)


def test_shards_of_mixed_image_sizes_are_refused(tmp_path):
  np.savez(tmp_path / "samples_00000.npz", arr_0=images(0))
  np.savez(tmp_path / "samples_00001.npz", arr_0=np.zeros((NUM, 16, 16, 3), np.uint8))
  with pytest.raises(SamplesError) as excinfo:
    load_samples(tmp_path)
  assert (
    one_line(excinfo) == f"the shards of {tmp_path} differ in image shape or dtype: regenerate them"
  )


def test_the_cli_refuses_a_reference_cache_of_other_inception_weights(weights_dir, tmp_path):
  """A --ref_stats cache computed with other Inception weights (sha256 cd...) than the ones that
  score the samples (ab...): refused in one line before any feature is computed."""
  np.savez(tmp_path / "s.npz", arr_0=images(1))
  other = {
    "format_version": reference._FORMAT_VERSION,
    "dataset": "cifar10",
    "network_sha256": "cd" * 32,
    "num_images": NUM,
  }
  reference.save_reference(tmp_path / "other.npz", other)
  result = run_module(
    "binarydm_jax.evaluate",
    f"--samples={tmp_path / 's.npz'}",
    "--ref=cifar10",
    f"--inception={weights_dir}",
    "--allow_other_weights",
    f"--ref_stats={tmp_path / 'other.npz'}",
    "--allow_few_samples",
    f"--json={tmp_path / 'x.json'}",
  )
  assert result.returncode == 1 and not (tmp_path / "x.json").exists()
  line = result.stderr.strip().splitlines()[-1]
  assert line.startswith(
    f"error: the reference {tmp_path / 'other.npz'} has network_sha256 '{'cd' * 32}', these "
    f"samples are scored with '{'ab' * 32}'"
  )
