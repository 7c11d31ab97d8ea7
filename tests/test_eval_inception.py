"""The job's `eval.metric='inception'`: resumable eval shards, every metric in eval.json, fail fast.

A CIFAR-10-shaped job (32x32x3, a tiny UNet, 0 teacher steps) on mocked tfds CIFAR-10 (8 random
images per split) and random Inception weights saved in our format (test_score's fixture).
"""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from binarydm_jax.evaluation import evaluator, inception, minimums
from binarydm_jax.sampling.sample_shards import shard_path
from binarydm_jax.training import pipeline
from configs import cifar
from tests.test_export import one_line
from tests.test_score import weights_dir  # noqa: F401 (a fixture)

NUM = 8


def tiny_cifar_config(tmp_path, inception_dir):
  config = cifar.get_config()
  config.data.data_dir = str(tmp_path / "tfds")
  config.model.update(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,))
  config.model.update(norm_groups=8, dropout=0.0)
  config.training.num_steps = 0  # The initial params: the evaluation is what is tested.
  config.qat.method = "fp"
  config.sampling.update(ddim_steps=2, grid_size=NUM)
  config.eval.update(num_samples=NUM, batch_size=NUM, inception_dir=str(inception_dir))
  config.eval.allow_few_samples = True  # 8 samples: scored, marked unreliable.
  config.eval.cache_dir = str(tmp_path / "cache")
  return config


@pytest.fixture
def mocked_cifar10(tmp_path):
  """tfds CIFAR-10 under tmp_path/tfds: metadata written (counts as prepared), random images."""
  builder = tfds.builder("cifar10", data_dir=str(tmp_path / "tfds"))
  builder.data_path.mkdir(parents=True)
  builder.info.write_to_directory(builder.data_path)
  with tfds.testing.mock_data(num_examples=NUM, data_dir=str(tmp_path / "tfds")):
    yield


@pytest.mark.slow
def test_the_job_scores_inception_metrics_and_resumes_its_shards(
  weights_dir,  # noqa: F811
  mocked_cifar10,
  tmp_path,
  monkeypatch,
):
  monkeypatch.setattr(inception, "WEIGHTS_SHA256", "ab" * 32)  # Take the random weights.
  monkeypatch.setattr(evaluator, "SHARD_SIZE", NUM // 2)
  config = tiny_cifar_config(tmp_path, weights_dir)
  workdir = tmp_path / "work"
  results = pipeline.run(config, str(workdir))
  scores = json.loads((workdir / "eval.json").read_text())["teacher"]
  assert scores == json.loads(json.dumps(results["teacher"]))
  metrics = evaluator.INCEPTION_SCALARS
  assert "kid_x1e3" in metrics and all(np.isfinite(scores[key]) for key in metrics)
  assert scores["reliable"] is False and scores["min_samples"]["fid"] == 2049
  assert scores["unreliable"][0].startswith("FID needs at least 2,049 samples")
  assert scores["fid"] > 0 and 1 <= scores["inception_score"] <= inception.NUM_CLASSES
  assert scores["feature_extractor"] == "inception_2015_12_05_abababab"
  assert scores["feature_extractor_sha256"] == "ab" * 32
  assert scores["num_samples"] == NUM and scores["sampler"] == "ddim2"
  generation = scores["generation"]
  assert generation["model"] == "teacher (step 0)" and generation["drawn"] == 2
  assert (generation["sampler"], generation["ddim_steps"], generation["eta"]) == ("ddim", 2, 0.0)
  assert (generation["num_samples"], generation["seed"]) == (NUM, config.eval.seed)
  assert scores["reference"]["dataset"] == "cifar10" and scores["reference"]["num_images"] == NUM
  assert (
    tmp_path / "cache" / "reference" / "ref_cifar10_inception_2015_12_05_abababab.npz"
  ).is_file()
  assert (workdir / "samples" / "teacher_final.png").is_file()

  # A preempted evaluation: one shard lost. The rerun draws only it and scores the same samples.
  shard_path(generation["dir"], 1).unlink()
  again = pipeline.run(config, str(workdir))["teacher"]
  assert again["generation"]["drawn"] == 1
  assert {k: again[k] for k in metrics} == {k: scores[k] for k in metrics}


def test_too_few_eval_samples_stop_the_inception_job_before_training(
  weights_dir,  # noqa: F811
  mocked_cifar10,
  tmp_path,
  monkeypatch,
):
  monkeypatch.setattr(inception, "WEIGHTS_SHA256", "ab" * 32)  # Take the random weights.
  config = tiny_cifar_config(tmp_path, weights_dir)
  config.eval.allow_few_samples = False
  workdir = tmp_path / "work"
  with pytest.raises(minimums.FewSamplesError) as excinfo:
    pipeline.run(config, str(workdir))
  message = one_line(excinfo)
  assert "FID needs at least 2,049 samples" in message and "got 8" in message
  assert "--config.eval.allow_few_samples=True" in message
  assert not (workdir / "teacher").exists()


def test_missing_weights_stop_the_job_before_any_work(tmp_path, mocked_cifar10):
  config = tiny_cifar_config(tmp_path, tmp_path / "absent")
  with pytest.raises(inception.InceptionError) as excinfo:
    pipeline.run(config, str(tmp_path / "work"))
  message = one_line(excinfo)
  assert inception.WEIGHTS_URL in message and f"--out={tmp_path / 'absent'}" in message
  assert not (tmp_path / "work").exists()  # Checked before the workdir, data or training.
