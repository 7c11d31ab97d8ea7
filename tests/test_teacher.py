"""Teacher sources without torch: orbax round trip, hub-id errors, architecture check."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from binarydm_jax.convert import teacher
from binarydm_jax.models.unet import config_param_shapes
from binarydm_jax.training import pipeline

TINY = ml_collections.ConfigDict(
  {
    "image_size": 8,
    "channels": 1,
    "ch": 16,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [4],
    "dropout": 0.0,
    "num_head_channels": 8,
    "norm_groups": 4,
    "norm_eps": 1e-5,
    "freq_shift": 0.0,
    "flip_sin_to_cos": True,
    "downsample_padding": "symmetric",
  }
)


def _init(config):
  """Random params of the right tree and shapes (cheaper than compiling `init`)."""
  rng = np.random.default_rng(0)
  shapes = config_param_shapes(config)
  return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), shapes)


def test_orbax_round_trip(tmp_path):
  params = _init(TINY)
  path = teacher.save_teacher(tmp_path / "t", TINY, params)
  model_config, restored = teacher.load_teacher(path)
  assert model_config == TINY
  jax.tree.map(np.testing.assert_array_equal, restored, params)
  with pytest.raises(teacher.TeacherError, match="already exists"):
    teacher.save_teacher(path, TINY, params)
  teacher.save_teacher(path, TINY, params, overwrite=True)


def test_orbax_checkpoint_manager_layout(tmp_path):
  """A CheckpointManager root (step dirs holding params + config) is accepted too."""
  import orbax.checkpoint as ocp

  params = _init(TINY)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    for step in (1, 5):
      scaled = jax.tree.map(lambda p, s=step: p + s, params)
      args = ocp.args.Composite(
        params=ocp.args.StandardSave(scaled), config=ocp.args.JsonSave(TINY.to_dict())
      )
      manager.save(step, args=args)
    manager.wait_until_finished()
  _, restored = teacher.load_teacher(tmp_path / "ckpt")
  jax.tree.map(lambda r, p: np.testing.assert_allclose(r, p + 5), restored, params)


def test_training_stage_checkpoint(tmp_path):
  """teacher.source may be a stage dir of a previous run (WORKDIR/teacher): its EMA params."""
  import optax

  from binarydm_jax.training import checkpointing
  from binarydm_jax.training.train_state import create_train_state

  params = _init(TINY)
  state = create_train_state(params, optax.adam(1e-3), jax.random.PRNGKey(0))
  state = state.replace(ema_params=jax.tree.map(lambda p: p + 1, params))
  model = {k: v for k, v in TINY.to_dict().items() if k != "image_size"}
  config = ml_collections.ConfigDict(
    {"model": {**model, "dtype": "float32"}, "data": {"image_size": 8}}
  )
  manager = checkpointing.make_manager(str(tmp_path / "teacher"), keep=2)
  checkpointing.save(manager, 3, state, config)
  manager.wait_until_finished()
  manager.close()
  model_config, restored = teacher.load_teacher(tmp_path / "teacher")
  assert model_config.image_size == 8 and model_config.ch == TINY.ch
  jax.tree.map(lambda r, p: np.testing.assert_array_equal(r, p + 1), restored, params)
  teacher.assert_same_architecture(config.model, model_config, image_size=8)


def test_offline_hub_id_error_names_the_files(monkeypatch):
  huggingface_hub = pytest.importorskip("huggingface_hub")

  def offline(*args, **kwargs):
    raise OSError("offline")

  monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
  with pytest.raises(teacher.TeacherError) as e:
    teacher.load_teacher("google/ddpm-cifar10-32")
  message = str(e.value)
  for needed in ("https://huggingface.co/google/ddpm-cifar10-32", "config.json"):
    assert needed in message
  assert "diffusion_pytorch_model.safetensors" in message and "teacher.source" in message


def test_missing_path_error(tmp_path):
  with pytest.raises(teacher.TeacherError, match="no such file or directory"):
    teacher.load_teacher(tmp_path / "missing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(teacher.TeacherError, match="config.json"):
    teacher.load_teacher(tmp_path / "empty")


def test_assert_same_architecture():
  student = ml_collections.ConfigDict({**TINY.to_dict(), "dropout": 0.1, "ch_mult": (1, 2)})
  teacher.assert_same_architecture(student, TINY, image_size=8)
  with pytest.raises(teacher.TeacherError, match="image_size"):
    teacher.assert_same_architecture(student, TINY, image_size=16)
  student.norm_eps = 1e-6
  student.attn_resolutions = [8]
  with pytest.raises(
    teacher.TeacherError, match="norm_eps.*attn_resolutions|attn_resolutions.*norm_eps"
  ):
    teacher.assert_same_architecture(student, TINY)
  # Omitted optional fields take unet_from_config's defaults.
  cifar = {"image_size": 32, "channels": 3, "ch": 128, "ch_mult": [1, 2, 2, 2]}
  cifar.update(num_res_blocks=2, attn_resolutions=[16])
  full = {**cifar, "num_head_channels": -1, "norm_eps": 1e-6, "downsample_padding": "asymmetric"}
  teacher.assert_same_architecture(cifar, full)


def _job_config(source):
  """configs/digits.py:smoke shrunk to the TINY architecture, starting from `source`."""
  from configs import digits

  config = digits.get_config("smoke")
  config.data.image_size = TINY.image_size
  for key in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "num_head_channels"):
    config.model[key] = tuple(TINY[key]) if isinstance(TINY[key], list) else TINY[key]
  for key in ("norm_groups", "norm_eps", "freq_shift", "flip_sin_to_cos", "downsample_padding"):
    config.model[key] = TINY[key]
  config.teacher.source = str(source)
  config.qat.num_steps = 2
  config.qat.batch_size = 8
  config.sampling.ddim_steps = 2
  config.sampling.grid_size = 8
  config.eval.num_samples = 8
  config.eval.batch_size = 8
  return config


@pytest.mark.slow
def test_job_starts_from_teacher_source_without_training_one(tmp_path):

  source = teacher.save_teacher(tmp_path / "t", TINY, _init(TINY))
  workdir = tmp_path / "run"
  results = pipeline.run(_job_config(source), str(workdir))
  assert not (workdir / "teacher").exists()  # nothing trained: the given teacher is used
  assert (workdir / "student").exists()
  assert set(results) == {"teacher", "student"} and results["student"]["bits"] == "W1A4"


def test_job_refuses_a_teacher_of_another_architecture(tmp_path):

  source = teacher.save_teacher(tmp_path / "t", TINY, _init(TINY))
  config = _job_config(source)
  config.model.ch = 32
  with pytest.raises(teacher.TeacherError, match="ch: config 32 vs teacher 16"):
    pipeline.run(config, str(tmp_path / "run"))
