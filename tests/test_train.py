"""The FP training job: sharded step, EMA, resume, checkpoint checks, NaN stop, validation, outputs.

The job tests share one digits-smoke run (`finished_job`) and a persistent XLA compilation cache, so
every program compiles once per session (the first run takes about a minute on 2 CPU cores).
"""

import dataclasses
import glob
import json
import logging
import math
import os
import re
import shutil
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf
from clu import metric_writers
from jax.experimental.compilation_cache import compilation_cache
from PIL import Image

from binarydm_jax import diffusion
from binarydm_jax.data.input_pipeline import load_dataset
from binarydm_jax.models.unet import unet_from_config
from binarydm_jax.runtime import sharding
from binarydm_jax.training import checkpointing, fp_stage, loop, optim, pipeline
from binarydm_jax.training.config_validation import ConfigError, validate_config
from binarydm_jax.training.train_state import (
  TrainState,
  create_train_state,
  ema_decay_at,
  ema_update,
)
from configs import cifar, digits

NUM_STEPS = 10


@pytest.fixture(scope="module", autouse=True)
def compilation_cache_dir(tmp_path_factory):
  """A persistent XLA cache shared by this session (test_cli.py's subprocesses use it too)."""
  path = str(tmp_path_factory.getbasetemp() / "jax_compilation_cache")
  old_dir = jax.config.jax_compilation_cache_dir
  old_min = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  compilation_cache.reset_cache()
  yield path
  jax.config.update("jax_compilation_cache_dir", old_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", old_min)
  compilation_cache.reset_cache()


def pipeline_config(tmp_path_factory, **overrides) -> ml_collections.ConfigDict:
  """`configs/digits.py:smoke` with NUM_STEPS steps, as test_cli.py runs it (same programs)."""
  config = digits.get_config("smoke")
  config.training.num_steps = NUM_STEPS
  config.training.checkpoint_every = 5
  config.sampling.grid_size = 32  # = eval.batch_size: the grids and the evaluation share a program
  config.eval.cache_dir = str(tmp_path_factory.getbasetemp() / "digits_classifier")
  if "qat" in config:  # The teacher pipeline only; QAT has its own tests.
    config.qat.method = "fp"
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value
  return config


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory):
  """One uninterrupted run of the job: (workdir, returned results)."""
  workdir = str(tmp_path_factory.mktemp("pipeline"))
  results = pipeline.run(pipeline_config(tmp_path_factory), workdir)
  return workdir, results


def _scalars(workdir: str, tag: str) -> list[tuple[int, float]]:
  """(step, value) of a scalar in every TensorBoard event file of `workdir`, in write order."""
  out = []
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == tag:
          out.append((event.step, float(tf.make_ndarray(value.tensor))))
  return out


def _checkpoint_steps(workdir: str) -> list[int]:
  stage = os.path.join(workdir, "teacher")
  return sorted(int(d) for d in os.listdir(stage) if d.isdigit())


def _restore_state(workdir: str, step: int, stage: str = "teacher") -> dict:
  with ocp.StandardCheckpointer() as checkpointer:
    state = checkpointer.restore(os.path.join(workdir, stage, str(step), "state"))
  return jax.tree.map(np.asarray, state)


def _read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


# ------------------------------------------------------------------------ the job's outputs


def test_outputs(finished_job):
  workdir, results = finished_job
  evaluation = _read_json(os.path.join(workdir, "eval.json"))
  assert evaluation == json.loads(json.dumps(results))
  teacher = evaluation["teacher"]
  assert math.isfinite(teacher["fid"]) and teacher["fid"] > 0
  assert teacher["num_samples"] == 32
  assert re.fullmatch(r"digits_cnn_v1_16px_[0-9a-f]{8}", teacher["feature_extractor"])
  assert teacher["sampler"] == "ddim5"

  assert _checkpoint_steps(workdir) == [5, 10]
  assert int(_restore_state(workdir, NUM_STEPS)["step"]) == NUM_STEPS

  pngs = sorted(os.path.basename(p) for p in glob.glob(os.path.join(workdir, "samples", "*.png")))
  assert pngs == ["teacher_0000010.png", "teacher_final.png"]
  for name in pngs:
    path = os.path.join(workdir, "samples", name)
    with Image.open(path) as image:
      image.verify()
    with Image.open(path) as image:
      # 32 grayscale 16x16 samples enlarged 4x, 6 per row (the last row part-filled), 1px borders.
      assert image.format == "PNG" and image.mode == "L" and image.size == (6 * 65 + 1, 6 * 65 + 1)
      pixels = np.asarray(image)
    assert pixels.std() > 0

  losses = _scalars(workdir, "teacher/loss")
  assert [step for step, _ in losses] == [5, 10]
  assert all(math.isfinite(v) and v > 0 for _, v in losses)
  assert _scalars(workdir, "teacher/digits_fid")[0][1] == pytest.approx(teacher["fid"], rel=1e-5)


def test_rerun_of_a_finished_run_does_not_train(finished_job, tmp_path, tmp_path_factory):
  workdir = str(tmp_path / "copy")
  shutil.copytree(finished_job[0], workdir)
  stage = os.path.join(workdir, "teacher")
  before = {d: os.stat(os.path.join(stage, d)).st_mtime_ns for d in os.listdir(stage)}
  results = pipeline.run(pipeline_config(tmp_path_factory), workdir)
  after = {d: os.stat(os.path.join(stage, d)).st_mtime_ns for d in os.listdir(stage)}
  assert after == before  # no new or rewritten checkpoint
  assert int(_restore_state(workdir, NUM_STEPS)["step"]) == NUM_STEPS
  assert [s for s, _ in _scalars(workdir, "teacher/loss")] == [5, 10]  # no new train logs
  assert results == finished_job[1]
  assert _read_json(os.path.join(workdir, "eval.json")) == json.loads(json.dumps(results))


def test_resume_reproduces_the_uninterrupted_run(finished_job, tmp_path, tmp_path_factory):
  """A run stopped after its step-5 checkpoint and restarted ends exactly like the uninterrupted one.

  The stopped run is the uninterrupted run's workdir without anything written after step 5
  (what a run killed between steps 5 and 10 leaves; orbax writes checkpoints atomically).
  """
  workdir = tmp_path / "resumed"
  shutil.copytree(os.path.join(finished_job[0], "teacher", "5"), workdir / "teacher" / "5")
  workdir = str(workdir)
  results = pipeline.run(pipeline_config(tmp_path_factory), workdir)
  assert _checkpoint_steps(workdir) == [5, 10]

  resumed, uninterrupted = (
    _restore_state(workdir, NUM_STEPS),
    _restore_state(finished_job[0], NUM_STEPS),
  )
  assert jax.tree.structure(resumed) == jax.tree.structure(uninterrupted)
  jax.tree.map(np.testing.assert_array_equal, resumed, uninterrupted)
  # Only steps 6..10 ran, and they logged the same loss; the final EMA params evaluate the same.
  losses = _scalars(workdir, "teacher/loss")
  assert losses == [_scalars(finished_job[0], "teacher/loss")[-1]]
  assert results == finished_job[1]


def test_checkpoint_of_another_model_is_refused(finished_job, tmp_path_factory):
  """Resuming the job's teacher stage with model.ch=32 fails before anything is restored or run.

  (The whole job refusing it is test_job_with_another_model_is_refused, marked slow: building the
  ch=32 state compiles a new init.)
  """
  config = pipeline_config(tmp_path_factory, **{"model.ch": 32})
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1}))
  stage = _toy_stage(os.path.join(finished_job[0], "teacher"), NUM_STEPS + 5, None)
  with pytest.raises(
    checkpointing.CheckpointMismatchError, match=r"model\.ch: checkpoint 16 vs config 32"
  ):
    loop.run_stage(stage, None, config, None, mesh, _Recorder())
  assert _checkpoint_steps(finished_job[0]) == [5, 10]


@pytest.mark.slow
def test_job_with_another_model_is_refused(finished_job, tmp_path, tmp_path_factory):
  workdir = str(tmp_path / "copy")
  shutil.copytree(finished_job[0], workdir)
  config = pipeline_config(tmp_path_factory, **{"model.ch": 32})
  with pytest.raises(checkpointing.CheckpointMismatchError, match=r"model\.ch: checkpoint 16"):
    pipeline.run(config, workdir)
  assert _checkpoint_steps(workdir) == [5, 10]


class _NaNFrom:
  """The digits dataset, with NaN images in the batches of steps >= `step` (0-based)."""

  def __init__(self, dataset, step):
    self._dataset, self._step = dataset, step
    self.train, self.heldout = dataset.train, dataset.heldout

  def batch(self, step, *args, **kwargs):
    batch = self._dataset.batch(step, *args, **kwargs)
    return batch * np.nan if step >= self._step else batch


@pytest.mark.slow  # 15 s: a whole job; the loop-level NaN test below stays in the default suite.
def test_nan_loss_stops_before_saving(tmp_path, tmp_path_factory, monkeypatch):
  nan_step = 2  # the 3rd step; its loss is summarised at step 4 (checkpoint_every = 2)
  monkeypatch.setattr(
    pipeline, "load_dataset", lambda cfg, **kw: _NaNFrom(load_dataset(cfg, **kw), nan_step)
  )
  config = pipeline_config(tmp_path_factory, **{"training.checkpoint_every": 2})
  workdir = str(tmp_path)
  with pytest.raises(
    loop.NonFiniteLossError, match="loss is nan at step 4.*last checkpoint: step 2"
  ):
    pipeline.run(config, workdir)
  # The checkpoint before the NaN is complete (its async save was committed), none after it,
  # not even a partial (orbax temporary) one; the project's restore resumes from it.
  assert os.listdir(os.path.join(workdir, "teacher")) == ["2"]
  mesh = sharding.make_mesh(config.mesh)
  model, schedule = unet_from_config(config.model), diffusion.schedule_from_config(config.diffusion)
  fresh, _ = fp_stage.make_teacher(config, mesh, model, schedule, (16, 16, 1))
  manager = checkpointing.make_manager(os.path.join(workdir, "teacher"), 3)
  state = checkpointing.restore_latest(manager, fresh, config, ("model", "diffusion"))
  assert int(state.step) == 2
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))
  assert not os.path.exists(os.path.join(workdir, "eval.json"))


# ------------------------------------------------------------------------ the loop, fast


class _Recorder(metric_writers.MetricWriter):
  """Keeps the scalars in memory and drops everything else."""

  def __init__(self):
    self.scalars = {}

  def write_scalars(self, step, scalars):
    for key, value in scalars.items():
      self.scalars.setdefault(key, []).append((step, float(value)))

  def _ignore(self, *args, **kwargs):
    pass

  write_summaries = write_images = write_videos = write_audios = write_texts = _ignore
  write_histograms = write_hparams = flush = close = _ignore


class _Batches:
  def batch(self, step, batch_size):
    return np.full((batch_size, 2), float(step + 1), np.float32)


def _toy_stage(directory, num_steps, step_fn):
  return loop.Stage(
    name="toy",
    directory=directory,
    num_steps=num_steps,
    batch_size=8,
    step_fn=step_fn,
    on_sample=lambda state, step: None,
  )


def _toy_state(mesh):
  params = {"w": jnp.zeros((3,))}
  state = TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state={"m": jnp.zeros((3,))},
    ema_params=params,
    rng=jax.random.PRNGKey(0),
  )
  return jax.device_put(state, sharding.replicated(mesh))


def _toy_config(**training):
  config = digits.get_config("smoke")
  config.training.update(dict(dict(log_every=1, checkpoint_every=2, sample_every=100), **training))
  return config


def test_loop_stops_on_nan_gradient_with_finite_loss(tmp_path):
  """A NaN update at a checkpoint step must not be saved even though that step's loss is finite."""

  def step_fn(state, batch):
    bad = state.step + 1 >= 4
    grad = jnp.where(bad, jnp.nan, jnp.mean(batch))
    params = {"w": state.params["w"] + grad}
    metrics = {"loss": jnp.mean(batch), "grad_norm": jnp.abs(grad)}
    return state.replace(step=state.step + 1, params=params, ema_params=params), metrics

  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1}))
  stage = _toy_stage(str(tmp_path / "toy"), 6, step_fn)
  writer = _Recorder()
  with pytest.raises(loop.NonFiniteLossError, match="grad_norm is nan at step 4"):
    loop.run_stage(stage, _toy_state(mesh), _toy_config(), _Batches(), mesh, writer)
  assert sorted(int(d) for d in os.listdir(tmp_path / "toy")) == [2]
  assert [s for s, _ in writer.scalars["toy/loss"]] == [1, 2, 3]


def test_progress_is_reported_every_log_every_steps_with_the_sampling_share(tmp_path, caplog):
  def step_fn(state, batch):
    return state.replace(step=state.step + 1), {"loss": jnp.mean(batch)}

  def slow_sample(state, step):
    time.sleep(1.5)  # Longer than a report interval of clu's default (every 60 s) would notice.

  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1}))
  stage = dataclasses.replace(
    _toy_stage(str(tmp_path / "toy"), 6, step_fn), on_sample=slow_sample, sample_steps=(3,)
  )
  writer = _Recorder()
  with caplog.at_level(logging.INFO):
    loop.run_stage(stage, _toy_state(mesh), _toy_config(log_every=2), _Batches(), mesh, writer)
  notes = [r.getMessage() for r in caplog.records if "Setting work unit notes" in r.getMessage()]
  # Steps 2, 4 and 6 only: not the step after the sampling pause.
  assert [n.split("(")[1].split(")")[0] for n in notes] == ["2/6", "4/6", "6/6"]
  assert "sampling" in notes[1] and "ETA" in notes[1]
  assert [s for s, _ in writer.scalars["steps_per_sec"]] == [2, 4, 6]


def test_loop_resumes_and_logs_every_step_once(tmp_path):
  def step_fn(state, batch):
    params = {"w": state.params["w"] * 0.5 + jnp.mean(batch)}
    metrics = {"loss": jnp.mean(batch) + 0.0 * state.params["w"][0]}
    return state.replace(step=state.step + 1, params=params, ema_params=params), metrics

  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1}))
  config = _toy_config()
  writer = _Recorder()
  directory = str(tmp_path / "toy")
  state = loop.run_stage(
    _toy_stage(directory, 3, step_fn), _toy_state(mesh), config, _Batches(), mesh, writer
  )
  assert int(state.step) == 3
  state = loop.run_stage(
    _toy_stage(directory, 5, step_fn), _toy_state(mesh), config, _Batches(), mesh, writer
  )
  assert int(state.step) == 5
  # The batch of step s is s + 1, so the logged loss at done = s + 1 is s + 1.
  assert writer.scalars["toy/loss"] == [(s, float(s)) for s in range(1, 6)]
  w = 0.0
  for s in range(5):
    w = w * 0.5 + (s + 1)
  np.testing.assert_allclose(state.params["w"], w)
  # Finished: a third call neither trains nor saves.
  again = loop.run_stage(
    _toy_stage(directory, 5, step_fn), _toy_state(mesh), config, _Batches(), mesh, writer
  )
  assert int(again.step) == 5 and len(writer.scalars["toy/loss"]) == 5
  # Saved at 2, 3 (the end of the first run), 4, 5; keep_checkpoints = 3 keeps the last three.
  assert sorted(int(d) for d in os.listdir(directory)) == [3, 4, 5]


def test_loop_refuses_a_checkpoint_of_another_image_size(tmp_path):
  """The image size places the attention layers, so it is structural (a clear error, not orbax's)."""

  def step_fn(state, batch):
    return state.replace(step=state.step + 1), {"loss": jnp.mean(batch)}

  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1}))
  directory = str(tmp_path / "toy")
  config = _toy_config()
  loop.run_stage(
    _toy_stage(directory, 2, step_fn), _toy_state(mesh), config, _Batches(), mesh, _Recorder()
  )
  config.data.image_size = 32
  with pytest.raises(
    checkpointing.CheckpointMismatchError, match="data.image_size: checkpoint 16 vs config 32"
  ):
    loop.run_stage(
      _toy_stage(directory, 4, step_fn), _toy_state(mesh), config, _Batches(), mesh, _Recorder()
    )


# ------------------------------------------------------------------------ the sharded step


def _step_pieces(config):
  model = unet_from_config(config.model)
  schedule = diffusion.schedule_from_config(config.diffusion)
  tx = optim.make_optimizer(config.optim)
  step = fp_stage.make_train_step(
    model, schedule, tx, optim.learning_rate_schedule(config.optim), config.optim
  )
  return model, tx, step


def test_train_step_is_the_same_on_8_devices_and_1(tmp_path_factory):
  config = pipeline_config(tmp_path_factory)
  dataset = load_dataset(config.data)
  image_shape = dataset.train.shape[1:]
  results = {}
  host_state = None
  for name, mesh_config in (("8", {"data": -1}), ("1", {"data": 1})):
    mesh = sharding.make_mesh(ml_collections.ConfigDict(mesh_config))
    assert mesh.devices.size == int(name)
    model, tx, step = _step_pieces(config)
    if host_state is None:  # init once (on 8 devices); the 1-device run starts from a copy
      state = fp_stage.init_train_state(model, tx, image_shape, config.training.seed, mesh)
      assert all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(state))
      host_state = jax.tree.map(np.array, state)
    else:
      state = jax.device_put(host_state, sharding.tree_shardings(host_state, mesh))
    step_fn = fp_stage.jit_train_step(step, mesh, state)
    metrics = []
    for s in range(3):  # conv_out starts at zero: only from step 3 on does every param move
      batch = sharding.global_batch(dataset.batch(s, config.training.batch_size), mesh)
      state, m = step_fn(state, batch)
      metrics.append(m)
    results[name] = jax.tree.map(np.asarray, (state, metrics))
  (state8, metrics8), (state1, metrics1) = results["8"], results["1"]
  assert int(state8.step) == int(state1.step) == 3
  np.testing.assert_array_equal(state8.rng, state1.rng)
  for a, b in ((state8.params, state1.params), (state8.ema_params, state1.ema_params)):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7),
    state8.opt_state,
    state1.opt_state,
  )
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5), metrics8, metrics1)
  # The step changed something, and its metrics are sane.
  assert not np.allclose(state8.params["conv_in"]["kernel"], host_state.params["conv_in"]["kernel"])
  lr_at_1 = config.optim.learning_rate / config.optim.warmup_steps
  assert metrics8[1]["learning_rate"] == pytest.approx(lr_at_1)
  assert all(np.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in metrics8)


# ------------------------------------------------------------------------ EMA


def test_ema_decay_at():
  steps = jnp.array([0, 1, 10, 1000, 10**6])
  np.testing.assert_allclose(ema_decay_at(steps, 0.999, False), 0.999)
  expected = np.minimum(0.999, (1 + np.array(steps)) / (10 + np.array(steps)))
  np.testing.assert_allclose(ema_decay_at(steps, 0.999, True), expected, rtol=1e-6)
  assert float(ema_decay_at(jnp.array(0), 0.999, True)) == pytest.approx(0.1)
  assert float(ema_decay_at(jnp.array(10**6), 0.999, True)) == pytest.approx(0.999)


def test_ema_update():
  ema = {"a": jnp.array([1.0, 2.0]), "b": {"c": jnp.array(4.0)}}
  params = {"a": jnp.array([3.0, -2.0]), "b": {"c": jnp.array(0.0)}}
  out = ema_update(ema, params, 0.75)
  np.testing.assert_allclose(out["a"], [1.5, 1.0])
  np.testing.assert_allclose(out["b"]["c"], 3.0)
  jax.tree.map(np.testing.assert_allclose, ema_update(ema, params, 0.0), params)
  jax.tree.map(np.testing.assert_allclose, ema_update(ema, params, jnp.float32(1.0)), ema)


def test_apply_gradients_steps_updates_and_averages_the_new_params():
  params = {"w": jnp.array([1.0, -2.0])}
  tx = optax.sgd(0.5)
  state = create_train_state(params, tx, jax.random.PRNGKey(0))
  seen = []

  def ema_of(new_params):
    seen.append(new_params)
    return ema_update(state.ema_params, new_params, 0.5)

  out = state.apply_gradients({"w": jnp.array([2.0, 2.0])}, tx, ema_of)
  assert int(out.step) == 1
  np.testing.assert_allclose(out.params["w"], [0.0, -3.0])
  np.testing.assert_allclose(seen[0]["w"], out.params["w"])  # the EMA rule sees the new params
  np.testing.assert_allclose(out.ema_params["w"], [0.5, -2.5])
  np.testing.assert_array_equal(out.rng, state.rng)


# ------------------------------------------------------------------------ config errors


@pytest.mark.parametrize(
  "key,value,match",
  [
    ("data.name", "mnist", r"config\.data\.name='mnist'"),
    ("model.norm_groups", 7, r"config\.model\.norm_groups=7"),
    ("model.norm_groups", 0, r"config\.model\.norm_groups=0"),
    ("model.num_head_channels", 12, r"config\.model\.num_head_channels=12"),
    ("model.ch_mult", (1, 2, 2, 2, 2, 2), r"config\.data\.image_size=16"),
    ("diffusion.beta_schedule", "cosine", r"config\.diffusion\.beta_schedule='cosine'"),
    ("sampling.ddim_steps", 0, r"config\.sampling\.ddim_steps=0"),
    ("sampling.ddim_steps", 1001, r"config\.sampling\.ddim_steps=1001"),
    ("training.checkpoint_every", 0, r"config\.training\.checkpoint_every=0"),
    ("optim.ema_decay", 1.0, r"config\.optim\.ema_decay=1\.0"),
    ("mesh.data", 0, r"config\.mesh\.data=0"),
    ("qat.switch_step", 10, r"config\.qat\.switch_step=10.*not 1-bit"),
    ("eval.seed", -1, r"^config\.eval\.seed=-1: expected an int in \[0, 2\*\*32\)$"),
    ("eval.seed", 2**32, r"^config\.eval\.seed=4294967296: expected an int"),
  ],
)
def test_validate_config_names_the_key(key, value, match):
  config = digits.get_config("smoke")
  validate_config(config)
  section, field = key.split(".")
  config[section][field] = value
  with pytest.raises(ConfigError, match=match):
    validate_config(config)


def test_qat_schedule_cross_checks():
  """A switch past the run is fine without EBB; a warmup past the switch is not, under the cosine."""
  config = digits.get_config("smoke")  # 10 QAT steps: the switch defaults to step 5.
  config.qat.update(method="baseline", switch_step=10)
  validate_config(config)
  config.qat.update(method="binarydm", switch_step=-1, lr_schedule="cosine_stage2", warmup_steps=5)
  validate_config(config)
  config.qat.warmup_steps = 6
  with pytest.raises(ConfigError, match=r"config\.qat\.warmup_steps=6.*step 5"):
    validate_config(config)


def test_digits_fid_needs_digits():
  config = cifar.get_config()
  validate_config(config)
  config.eval.metric = "digits_fid"
  with pytest.raises(ConfigError, match=r"config\.eval\.metric='digits_fid'.*cifar10"):
    validate_config(config)


@pytest.mark.parametrize(
  "key,value,match",
  [
    ("mesh.data", 999, r"config\.mesh\.data=999"),
    ("mesh.fsdp", 3, r"config\.mesh\.fsdp=3"),
    ("training.batch_size", 12, r"config\.training\.batch_size=12"),
    ("eval.batch_size", 20, r"config\.eval\.batch_size=20"),
    ("sampling.grid_size", 12, r"config\.sampling\.grid_size=12"),
  ],
)
def test_mesh_errors_are_config_errors(key, value, match, tmp_path):
  """Values that only fail against the 8 devices still fail fast, as a one-line ConfigError."""
  config = digits.get_config("smoke")
  section, field = key.split(".")
  config[section][field] = value
  with pytest.raises(ConfigError, match=match):
    pipeline.run(config, str(tmp_path))
  assert os.listdir(tmp_path) == []
