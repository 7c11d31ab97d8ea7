"""The FID Inception, its converter and the standard metrics against the reference implementations.

The real weights cannot be downloaded here, so one randomly initialised torch-fidelity state dict,
saved as a .pth, serves both sides: torch-fidelity 0.4.0's FeatureExtractorInceptionV3 reads it,
our converter converts it (with allow_other_weights) and both networks see the same images.
"""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import scipy.linalg
import torch

from binarydm_jax.convert import inception as convert_inception
from binarydm_jax.evaluation import inception, metrics, precision_recall
from binarydm_jax.evaluation.tf1_resize import resize_bilinear_tf1
from tests import torch_fidelity_compat

ROOT = pathlib.Path(__file__).resolve().parents[1]


def max_relative_error(ours, reference):
  """max |ours - reference| relative to max |reference|."""
  return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


@pytest.fixture(scope="module")
def torch_fidelity_inception():
  return torch_fidelity_compat.import_module("feature_extractor_inceptionv3")


@pytest.fixture(scope="module")
def random_pth(tmp_path_factory):
  """A torch-fidelity InceptionV3 state dict with random convs and batch-norm statistics."""
  _, state_dict = torch_fidelity_compat.random_inception()
  path = tmp_path_factory.mktemp("weights") / "random-inception.pth"
  torch.save(state_dict, path)
  return path


@pytest.fixture(scope="module")
def converted(random_pth, tmp_path_factory):
  out = tmp_path_factory.mktemp("converted") / "inception"
  return convert_inception.convert_pth(random_pth, out, allow_other_weights=True)


@pytest.fixture(scope="module")
def extractor(converted):
  return inception.load_inception(converted, allow_other_weights=True)


def assert_one_line_error(excinfo, *parts):
  message = str(excinfo.value)
  assert "\n" not in message, message
  for part in parts:
    assert part in message, message


@pytest.mark.parametrize(("in_size", "out_size"), [((32, 32), (299, 299)), ((17, 40), (23, 11))])
def test_tf1_resize_matches_torch_fidelity(in_size, out_size):
  resize = torch_fidelity_compat.import_module("interpolate_compat_tensorflow")
  images = np.random.default_rng(0).integers(0, 256, (2, *in_size, 3)).astype(np.float32)
  ours = np.asarray(resize_bilinear_tf1(jax.numpy.asarray(images), out_size))
  theirs = resize.interpolate_bilinear_2d_like_tensorflow1x(
    torch.from_numpy(images).permute(0, 3, 1, 2), size=out_size, align_corners=False
  )
  np.testing.assert_allclose(ours, theirs.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-4)
  # jax.image.resize (half-pixel centres) is a different image: why the TF1 kernel is needed.
  half_pixel = jax.image.resize(images, (2, *out_size, 3), "bilinear", antialias=False)
  assert np.max(np.abs(np.asarray(half_pixel) - ours)) > 10


@pytest.mark.parametrize(("size", "count"), [(32, 4), (299, 3)])
def test_inception_matches_torch_fidelity(
  size, count, random_pth, extractor, torch_fidelity_inception
):
  reference = torch_fidelity_inception.FeatureExtractorInceptionV3(
    "inception-v3-compat",
    ["2048", "logits_unbiased", "logits"],
    feature_extractor_weights_path=str(random_pth),
  )
  captured = {}
  reference.Mixed_6d.branch1x1.register_forward_hook(
    lambda module, inputs, output: captured.update(mixed_6_conv=output)
  )
  images = np.random.default_rng(size).integers(0, 256, (count, size, size, 3), dtype=np.uint8)
  with torch.no_grad():
    pool, logits_unbiased, logits = reference(torch.from_numpy(images).permute(0, 3, 1, 2))
  spatial = captured["mixed_6_conv"][:, :7].permute(0, 2, 3, 1).reshape(count, -1)

  ours = extractor(images, batch_size=count - 1)  # Two batches, the last one padded.
  expected = {
    "pool": (pool, (count, 2048)),
    "spatial": (spatial, (count, 2023)),
    "logits_unbiased": (logits_unbiased, (count, 1008)),
    "logits": (logits, (count, 1008)),
  }
  for name, (theirs, shape) in expected.items():
    value = getattr(ours, name)
    assert value.shape == shape and value.dtype == np.float32, name
    assert max_relative_error(value, theirs.numpy()) < 1e-4, name
  assert np.std(ours.spatial) > 0.1 and np.ptp(ours.logits, axis=1).min() > 1  # Not degenerate.
  assert not np.allclose(ours.logits, ours.logits_unbiased)


def test_converter_cli_writes_what_load_inception_reads(random_pth, converted, tmp_path):
  out = tmp_path / "cli"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "binarydm_jax.convert.inception",
      f"--pth={random_pth}",
      f"--out={out}",
      "--allow_other_weights",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr
  assert str(out) in proc.stdout
  written = (out / inception.PARAMS_NAME).read_bytes()
  assert written == (converted / inception.PARAMS_NAME).read_bytes()
  meta = json.loads((out / inception.META_NAME).read_text())
  assert meta["source_sha256"] == inception.file_sha256(random_pth)
  assert meta["source_file"] == random_pth.name


def test_converter_refuses_missing_or_other_files_and_bad_state_dicts(random_pth, tmp_path):
  with pytest.raises(inception.InceptionError) as excinfo:
    convert_inception.convert_pth(tmp_path / "nope.pth", tmp_path / "out")
  assert_one_line_error(excinfo, "no file", inception.WEIGHTS_URL)
  with pytest.raises(inception.InceptionError) as excinfo:
    convert_inception.convert_pth(random_pth, tmp_path / "out")
  assert_one_line_error(excinfo, inception.WEIGHTS_SHA256, "--allow_other_weights")
  assert not (tmp_path / "out").exists()

  state_dict = convert_inception.read_pth(random_pth)
  for broken, problem in (
    ({**state_dict, "AuxLogits.fc.weight": np.zeros((3, 3))}, "left-over tensors"),
    ({k: v for k, v in state_dict.items() if k != "Mixed_7c.branch_pool.bn.running_var"}, "bn"),
    ({k: v for k, v in state_dict.items() if not k.startswith("Mixed_7c.")}, "missing Mixed_7c"),
    ({**state_dict, "fc.bias": np.zeros(1000)}, "fc/bias: shape (1000,)"),
  ):
    with pytest.raises(inception.InceptionError) as excinfo:
      convert_inception.convert_state_dict(broken)
    assert_one_line_error(excinfo, problem)


def test_load_inception_errors_say_where_to_get_the_weights(random_pth, converted, tmp_path):
  with pytest.raises(inception.InceptionError) as excinfo:
    inception.load_inception(tmp_path / "absent")
  assert_one_line_error(
    excinfo, inception.WEIGHTS_URL, "python -m binarydm_jax.convert.inception", str(tmp_path)
  )
  with pytest.raises(inception.InceptionError) as excinfo:
    inception.load_inception(random_pth)
  assert_one_line_error(excinfo, "convert it once", f"--pth={random_pth}")
  with pytest.raises(inception.InceptionError) as excinfo:
    inception.load_inception(converted)  # Random weights: not the FID Inception's hash.
  assert_one_line_error(excinfo, inception.WEIGHTS_SHA256, inception.WEIGHTS_URL)

  corrupt = tmp_path / "corrupt"
  corrupt.mkdir()
  (corrupt / inception.META_NAME).write_text((converted / inception.META_NAME).read_text())
  payload = bytearray((converted / inception.PARAMS_NAME).read_bytes())
  payload[-1] ^= 1
  (corrupt / inception.PARAMS_NAME).write_bytes(bytes(payload))
  with pytest.raises(inception.InceptionError) as excinfo:
    inception.load_inception(corrupt, allow_other_weights=True)
  assert_one_line_error(excinfo, "corrupt", "convert the .pth again")


def test_extractor_rejects_images_it_cannot_score(extractor):
  with pytest.raises(ValueError, match="uint8.*np.clip"):
    extractor(np.zeros((2, 32, 32, 3), np.float32))
  with pytest.raises(ValueError, match=r"\(N >= 1, H, W, 3\).*np.repeat"):
    extractor(np.zeros((2, 32, 32, 1), np.uint8))


def scipy_frechet(features_1, features_2):
  """pytorch-fid's / ADM's FID formula (scipy.linalg.sqrtm of sigma1 @ sigma2)."""
  mu1, mu2 = features_1.mean(0), features_2.mean(0)
  sigma1, sigma2 = np.cov(features_1, rowvar=False), np.cov(features_2, rowvar=False)
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
  diff = mu1 - mu2
  return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


@pytest.mark.parametrize(("n", "dim"), [(300, 32), (1200, 256)])
def test_fid_matches_scipy_sqrtm_and_torch_fidelity(n, dim):
  fid_module = torch_fidelity_compat.import_module("metric_fid")
  rng = np.random.default_rng(dim)
  mixing = rng.standard_normal((dim, dim)) / np.sqrt(dim)
  features_1 = np.maximum(rng.standard_normal((n, dim)) @ mixing + 1.0, 0).astype(np.float32)
  features_2 = np.maximum(rng.standard_normal((n, dim)) @ mixing + 1.1, 0).astype(np.float32)
  ours = metrics.fid(features_1, features_2)
  assert ours > 1.0
  assert abs(ours - scipy_frechet(features_1, features_2)) <= 1e-6 * ours
  stats = [
    fid_module.fid_features_to_statistics(torch.from_numpy(f)) for f in (features_1, features_2)
  ]
  theirs = fid_module.fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
  assert abs(ours - theirs) <= 1e-6 * ours
  assert metrics.fid(features_1, features_1) == pytest.approx(0.0, abs=1e-6)


def test_inception_score_matches_torch_fidelity_and_adm():
  isc = torch_fidelity_compat.import_module("metric_isc")
  rng = np.random.default_rng(0)
  logits = (rng.standard_normal((200, 1008)) * 3).astype(np.float32)
  ours = metrics.inception_score(logits, split_size=20)
  theirs = isc.isc_features_to_metric(torch.from_numpy(logits), splits=10, shuffle=False)
  assert ours == pytest.approx(theirs["inception_score_mean"], rel=1e-12)
  assert 1.5 < ours < 1008
  # torch-fidelity's default shuffles the samples (seed 2020) before splitting.
  shuffled = logits[np.random.RandomState(2020).permutation(len(logits))]
  theirs = isc.isc_features_to_metric(torch.from_numpy(logits))["inception_score_mean"]
  assert metrics.inception_score(shuffled, split_size=20) == pytest.approx(theirs, rel=1e-12)

  # ADM's compute_inception_score in float32 numpy, with a shorter last split.
  logits = logits[:190]
  exp = np.exp(logits - logits.max(axis=1, keepdims=True))
  preds = exp / exp.sum(axis=1, keepdims=True)
  scores = []
  for start in range(0, len(preds), 50):
    part = preds[start : start + 50]
    kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
    scores.append(np.exp(np.mean(np.sum(kl, 1))))
  assert metrics.inception_score(logits, split_size=50) == pytest.approx(np.mean(scores), rel=1e-5)
  with pytest.raises(ValueError, match="split_size"):
    metrics.inception_score(logits[0])


def numpy_precision_recall(ref, sample, k):
  """Improved precision/recall from full float64 squared-distance matrices."""

  def squared(a, b):
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

  ref_radii = np.sort(squared(ref, ref), axis=1)[:, k]
  sample_radii = np.sort(squared(sample, sample), axis=1)[:, k]
  precision = np.mean(np.any(squared(sample, ref) <= ref_radii[None, :], axis=1))
  recall = np.mean(np.any(squared(ref, sample) <= sample_radii[None, :], axis=1))
  return precision, recall, ref_radii


def test_precision_recall_matches_numpy_and_torch_fidelity():
  prc = torch_fidelity_compat.import_module("metric_prc")
  rng = np.random.default_rng(0)
  ref = rng.standard_normal((300, 16))
  sample = rng.standard_normal((250, 16)) * 0.8 + 0.5
  precision, recall, radii = numpy_precision_recall(ref, sample, k=3)
  assert 0.05 < precision < 0.95 and 0.05 < recall < 0.95 and precision != recall

  np.testing.assert_allclose(precision_recall.manifold_radii(ref, 3, 64), radii, rtol=1e-5)
  for batch_size in (64, 1000):
    assert precision_recall.precision_recall(ref, sample, 3, batch_size) == (precision, recall)
  theirs = prc.prc_features_to_metric(
    torch.from_numpy(sample), torch.from_numpy(ref), prc_neighborhood=3, verbose=False
  )
  assert (theirs["precision"], theirs["recall"]) == pytest.approx((precision, recall), abs=1e-7)
  with pytest.raises(ValueError, match="N >= k \\+ 1 = 4"):
    precision_recall.precision_recall(ref[:3], sample)
  with pytest.raises(ValueError, match="same layer"):
    precision_recall.precision_recall(ref, sample[:, :8])
