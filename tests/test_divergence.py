"""The divergence guard: a loss that stays far above its running median stops the stage.

Toy stages (tests/test_train.py's): a loss that blows up, and gradient descent with a learning rate
far too high; the guard's config fields are validated.
"""

import logging
import math
import os
import re

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from binarydm_jax.runtime import sharding
from binarydm_jax.training import loop
from binarydm_jax.training.config_validation import ConfigError, validate_config
from configs import digits
from tests.test_train import (
  _Batches,
  _Recorder,
  _restore_state,
  _toy_config,
  _toy_stage,
  _toy_state,
)


def _mesh():
  return sharding.make_mesh(ml_collections.ConfigDict({"data": -1}))


def _blows_up(high_steps, high=1e6):
  """A toy step whose loss at `done` (= step + 1) is 1 + done / 100, or `high` for done in
  `high_steps`; w counts the steps."""

  def step_fn(state, batch):
    done = state.step + 1
    normal = 1.0 + done.astype(jnp.float32) / 100
    loss = jnp.where(jnp.isin(done, jnp.asarray(sorted(high_steps))), high, normal)
    params = {"w": state.params["w"] + 1.0}
    return state.replace(step=done, params=params, ema_params=params), {"loss": loss}

  return step_fn


def _guarded(**training):
  """The toy config with a guard of 10x for 3 steps, over a window of 4."""
  return _toy_config(
    **dict(dict(divergence_factor=10.0, divergence_steps=3, divergence_window=4), **training)
  )


def test_a_loss_that_stays_high_stops_the_stage_and_keeps_the_last_good_checkpoint(tmp_path):
  """keep_checkpoints = 2: a checkpoint at step 6 (loss high since 6) would have deleted step 2."""
  directory = tmp_path / "toy"
  mesh = _mesh()
  writer = _Recorder()
  config = _guarded(keep_checkpoints=2)
  with pytest.raises(loop.DivergedLossError) as error:
    loop.run_stage(
      _toy_stage(str(directory), 12, _blows_up(range(6, 13))),
      _toy_state(mesh),
      config,
      _Batches(),
      mesh,
      writer,
    )
  assert str(error.value) == (
    "toy: the loss diverged: 1e+06 at step 8 after 3 steps in a row above 10x its running median "
    "1.035 (since step 6); no checkpoint was written since, the last is step 4. Lower "
    "--config.optim.learning_rate and rerun the same command to resume from it, or loosen the "
    "guard: --config.training.divergence_factor or divergence_steps (0 turns it off)"
  )
  # Nothing written after the loss rose (step 6 skipped), nothing deleted, nothing logged past 7.
  assert sorted(os.listdir(directory)) == ["2", "4"]
  assert [s for s, _ in writer.scalars["toy/loss"]] == [1, 2, 3, 4, 5, 6, 7]
  assert int(_restore_state(str(tmp_path), 4, "toy")["step"]) == 4
  # The rerun (here with a loss that stays normal) resumes from that checkpoint.
  writer = _Recorder()
  state = loop.run_stage(
    _toy_stage(str(directory), 8, _blows_up(())), _toy_state(mesh), config, _Batches(), mesh, writer
  )
  assert [s for s, _ in writer.scalars["toy/loss"]] == [5, 6, 7, 8]
  np.testing.assert_allclose(state.params["w"], 8.0)


def test_a_checkpoint_right_before_the_rise_is_named_as_suspect(tmp_path):
  """The checkpoint of step 4 holds the params whose loss (at step 5) was the first one high."""
  directory = tmp_path / "toy"
  mesh = _mesh()
  with pytest.raises(loop.DivergedLossError) as error:
    loop.run_stage(
      _toy_stage(str(directory), 12, _blows_up(range(5, 13))),
      _toy_state(mesh),
      _guarded(),
      _Batches(),
      mesh,
      _Recorder(),
    )
  assert (
    f"(since step 5); no checkpoint was written since, the last is step 4 (its params gave the "
    f"first high loss: if the rerun's loss starts high, move {directory}/4 aside). Lower "
  ) in str(error.value)
  assert sorted(os.listdir(directory)) == ["2", "4"]


def test_a_short_spike_does_not_stop_the_stage_but_is_not_checkpointed(tmp_path, caplog):
  directory = tmp_path / "toy"
  mesh = _mesh()
  writer = _Recorder()
  with caplog.at_level(logging.WARNING):
    state = loop.run_stage(
      _toy_stage(str(directory), 10, _blows_up({5, 6})),
      _toy_state(mesh),
      _guarded(),
      _Batches(),
      mesh,
      writer,
    )
  assert int(state.step) == 10
  assert [s for s, _ in writer.scalars["toy/loss"]] == list(range(1, 11))
  assert sorted(os.listdir(directory)) == ["10", "4", "8"]  # Not 6; keep_checkpoints = 3.
  (warning,) = [r.getMessage() for r in caplog.records if "no checkpoint at step" in r.getMessage()]
  assert (
    warning == "toy: no checkpoint at step 6: the loss is above 10x its running median since step 5"
  )


@pytest.mark.parametrize("off", [{"divergence_factor": 0.0}, {"divergence_steps": 0}])
def test_0_turns_the_guard_off(tmp_path, off):
  """The same run stops with the guard on and trains to the end with it off."""
  mesh = _mesh()

  def run(directory, config):
    stage = _toy_stage(str(directory), 8, _blows_up(range(3, 9)))
    return loop.run_stage(stage, _toy_state(mesh), config, _Batches(), mesh, _Recorder())

  with pytest.raises(loop.DivergedLossError, match="at step 5 after 3 steps"):
    run(tmp_path / "on", _guarded())
  state = run(tmp_path / "off", _guarded(**off))
  assert int(state.step) == 8
  assert sorted(os.listdir(tmp_path / "off")) == ["4", "6", "8"]


def test_the_guard_is_checked_where_the_loop_fetches_its_summaries(tmp_path):
  """log_every = 4: the losses are fetched every 4 steps (and at checkpoints), every step judged."""
  mesh = _mesh()
  with pytest.raises(loop.DivergedLossError, match=r"at step 7 .*\(since step 5\)"):
    loop.run_stage(
      _toy_stage(str(tmp_path / "toy"), 12, _blows_up(range(5, 13))),
      _toy_state(mesh),
      _guarded(log_every=4, checkpoint_every=8),
      _Batches(),
      mesh,
      _Recorder(),
    )
  assert os.listdir(tmp_path / "toy") == []  # Found at step 8 (a summary), before its checkpoint.


def test_the_median_leaves_out_the_losses_above_the_line():
  """A divergence longer than the window still trips: its losses never become the reference."""
  guard = loop.DivergenceGuard(factor=10.0, steps=30, window=4)
  assert guard.observe(1, 1.0) is None
  assert all(guard.observe(step, 1e9) is None for step in range(2, 31))
  assert guard.observe(31, 1e9) == (1e9, 1.0)
  assert guard.rising_since == 2
  # A loss back under the line ends the run; the count starts again.
  guard = loop.DivergenceGuard(factor=10.0, steps=2, window=4)
  for step, loss in enumerate([1.0, 2.0, 3.0, 100.0, 2.0, 100.0], start=1):
    assert guard.observe(step, loss) is None
  assert guard.rising_since == 6
  assert guard.observe(7, 100.0) == (100.0, 2.0)
  assert guard.observe(8, math.nan) is None  # NaN is the NaN check's.


# ------------------------------------------------------------------------ a real divergence


def _gradient_descent(learning_rate):
  """Gradient descent on mean((w - 1)^2): w - 1 scales by 1 - 2 lr / 3 per step, so it converges
  for lr < 3 and the loss grows 9-fold per step at lr 6 (finite for 40 steps: no NaN check)."""

  def step_fn(state, batch):
    w = state.params["w"]
    loss = jnp.mean((w - 1.0) ** 2)
    params = {"w": w - learning_rate * 2 * (w - 1.0) / w.size}
    return state.replace(step=state.step + 1, params=params, ema_params=params), {"loss": loss}

  return step_fn


@pytest.mark.parametrize("learning_rate", [0.3, 6.0])
def test_a_learning_rate_far_too_high_stops_the_stage(tmp_path, caplog, monkeypatch, learning_rate):
  """The default guard (10x for 20 steps) stops lr 6; lr 0.3 (a falling loss) trains to the end
  under the strictest guard, one step above 10x."""
  mesh = _mesh()
  directory = tmp_path / "toy"
  absurd = learning_rate > 3
  config = _toy_config(checkpoint_every=5, divergence_steps=20 if absurd else 1)
  stage = _toy_stage(str(directory), 30, _gradient_descent(learning_rate))
  writer = _Recorder()
  if not absurd:
    judged = []
    observe = loop.DivergenceGuard.observe

    def spy(guard, step, loss):
      judged.append(step)
      return observe(guard, step, loss)

    monkeypatch.setattr(loop.DivergenceGuard, "observe", spy)
    state = loop.run_stage(stage, _toy_state(mesh), config, _Batches(), mesh, writer)
    assert int(state.step) == 30 and sorted(os.listdir(directory)) == ["20", "25", "30"]
    assert judged == list(range(1, 31))  # The guard was on and judged every step.
    return
  with caplog.at_level(logging.WARNING), pytest.raises(loop.DivergedLossError) as error:
    loop.run_stage(stage, _toy_state(mesh), config, _Batches(), mesh, writer)
  assert str(error.value) == (
    "toy: the loss diverged: 1.094e+20 at step 22 after 20 steps in a row above 10x its running "
    "median 5 (since step 3); no checkpoint was written since, there is none yet. Lower "
    "--config.optim.learning_rate and rerun the same command to resume from the start, or loosen "
    "the guard: --config.training.divergence_factor or divergence_steps (0 turns it off)"
  )
  assert [s for s, _ in writer.scalars["toy/loss"]] == list(range(1, 22))
  assert os.listdir(directory) == []  # Steps 5, 10, 15 and 20 came after the rise.
  skipped = [r.getMessage() for r in caplog.records if "no checkpoint at step" in r.getMessage()]
  assert [m.split("step ")[1].split(":")[0] for m in skipped] == ["5", "10", "15", "20"]


# ------------------------------------------------------------------------ config


@pytest.mark.parametrize(
  "key,value,expected",
  [
    ("divergence_factor", 1.0, "0 (no divergence guard) or a factor > 1"),
    ("divergence_factor", 0.5, "0 (no divergence guard) or a factor > 1"),
    ("divergence_factor", -10.0, "0 (no divergence guard) or a factor > 1"),
    ("divergence_factor", math.inf, "0 (no divergence guard) or a factor > 1"),
    ("divergence_steps", -1, "a non-negative int (0: no divergence guard)"),
    ("divergence_window", 0, "a positive int"),
  ],
)
def test_bad_guard_values_are_refused_in_one_line(key, value, expected):
  config = digits.get_config("smoke")
  validate_config(config)
  config.training[key] = value
  line = f"config.training.{key}={value!r}: expected {expected}"
  with pytest.raises(ConfigError, match=f"^{re.escape(line)}$"):
    validate_config(config)


def test_the_defaults_are_valid_and_0_is_accepted():
  config = digits.get_config("smoke")
  assert (
    config.training.divergence_factor,
    config.training.divergence_steps,
    config.training.divergence_window,
  ) == (10.0, 20, 100)
  config.training.update(divergence_factor=0.0, divergence_steps=0)
  validate_config(config)
