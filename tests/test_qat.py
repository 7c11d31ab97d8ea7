"""BinaryDM QAT: basis evolution (EBB), the optimizer partition, the sharded step, resume."""

import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from clu import metric_writers

from binarydm_jax import diffusion
from binarydm_jax.data.input_pipeline import load_dataset
from binarydm_jax.errors import ConfigError
from binarydm_jax.models.unet import unet_from_config
from binarydm_jax.quant import param_labels, with_policy
from binarydm_jax.runtime import sharding
from binarydm_jax.student import (
  QATSettings,
  collapse_higher_scales,
  describe_student,
  resolve_settings,
  student_policy,
)
from binarydm_jax.training import checkpointing, qat_optim, qat_stage
from binarydm_jax.training.job import Job
from binarydm_jax.training.train_state import ema_decay_at
from configs import digits


def tiny_config(**qat_overrides):
  config = digits.get_config("smoke")
  config.data.image_size = 8
  config.model.ch = 16
  config.model.ch_mult = (1, 2)
  config.model.attn_resolutions = (4,)
  config.qat.batch_size = 8
  config.qat.num_steps = 6
  config.qat.learning_rate = 1e-2
  config.qat.ebb_tau = 1.0
  for key, value in qat_overrides.items():
    config.qat[key] = value
  return config


def random_teacher(config, mesh_config=None):
  """(mesh, dataset, teacher, random-init teacher params, noise schedule) for `config`."""
  mesh = sharding.make_mesh(mesh_config or ml_collections.ConfigDict({"data": 1, "fsdp": 1}))
  dataset = load_dataset(config.data)
  teacher = unet_from_config(config.model)
  teacher_params = teacher.init(
    jax.random.PRNGKey(0), jnp.zeros((1, *dataset.train.shape[1:])), jnp.zeros((1,), jnp.int32)
  )["params"]
  return mesh, dataset, teacher, teacher_params, diffusion.schedule_from_config(config.diffusion)


def random_teacher_job(config, workdir, on_sample):
  """A `Job` in `workdir` around `random_teacher`, writing no summaries, and the teacher params."""
  mesh, dataset, teacher, teacher_params, schedule = random_teacher(config)
  writer = metric_writers.MultiWriter([])  # No summaries: the tests read checkpoints.
  return Job(config, workdir, mesh, dataset, teacher, schedule, writer, on_sample), teacher_params


def setup(config, mesh_config=None):
  """Teacher (random init), student state and the jitted QAT step on a mesh."""
  mesh, dataset, teacher, teacher_params, schedule = random_teacher(config, mesh_config)
  image_shape = dataset.train.shape[1:]
  settings = resolve_settings(config.qat)
  policy = student_policy(config, settings, teacher, image_shape)
  student = with_policy(teacher, policy)
  qat_config = ml_collections.ConfigDict(config.qat.to_dict())
  qat_config.switch_step = settings.switch_step
  lr = optax.constant_schedule(config.qat.learning_rate)
  tx = qat_optim.make_qat_optimizer(qat_config, lr)
  batches = qat_stage.noised_batches(dataset, schedule, mesh, 1, config.qat.batch_size)
  state = qat_stage.init_qat_state(
    student, teacher, teacher_params, policy, tx, batches, config, settings, mesh
  )
  step = qat_stage.jit_qat_step(
    qat_stage.make_qat_step(student, teacher, schedule, tx, lr, qat_config, settings),
    mesh,
    state,
    teacher_params,
  )

  def run(state, n, start=0):
    history = []
    for i in range(start, start + n):
      batch = sharding.global_batch(dataset.batch(i, config.qat.batch_size), mesh)
      state, metrics = step(state, teacher_params, batch)
      history.append(jax.device_get(metrics))
    return state, history

  return state, run, student, teacher, teacher_params, dataset


def higher(params):
  return qat_optim.higher_scales(params)


def drop_higher(tree):
  """The params of the same student with one basis: scale_2/scale_3 leaves removed."""
  if isinstance(tree, dict):
    return {k: drop_higher(v) for k, v in tree.items() if k not in ("scale_2", "scale_3")}
  return tree


@pytest.mark.slow
def test_binarydm_evolves_to_a_pure_single_basis_model():
  config = tiny_config(ebb_form="paper", switch_step=4, num_steps=6)
  state, run, student, teacher, _, dataset = setup(config)
  labels = set(jax.tree.leaves(param_labels(state.params)))
  assert labels == {"kernel", "scale_first", "scale_higher", "act_quant", "other"}
  # LRM: one fixed projection per UNet block (input 0..3, middle, output 0..3 here).
  assert set(state.projections) == {
    *(f"input_blocks_{i}" for i in range(4)),
    "middle_block",
    *(f"output_blocks_{i}" for i in range(4)),
  }
  projections = jax.device_get(state.projections)
  initial = [np.abs(np.asarray(s)) for s in higher(state.params)]
  assert initial, "the default policy must give the head/tail layers a second basis"

  state, history = run(state, 4)
  assert [m["ebb_stage"] for m in history] == [1, 1, 1, 1]
  assert all(m["loss_lrm"] > 0 and m["loss_ebb"] > 0 for m in history)
  shrunk = [np.abs(np.asarray(s)) for s in higher(state.params)]
  assert np.mean([s.mean() for s in shrunk]) < np.mean([s.mean() for s in initial])

  # The step that reaches the switch removes the higher bases; they stay exactly zero.
  state, history = run(state, 2, start=4)
  assert [m["ebb_stage"] for m in history] == [2, 2]
  assert [m["loss_ebb"] for m in history] == [0.0, 0.0]
  for tree in (state.params, state.ema_params):
    for s in higher(tree):
      assert np.all(np.asarray(s) == 0.0)
  for name, value in jax.device_get(state.projections).items():
    np.testing.assert_array_equal(value, projections[name])

  # ... and the model is then exactly the single-basis (k = 1) binarized UNet.
  one_basis = student_policy(
    config, QATSettings(ebb=False, lrm=True, switch_step=4), teacher, (8, 8, 1)
  )
  x = jnp.asarray(dataset.heldout[:4])
  t = jnp.array([10, 200, 500, 900])
  out = student.apply({"params": state.params}, x, t)
  out_k1 = with_policy(teacher, one_basis).apply(
    {"params": drop_higher(jax.device_get(state.params))}, x, t
  )
  np.testing.assert_array_equal(np.asarray(out), np.asarray(out_k1))


@pytest.mark.slow  # 27 s; test_decoupled_transform_alone_respects_the_envelope is the fast check.
def test_decoupled_form_reaches_the_target_ratio_by_the_switch():
  config = tiny_config(ebb_form="decoupled", switch_step=3, num_steps=4)
  state, run, *_ = setup(config)
  initial = [np.abs(np.asarray(s)) for s in higher(state.params)]
  state, history = run(state, 3)
  assert "loss_ebb" not in history[0]  # Not a loss term in this form.
  for s, s0 in zip(higher(state.params), initial, strict=True):
    assert np.all(np.abs(np.asarray(s)) <= config.qat.ebb_target_ratio * s0 + 1e-7)
  state, _ = run(state, 1, start=3)
  assert all(np.all(np.asarray(s) == 0.0) for s in higher(state.params))


@pytest.mark.slow
def test_baseline_has_no_higher_bases_no_lrm_and_no_penalty():
  config = tiny_config(method="baseline")
  state, run, *_ = setup(config)
  assert higher(state.params) == []
  assert state.projections == {}
  _, history = run(state, 1)
  assert "loss_lrm" not in history[0] and "loss_ebb" not in history[0]


@pytest.fixture(scope="module")
def single_device_step():
  """One W1A32 QAT step on one device: the reference for the sharded layouts."""
  config = tiny_config()
  config.quant.preset = "W1A32"  # No activation rounding: float-order noise cannot flip a level.
  state, run, *_ = setup(config)
  state, history = run(state, 1)
  return config, jax.device_get(state.params), history[0]


@pytest.mark.slow  # 60 s; tests/test_train.py checks the FP step on 8 devices by default.
@pytest.mark.parametrize("mesh", [{"data": 8, "fsdp": 1}, {"data": 2, "fsdp": 4}])
def test_sharded_step_equals_single_device(mesh, single_device_step):
  config, single_params, single_metrics = single_device_step
  sharded, run8, *_ = setup(config, ml_collections.ConfigDict(mesh))
  if mesh["fsdp"] > 1:
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(sharded.params)}
    assert any("fsdp" in s for s in specs), specs
  sharded, hist8 = run8(sharded, 1)
  np.testing.assert_allclose(single_metrics["loss"], hist8[0]["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(single_params), jax.tree.leaves(sharded.params), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_switch_step_defaults_to_half_and_bad_values_are_config_errors():
  assert resolve_settings(tiny_config(num_steps=10).qat).switch_step == 5
  with pytest.raises(ConfigError, match="config.qat.method"):
    resolve_settings(tiny_config(method="xnor").qat)
  with pytest.raises(ConfigError, match="config.qat.switch_step"):
    resolve_settings(tiny_config(switch_step=-5).qat)


def test_decoupled_transform_alone_respects_the_envelope():
  tx = qat_optim.evolve_higher_scales(
    optax.sgd(0.0), switch_step=10, form="decoupled", target_ratio=0.1
  )
  params = {"s": jnp.array([0.5, -0.2, 0.0])}
  state = tx.init(params)
  for _ in range(10):
    updates, state = tx.update({"s": jnp.array([-1.0, 1.0, 1.0])}, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(np.abs(params["s"]), [0.05, 0.02, 0.0], rtol=1e-4)
  updates, state = tx.update({"s": jnp.ones(3)}, state, params)
  assert np.all(np.asarray(optax.apply_updates(params, updates)["s"]) == 0.0)


def test_describe_student_names_the_bit_width():
  config = tiny_config()
  assert describe_student(config)["bits"] == "W1A4"
  config.quant.preset = "baseline"
  config.quant.act_bits = 8
  assert describe_student(config)["bits"] == "W1A8"
  config.quant.preset = "fp"
  assert describe_student(config)["bits"] == "W32A32"
  config.quant.preset, config.quant.act_bits = "W32A4", -1  # FP weights: says W32, not W1.
  assert describe_student(config)["bits"] == "W32A4"


@pytest.mark.slow  # 25 s each; test_switch checks the restart in the default suite.
@pytest.mark.parametrize("restart", [True, False])
def test_ema_restarts_from_the_single_basis_params_at_the_switch(restart):
  config = tiny_config(ebb_form="paper", switch_step=3, num_steps=5, ema_decay=0.9)
  config.qat.ema_restart_at_switch = restart
  state, run, *_ = setup(config)
  state, _ = run(state, 3)  # Steps 0..2, all in stage 1.
  step, ema_prev = jax.device_get((state.step, state.ema_params))
  assert step == 3
  state, _ = run(state, 1, start=3)  # Step 3 removes the higher bases.
  params, ema = jax.device_get((state.params, state.ema_params))
  for s in higher(ema):
    assert np.all(np.asarray(s) == 0.0)
  if restart:
    jax.tree.map(np.testing.assert_array_equal, ema, params)
    return
  # Without the restart the EMA still remembers stage 1: the usual update, then the collapse.
  decay = float(ema_decay_at(jnp.asarray(step), config.qat.ema_decay, config.qat.ema_warmup))
  assert 0 < decay < 1
  expected = collapse_higher_scales(
    jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema_prev, params), jnp.asarray(True)
  )
  tolerance = {"rtol": 1e-6, "atol": 1e-7}
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **tolerance), ema, expected)
  assert not all(
    jax.tree.leaves(jax.tree.map(lambda a, b: np.allclose(a, b, **tolerance), ema, params))
  )


def test_learning_rate_schedules():
  config = tiny_config(num_steps=10, learning_rate=1e-2, warmup_steps=0)
  constant = qat_optim.learning_rate_schedule(config.qat, switch_step=4)
  config.qat.lr_schedule = "cosine_stage2"
  cosine = qat_optim.learning_rate_schedule(config.qat, switch_step=4)
  steps = [1, 3, 4, 7, 10]
  np.testing.assert_allclose([constant(s) for s in steps], [1e-2] * 5, rtol=1e-6)
  # Stage 1 at the full rate; stage 2 (steps 4..10) a cosine from the full rate to 0.
  expected = [1e-2, 1e-2, 1e-2, 1e-2 * 0.5 * (1 + np.cos(np.pi * 3 / 6)), 0.0]
  np.testing.assert_allclose([cosine(s) for s in steps], expected, rtol=1e-5, atol=1e-9)
  config.qat.lr_schedule = "step"
  with pytest.raises(ValueError, match="config.qat.lr_schedule='step'"):
    qat_optim.learning_rate_schedule(config.qat, switch_step=4)


@pytest.mark.slow
def test_step_logs_the_learning_rate():
  config = tiny_config(method="baseline")
  state, run, *_ = setup(config)
  _, history = run(state, 2)
  np.testing.assert_allclose([m["learning_rate"] for m in history], [1e-2, 1e-2], rtol=1e-6)


def _train_student(config, workdir):
  """`qat_stage.train_student` from a random-init teacher, with no sampling; the final QATState."""
  job, teacher_params = random_teacher_job(
    config, str(workdir), lambda name, sampler: lambda state, step: None
  )
  _, state = qat_stage.train_student(job, teacher_params)
  return jax.device_get(state)


@pytest.fixture(scope="module")
def interrupted_and_uninterrupted(tmp_path_factory):
  """A W1A4 BinaryDM run of 6 steps (switch at 3), and the same run restarted from its step-2
  checkpoint (what a run killed between steps 2 and 4 leaves)."""
  config = tiny_config(num_steps=6, switch_step=3, lr_schedule="cosine_stage2")
  config.training.checkpoint_every = 2
  full = tmp_path_factory.mktemp("qat_full")
  uninterrupted = _train_student(config, full)
  resumed_dir = tmp_path_factory.mktemp("qat_resumed")
  shutil.copytree(full / "student" / "2", resumed_dir / "student" / "2")
  resumed = _train_student(config, resumed_dir)
  return config, resumed_dir, resumed, uninterrupted


@pytest.mark.slow
def test_killed_qat_run_resumes_to_the_uninterrupted_state(interrupted_and_uninterrupted):
  _, _, resumed, uninterrupted = interrupted_and_uninterrupted
  assert int(resumed.step) == 6
  # Params, Adam and EBB-evolution state, EMA, LRM projections and rng: all bit-identical.
  assert jax.tree.structure(resumed) == jax.tree.structure(uninterrupted)
  jax.tree.map(np.testing.assert_array_equal, resumed, uninterrupted)
  assert all(np.all(s == 0.0) for s in higher(resumed.params))  # Resumed across the switch.


@pytest.mark.slow
def test_student_checkpoint_of_another_bit_width_is_refused(interrupted_and_uninterrupted):
  config, workdir, *_ = interrupted_and_uninterrupted
  other = config.copy_and_resolve_references()
  other.quant.preset = "W1A8"  # Same param tree as W1A4: only a config check can tell them apart.
  other.qat.num_steps = 8
  with pytest.raises(
    checkpointing.CheckpointMismatchError,
    match=r"quant\.preset: checkpoint 'W1A4' vs config 'W1A8'",
  ):
    _train_student(other, workdir)


def test_calibration_batch_spreads_timesteps_over_every_range():
  """4 batches of 16: every tenth of 0..999 gets 6 or 7 of the 64 rows, the same on every call."""
  config = digits.get_config("smoke")
  dataset = load_dataset(config.data, config.model.channels)
  schedule = diffusion.schedule_from_config(config.diffusion)
  mesh = sharding.make_mesh(config.mesh)
  x_t, t = qat_stage.calibration_batch(dataset, schedule, mesh, 4, 16)
  assert x_t.shape == (64, 16, 16, 1) and t.shape == (64,)
  counts = np.bincount(np.asarray(t) // 100, minlength=10)
  assert counts.min() >= 6 and counts.max() <= 7, counts
  again_x, again_t = qat_stage.calibration_batch(dataset, schedule, mesh, 4, 16)
  np.testing.assert_array_equal(again_t, t)
  np.testing.assert_array_equal(again_x, x_t)
