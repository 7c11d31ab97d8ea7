"""Low-rank representation mimicking: PCA projections and the projected MSE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from binarydm_jax.training import lrm


def _features(seed, shape=(4, 8, 8, 16)):
  rng = np.random.default_rng(seed)
  # Anisotropic channels so that the principal directions are well defined.
  scales = np.linspace(3.0, 0.1, shape[-1])
  mix = np.linalg.qr(rng.normal(size=(shape[-1], shape[-1])))[0]
  return jnp.asarray((rng.normal(size=shape) * scales) @ mix.T, jnp.float32)


def test_rank_rounds_c_over_k_with_floor():
  assert lrm.projection_rank(128, 4) == 32
  assert lrm.projection_rank(30, 4) == 8  # 7.5 rounds up
  assert lrm.projection_rank(6, 4) == 2  # 1.5 -> 2, and the floor is 2
  assert lrm.projection_rank(4, 8) == 2
  assert lrm.projection_rank(1, 4) == 1  # never more than the dimension


def test_projection_is_the_top_principal_subspace():
  feats = {"input_blocks_1": _features(0)}
  proj = lrm.fit_projections([feats], reduction=4)["input_blocks_1"]
  assert proj.shape == (16, 4)
  np.testing.assert_allclose(proj.T @ proj, np.eye(4), atol=1e-5)
  x = np.asarray(feats["input_blocks_1"]).reshape(-1, 16).astype(np.float64)
  x -= x.mean(0)
  _, _, vt = np.linalg.svd(x, full_matrices=False)
  reference = vt[:4].T
  # Same subspace: projectors agree.
  np.testing.assert_allclose(proj @ proj.T, reference @ reference.T, atol=1e-4)


def test_projections_from_several_batches_use_all_of_them():
  a, b = {"m": _features(1)}, {"m": _features(2)}
  both = lrm.fit_projections([a, b])["m"]
  concat = lrm.fit_projections([{"m": jnp.concatenate([a["m"], b["m"]])}])["m"]
  np.testing.assert_allclose(both @ both.T, concat @ concat.T, atol=1e-5)


def test_loss_is_projected_mse_and_zero_for_identical_features():
  teacher = {"a": _features(3), "b": _features(4, (4, 4, 4, 8))}
  student = {"a": _features(5), "b": _features(6, (4, 4, 4, 8))}
  projections = lrm.fit_projections([teacher])
  expected = np.mean(
    [
      np.mean(
        (
          np.asarray(student[k]).reshape(-1, student[k].shape[-1]) @ projections[k]
          - np.asarray(teacher[k]).reshape(-1, teacher[k].shape[-1]) @ projections[k]
        )
        ** 2
      )
      for k in ("a", "b")
    ]
  )
  np.testing.assert_allclose(lrm.lrm_loss(student, teacher, projections), expected, rtol=1e-5)
  assert float(lrm.lrm_loss(teacher, teacher, projections)) == 0.0


def test_gradient_reaches_only_the_student():
  teacher = {"a": _features(7)}
  projections = lrm.fit_projections([teacher])
  student = {"a": _features(8)}
  g_student, g_teacher = jax.grad(lambda s, t: lrm.lrm_loss(s, t, projections), argnums=(0, 1))(
    student, teacher
  )
  assert float(jnp.abs(g_student["a"]).sum()) > 0
  assert float(jnp.abs(g_teacher["a"]).sum()) == 0.0


def test_width_axis_projects_the_image_width_as_the_released_code():
  feats = {"a": _features(9, (2, 8, 16, 4))}
  proj = lrm.fit_projections([feats], reduction=4, axis="width")["a"]
  assert proj.shape == (16, 4)  # W = 16 -> W // 4
  with pytest.raises(ValueError, match="axis"):
    lrm.fit_projections([feats], axis="height")
