"""A job fails before any work: on a bad value in any config section, and on missing prerequisites
(data, teacher, first stage, Inception weights), which are named all at once."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from binarydm_jax.convert import teacher
from binarydm_jax.convert.diffusers_unet import ConversionError
from binarydm_jax.data import first_stage, input_pipeline
from binarydm_jax.data.input_pipeline import DatasetNotFoundError
from binarydm_jax.errors import DatasetError, PrerequisiteError, UserError
from binarydm_jax.evaluation.inception import InceptionError
from binarydm_jax.models.unet import config_param_shapes
from binarydm_jax.training import pipeline, prerequisites
from configs import cifar, digits, lsun_churches

ABSENT = "absent-for-the-test"  # Replaced by a path that does not exist.

# (section, field, bad value, start of the error message): one per section of the config.
BAD_VALUES = [
  ("data", "image_size", 0, "config.data.image_size=0"),
  ("model", "ch", 0, "config.model.ch=0"),
  ("first_stage", "kind", "vqgan", "config.first_stage.kind='vqgan'"),
  ("diffusion", "num_timesteps", 0, "config.diffusion.num_timesteps=0"),
  ("teacher", "source", ABSENT, "teacher source '"),
  ("training", "batch_size", 0, "config.training.batch_size=0"),
  ("optim", "learning_rate", 0.0, "config.optim.learning_rate=0.0"),
  ("quant", "preset", "W9A9", "config.quant.preset='W9A9'"),
  ("quant", "rules", (("nomatch_layer",),), "config.quant.rules[0].regex='nomatch_layer'"),
  ("qat", "method", "xnor", "config.qat.method='xnor'"),
  ("export", "fp_dtype", "int4", "config.export.fp_dtype='int4'"),
  ("sampling", "ddim_steps", 0, "config.sampling.ddim_steps=0"),
  ("eval", "metric", "fid", "config.eval.metric='fid'"),
  ("mesh", "fsdp", 0, "config.mesh.fsdp=0"),
]


def test_every_config_section_has_a_bad_value_below():
  assert {section for section, *_ in BAD_VALUES} == set(digits.get_config("smoke"))


@pytest.mark.parametrize(
  "section,field,value,message", BAD_VALUES, ids=[f"{s}.{f}" for s, f, *_ in BAD_VALUES]
)
def test_a_bad_value_in_any_section_fails_before_any_work(tmp_path, section, field, value, message):
  config = digits.get_config("smoke")
  config[section][field] = str(tmp_path / "absent") if value == ABSENT else value
  workdir = tmp_path / "work"
  with pytest.raises(UserError) as excinfo:
    pipeline.run(config, str(workdir))
  assert str(excinfo.value).startswith(message), excinfo.value
  assert "\n" not in str(excinfo.value)
  assert not workdir.exists()  # No teacher/ checkpoint, no data loaded, no writer.


def _missing_cifar_config(tmp_path):
  """The CIFAR-10 job with no data, no Inception weights and a teacher source that is not there."""
  (tmp_path / "tfds").mkdir()
  config = cifar.get_config()
  config.data.data_dir = str(tmp_path / "tfds")
  config.eval.inception_dir = str(tmp_path / "inception")
  config.teacher.source = str(tmp_path / "teacher")
  return config


def test_every_missing_prerequisite_is_named_in_one_error(tmp_path):
  config = _missing_cifar_config(tmp_path)
  with pytest.raises(PrerequisiteError) as excinfo:
    pipeline.run(config, str(tmp_path / "work"))
  message = str(excinfo.value)
  assert message.startswith("3 things this job needs are missing: (1) CIFAR-10 is not prepared in")
  assert f"(2) teacher source '{tmp_path / 'teacher'}': no such file or directory" in message
  assert f"(3) no converted FID Inception weights in {tmp_path / 'inception'}" in message
  assert "\n" not in message
  assert not (tmp_path / "work").exists()


def test_one_missing_prerequisite_is_its_own_error(tmp_path):
  config = _missing_cifar_config(tmp_path)
  config.teacher.source = None
  config.eval.metric = "none"
  with pytest.raises(DatasetNotFoundError, match="CIFAR-10 is not prepared in"):
    prerequisites.check(config)
  assert [type(e) for e in prerequisites.missing(config)] == [DatasetNotFoundError]
  config.eval.metric = "inception"
  assert [type(e) for e in prerequisites.missing(config)] == [DatasetNotFoundError, InceptionError]


def test_a_job_with_everything_has_no_missing_prerequisite():
  assert prerequisites.missing(digits.get_config("smoke")) == []
  churches = lsun_churches.get_config("smoke")  # Synthetic images, a random first stage.
  churches.eval.metric = "none"
  assert prerequisites.missing(churches) == []


def test_image_folder_must_exist_and_hold_images(tmp_path):
  config = digits.get_config("smoke")
  config.data.update(name="folder", data_dir=str(tmp_path / "images"))
  with pytest.raises(DatasetError, match="is not a directory"):
    input_pipeline.check_available(config.data)
  (tmp_path / "images").mkdir()
  with pytest.raises(DatasetError, match="holds no"):
    input_pipeline.check_available(config.data)
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "images" / "a.png")
  input_pipeline.check_available(config.data)


def test_teacher_source_must_hold_a_teacher(tmp_path):
  with pytest.raises(teacher.TeacherError, match="no such file or directory"):
    teacher.check_source(tmp_path / "absent")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ConversionError, match="is not a diffusers UNet2DModel directory"):
    teacher.check_source(tmp_path / "empty")
  model_config = ml_collections.ConfigDict(digits.get_config("smoke").model.to_dict())
  model_config.image_size = 16
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), config_param_shapes(model_config))
  teacher.check_source(teacher.save_teacher(tmp_path / "teacher", model_config, params))


def test_first_stage_source_must_hold_a_first_stage(tmp_path):
  config = lsun_churches.get_config("smoke")
  config.eval.metric = "none"
  first_stage.check_source(config)  # random_init: nothing to look for.
  config.first_stage.source = str(tmp_path)
  with pytest.raises(first_stage.FirstStageError, match="no first-stage checkpoint there"):
    first_stage.check_source(config)
  with pytest.raises(first_stage.FirstStageError):
    prerequisites.check(config)
