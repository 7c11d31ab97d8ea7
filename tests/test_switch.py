"""The EBB switch: samples on both sides of it, its report, the refit handover, the penalty forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from binarydm_jax.quant import (
  binarize_kernel,
  init_scales,
  multi_basis_configured,
  sign,
  with_policy,
)
from binarydm_jax.student import QATSettings, describe_student, resolve_settings, student_policy
from binarydm_jax.training import qat_optim, qat_stage, switch
from binarydm_jax.training.config_validation import ConfigError, validate_config
from configs import digits
from tests.test_qat import drop_higher, higher, random_teacher, random_teacher_job, tiny_config


def _train(config, tmp_path):
  sampled, reports = {}, []
  job, teacher_params = random_teacher_job(
    config,
    str(tmp_path),
    lambda name, sampler: lambda state, step: sampled.__setitem__(step, jax.device_get(state)),
  )
  _, state = qat_stage.train_student(job, teacher_params, on_switch=reports.append)
  return sampled, reports, jax.device_get(state)


def _default_qat(**overrides):
  """The tiny UNet trained with the default digits QAT settings (lr, tau, form)."""
  config = tiny_config()
  defaults = digits.get_config().qat
  for key in ("learning_rate", "ebb_tau", "ebb_form", "ebb_reduction", "b1", "b2", "grad_clip"):
    config.qat[key] = defaults[key]
  for key, value in overrides.items():
    config.qat[key] = value
  config.training.sample_every = 100
  return config


def _switched_run(tmp_path, handover):
  """A W1A4 BinaryDM run at the default settings (switch before step 3 of 5) with `handover`."""
  return _train(_default_qat(num_steps=5, switch_step=3, switch_handover=handover), tmp_path)


@pytest.fixture(scope="module")
def switched_run(tmp_path_factory):
  """The paper's switch (no handover); the refit handover's run is in the slow suite."""
  return _switched_run(tmp_path_factory.mktemp("switch"), "none")


def test_samples_are_taken_on_both_sides_of_the_switch(switched_run):
  sampled, reports, _ = switched_run
  assert sorted(sampled) == [3, 4, 5]  # S (two bases), S + 1 (one basis), the end.
  two_basis, collapsed = sampled[3], sampled[4]
  assert int(two_basis.step) == 3 and int(collapsed.step) == 4
  assert all(np.any(np.asarray(s) != 0) for s in higher(two_basis.ema_params))
  assert all(np.all(np.asarray(s) == 0) for s in higher(collapsed.ema_params))
  # Step S + 1 starts from the restarted EMA: exactly the params of the update numbered S.
  jax.tree.map(np.testing.assert_array_equal, collapsed.ema_params, collapsed.params)
  (report,) = reports
  assert report["step"] == 3
  np.testing.assert_allclose(
    report["mean_abs_sigma_II"],
    float(qat_optim.mean_abs_higher_scale(two_basis.params)),
    rtol=1e-6,
  )
  assert 0 < report["sigma_II_over_sigma_I"] < 1
  _check_block_change(report["block_change"])
  assert "block_change_handover" not in report


def _check_block_change(change):
  assert change["input_blocks_0"] == 0  # The FP stem conv, upstream of every binarized layer.
  assert change["eps"] > 0 and change["output_blocks_3"] > 0  # The tail has two bases.


@pytest.mark.slow
def test_refit_handover_changes_only_the_single_basis_start(switched_run, tmp_path):
  plain, plain_reports, _ = switched_run
  refit, refit_reports, _ = _switched_run(tmp_path, "refit")
  # Identical up to the switch; the handover then starts stage 2 from other params.
  jax.tree.map(np.testing.assert_array_equal, plain[3].params, refit[3].params)
  changed = jax.tree.leaves(
    jax.tree.map(lambda a, b: not np.array_equal(a, b), plain[4].params, refit[4].params)
  )
  assert any(changed)
  assert all(np.all(np.asarray(s) == 0) for s in higher(plain[4].params))
  assert "block_change_handover" not in plain_reports[0]
  assert refit_reports[0]["block_change"] == plain_reports[0]["block_change"]
  _check_block_change(refit_reports[0]["block_change_handover"])
  assert refit_reports[0]["block_change_handover"] != refit_reports[0]["block_change"]


def test_refit_is_the_least_squares_single_basis_scale():
  kernel = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 5, 4))
  scales = init_scales(kernel, 2)
  params = {"conv": {"kernel": kernel, "scale_1": scales[0], "scale_2": scales[1]}}
  refit = switch.refit_first_scales(params)["conv"]
  np.testing.assert_array_equal(refit["scale_2"], 0.0)
  target = binarize_kernel(kernel, scales)

  def error(scale):
    return np.sum(np.square(target - scale * sign(kernel)), axis=(0, 1, 2))

  best = error(refit["scale_1"])
  for factor in (0.9, 0.99, 1.01, 1.1):
    assert np.all(best < error(refit["scale_1"] * factor))
  assert np.all(best <= error(scales[0]))
  assert switch.collapse(params)["conv"]["scale_1"] is params["conv"]["scale_1"]


def test_handover_rejects_an_unknown_kind():
  with pytest.raises(ValueError, match="switch_handover='magic'"):
    switch.handover(None, {}, [], "magic")


def test_sum_reduction_pulls_every_channel_c_times_harder():
  params = {
    "a": {"kernel": jnp.ones((3, 8)), "scale_1": jnp.ones(8), "scale_2": jnp.arange(8.0)},
    "b": {"kernel": jnp.ones((3, 4)), "scale_1": jnp.ones(4), "scale_2": jnp.full(4, 2.0)},
  }
  np.testing.assert_allclose(qat_optim.ebb_penalty(params), (3.5 + 2.0) / 2)
  np.testing.assert_allclose(qat_optim.ebb_penalty(params, "sum"), (28.0 + 8.0) / 2)
  grads = jax.grad(lambda p: qat_optim.ebb_penalty(p, "sum"))(params)
  np.testing.assert_allclose(grads["a"]["scale_2"], 0.5)  # Mean reduction: 0.5 / 8.
  negative = jax.tree.map(lambda x: -x, params)
  assert qat_optim.ebb_penalty(negative, "sum") < 0  # Signed, as printed: unbounded below.
  np.testing.assert_allclose(qat_optim.ebb_penalty(negative, "sum", absolute=True), 18.0)
  with pytest.raises(ValueError, match="ebb_reduction='max'"):
    qat_optim.ebb_penalty(params, "max")


def test_paper_penalty_at_the_default_settings_shrinks_sigma_II(switched_run, tmp_path):
  """Against the same run without the penalty (tau = 0), the default tau pulls sigma_II down."""
  sampled, *_ = switched_run
  _, _, no_penalty = _train(_default_qat(num_steps=3, switch_step=3, ebb_tau=0.0), tmp_path)
  assert int(no_penalty.step) == 3
  mean = lambda params: np.mean([np.mean(np.asarray(s)) for s in higher(params)])  # noqa: E731
  assert mean(sampled[3].params) < mean(no_penalty.params)


def test_the_student_after_the_switch_is_exactly_the_single_basis_model(switched_run):
  sampled, *_ = switched_run
  config = _default_qat()
  _, dataset, teacher, *_ = random_teacher(config)
  settings = QATSettings(ebb=False, lrm=True, switch_step=3)
  one_basis = student_policy(config, settings, teacher, (8, 8, 1))
  two_basis = student_policy(config, resolve_settings(config.qat), teacher, (8, 8, 1))
  x, t = jnp.asarray(dataset.heldout[:4]), jnp.array([10, 200, 500, 900])
  params = sampled[4].params
  out = with_policy(teacher, two_basis).apply({"params": params}, x, t)
  out_k1 = with_policy(teacher, one_basis).apply({"params": drop_higher(params)}, x, t)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(out_k1))


@pytest.mark.parametrize(
  "changes, expected",
  [
    ({}, True),
    ({"preset": "baseline"}, False),
    ({"preset": "fp"}, False),
    ({"head_tail_bases": 1}, False),
    ({"head_tail_blocks": 0}, False),
    ({"preset": "baseline", "body_bases": 2}, True),
    ({"preset": "baseline", "rules": ((".*conv_1", "binary", 2),)}, True),
  ],
)
def test_ebb_is_reported_only_when_some_layer_has_a_second_basis(changes, expected):
  config = tiny_config()
  for key, value in changes.items():
    config.quant[key] = value
  assert multi_basis_configured(config.quant) == expected
  assert describe_student(config)["ebb"] == expected  # qat.method is 'binarydm'.
  assert resolve_settings(config.qat, config.quant).ebb == expected
  assert resolve_settings(config.qat).ebb  # Without the quant section: the method's.


def test_switch_options_are_validated():
  for key, value in (("ebb_reduction", "max"), ("switch_handover", "magic")):
    config = tiny_config()
    config.qat[key] = value
    with pytest.raises(ConfigError, match=f"qat.{key}"):
      validate_config(config)
