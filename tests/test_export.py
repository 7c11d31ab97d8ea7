"""The 1-bit export: bit packing, the artifact and its loader, the size accounting, the CLIs."""

import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

import binarydm_jax.student
from binarydm_jax import diffusion, workdir
from binarydm_jax.convert.teacher import load_teacher
from binarydm_jax.errors import TeacherError
from binarydm_jax.export import (
  ExportError,
  export_student,
  export_student_from_workdir,
  layout,
  load_export,
  pack_signs,
  unpack_signs,
)
from binarydm_jax.models.unet import count_params, param_shapes, unet_from_config
from binarydm_jax.quant.params import scale_index
from binarydm_jax.quant.weight_binarizer import int_quantize_kernel
from binarydm_jax.training import checkpointing, qat_stage
from binarydm_jax.training.train_state import create_train_state
from configs import digits, lsun_churches

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(**quant):
  """The smoke digits job at 8x8 with two levels (the default W1A4 policy: EBB head/tail)."""
  config = digits.get_config("smoke")
  config.data.image_size = 8
  config.model.ch_mult = (1, 2)
  config.model.attn_resolutions = (4,)
  config.sampling.ddim_steps = 3
  for key, value in quant.items():
    config.quant[key] = value
  return config


def random_student(config, seed=0):
  """EMA-like student params after the EBB switch: random kernels (some exactly 0 or -0), scale_2 = 0."""
  rng = np.random.default_rng(seed)
  shapes = param_shapes(workdir.student_model(config), workdir.image_shape(config))

  def leaf(path, shape):
    name = path[-1].key
    if scale_index(name) == 1 or name == "act_step":
      return rng.uniform(0.05, 0.3, shape.shape).astype(np.float32)
    if scale_index(name) is not None:
      return np.zeros(shape.shape, np.float32)
    value = rng.normal(0.0, 0.2, shape.shape).astype(np.float32)
    if name == "kernel":
      value[rng.random(shape.shape) < 0.05] = 0.0
      value[rng.random(shape.shape) < 0.05] = -0.0
    return value

  return jax.tree.map_with_path(leaf, shapes)


def inputs(config):
  x = jax.random.normal(jax.random.PRNGKey(1), (4, *workdir.image_shape(config)))
  return x, jnp.array([0, 250, 600, 999])


@pytest.fixture(scope="module")
def student(tmp_path_factory):
  """(config, model, EMA params, export dir, manifest) of a float32 export."""
  config = tiny_config()
  params = random_student(config)
  out = tmp_path_factory.mktemp("export") / "export"
  manifest = export_student(config, params, out, first_stage=None)
  return config, workdir.student_model(config), params, out, manifest


@pytest.fixture(scope="module")
def loaded(student):
  """load_export of the float32 export: (model, params, manifest)."""
  return load_export(student[3])


# ------------------------------------------------------------------------------- bit packing


@pytest.mark.parametrize("shape", [(3, 3, 5, 7), (3, 3, 64, 4), (1, 1, 33, 2), (40, 3), (32, 1)])
def test_pack_unpack_round_trip(shape):
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=shape).astype(np.float32)
  kernel[rng.random(shape) < 0.1] = 0.0
  kernel[rng.random(shape) < 0.1] = -0.0
  words = pack_signs(kernel)
  c_in, c_out = shape[-2:]
  assert words.dtype == np.uint32
  assert words.shape == (c_out, *shape[:-2], -(-c_in // 32))
  signs = unpack_signs(words, c_in)
  assert signs.dtype == np.float32 and signs.shape == shape
  np.testing.assert_array_equal(signs, np.where(kernel >= 0, 1.0, -1.0))  # sign(0) = +1.
  np.testing.assert_array_equal(pack_signs(signs), words)


def test_pack_uses_the_lce_bit_order():
  # Input channels [-1, 2, -3] of output 0 and [4, -5, 6] of output 1: bit i = channel i < 0.
  kernel = np.array([[-1.0, 4.0], [2.0, -5.0], [-3.0, 6.0]])
  np.testing.assert_array_equal(pack_signs(kernel), [[0b101], [0b010]])
  # 33 input channels: the 33rd is bit 0 of a second word; the other 31 bits are padding (0).
  kernel = -np.ones((33, 1))
  np.testing.assert_array_equal(pack_signs(kernel), [[0xFFFFFFFF, 1]])
  with pytest.raises(ValueError, match="c_in=65"):
    unpack_signs(pack_signs(kernel), 65)  # Two words hold at most 64 input channels.


# ------------------------------------------------------------------------------- the artifact


@pytest.mark.slow
def test_the_int8_path_of_an_export_equals_its_float_path(student, loaded):
  """load_export(inference='int8'): int8 sign kernels, and the student's eps within float noise."""
  config, _, _, export_dir, _ = student
  model, params, _ = load_export(export_dir, inference="int8")
  assert params["input_blocks_1"]["res"]["conv_1"]["kernel"].dtype == np.int8
  float_model, float_params, _ = loaded
  x, t = inputs(config)
  eps = model.apply({"params": params}, x, t)
  reference = float_model.apply({"params": float_params}, x, t)
  np.testing.assert_allclose(eps, reference, rtol=1e-4, atol=1e-4)


def outputs(model, params, config):
  """eps on fixed inputs and 3-step DDIM samples from a fixed key, in one compiled program."""
  schedule = diffusion.schedule_from_config(config.diffusion)
  x, t = inputs(config)

  @jax.jit
  def run(params):
    eps_fn = lambda x, t: model.apply({"params": params}, x, t)  # noqa: E731
    samples = diffusion.ddim_sample(eps_fn, schedule, x.shape, jax.random.PRNGKey(0), num_steps=3)
    return eps_fn(x, t), samples

  return run(params)


def test_export_reproduces_the_student(student, loaded):
  config, model, params, _, _ = student
  exported, exported_params, _ = loaded
  eps, samples = outputs(exported, exported_params, config)
  ref_eps, ref_samples = outputs(model, params, config)
  assert np.abs(ref_eps).mean() > 0.1  # A model that computes something.
  np.testing.assert_allclose(eps, ref_eps, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(samples, ref_samples, rtol=1e-5, atol=1e-5)
  # Binarized kernels come back as +-1 with one basis; the second bases are gone.
  conv = exported_params["input_blocks_1"]["res"]["conv_1"]
  assert set(np.unique(np.asarray(conv["kernel"]))) == {-1.0, 1.0}
  assert "scale_2" not in conv
  assert "scale_2" in params["input_blocks_1"]["res"]["conv_1"]  # k = 2 in training.


def test_bytes_on_disk_equal_the_manifest(student):
  config, _, _, out, manifest = student
  files = [p for p in out.rglob("*") if p.is_file()]
  assert manifest["export_bytes"] == sum(p.stat().st_size for p in files)
  listed = {out / name for name in manifest["files"]} | {out / "manifest.json"}
  assert set(files) == listed
  assert json.loads((out / "manifest.json").read_text()) == manifest
  fp_params = count_params(param_shapes(unet_from_config(config.model), (8, 8, 1)))
  assert manifest["fp32_bytes"] == 4 * fp_params
  assert manifest["size_saving"] == round(manifest["fp32_bytes"] / manifest["export_bytes"], 3)
  rows = layout.rows_from_table(manifest["policy"])
  binary = [r for r in rows if r["treatment"] == "binary"]
  assert binary and all(r["bases"] == 1 for r in binary)
  # Per binarized kernel: c_out * kh * kw words of 32 input channels (rounded up).
  words = sum(
    np.prod(r["kernel_shape"]) // r["kernel_shape"][-2] * -(-r["kernel_shape"][-2] // 32)
    for r in binary
  )
  assert manifest["packed_bytes"] == 4 * words == manifest["parts"]["signs"]["bytes"]
  assert {"signs", "quant", "fp"} == set(manifest["parts"])
  assert manifest["parts"]["fp"]["dtype"] == "float32"
  assert manifest["student"]["bits"] == "W1A4"
  assert manifest["size_saving"] > 3


def test_bfloat16_rounds_only_the_fp_params(student, loaded, tmp_path):
  config, _, params, _, manifest = student
  half = export_student(config, params, tmp_path / "bf16", first_stage=None, fp_dtype="bfloat16")
  assert half["parts"]["fp"] == {
    "dtype": "bfloat16",
    "count": manifest["parts"]["fp"]["count"],
    "bytes": manifest["parts"]["fp"]["bytes"] // 2,
  }
  assert half["parts"]["signs"] == manifest["parts"]["signs"]
  assert half["export_bytes"] < manifest["export_bytes"]
  _, half_params, _ = load_export(tmp_path / "bf16")
  conv = "input_blocks_1/res/conv_1"
  for path in ("time_embed_0/kernel", "norm_out/norm/scale", f"{conv}/bias"):  # FP: rounded.
    rounded = np.asarray(get(params, path), jnp.bfloat16).astype(np.float32)
    assert not np.array_equal(rounded, get(params, path))
    np.testing.assert_array_equal(get(half_params, path), rounded)
  for name in ("kernel", "scale_1", "act_step"):  # Signs, scales and steps stay exact.
    np.testing.assert_array_equal(
      get(half_params, f"{conv}/{name}"), get(loaded[1], f"{conv}/{name}")
    )


def test_float16_quant_dtype_rounds_only_the_scales_and_steps(student, loaded, tmp_path):
  config, _, params, _, manifest = student
  half = export_student(config, params, tmp_path / "q16", first_stage=None, quant_dtype="float16")
  assert half["quant_dtype"] == "float16"
  assert half["parts"]["quant"]["dtype"] == "float16"
  assert half["parts"]["quant"]["bytes"] == manifest["parts"]["quant"]["bytes"] // 2
  assert half["parts"]["fp"] == manifest["parts"]["fp"]
  _, half_params, _ = load_export(tmp_path / "q16")
  conv = "input_blocks_1/res/conv_1"
  for name in ("scale_1", "act_step"):  # Quantizer params: rounded to float16.
    rounded = np.asarray(get(params, f"{conv}/{name}"), np.float16).astype(np.float32)
    assert not np.array_equal(rounded, get(params, f"{conv}/{name}"))
    np.testing.assert_array_equal(get(half_params, f"{conv}/{name}"), rounded)
  for name in ("kernel", "bias"):  # Signs and FP params stay exact.
    np.testing.assert_array_equal(
      get(half_params, f"{conv}/{name}"), get(loaded[1], f"{conv}/{name}")
    )


def test_an_int8_kernel_keeps_its_codes_under_a_16_bit_step(tmp_path):
  config = tiny_config(fp_boundary_bits=8)
  params = random_student(config)
  export_student(config, params, tmp_path / "f32", first_stage=None)
  export_student(config, params, tmp_path / "b16", first_stage=None, quant_dtype="bfloat16")
  exact, rounded = (load_export(tmp_path / name)[1] for name in ("f32", "b16"))
  kernel = get(exact, "conv_in/kernel")
  step = np.max(np.abs(kernel), axis=(0, 1, 2)) / 127  # The float32 step of each channel.
  step16 = np.max(np.abs(get(rounded, "conv_in/kernel")), axis=(0, 1, 2)) / 127
  assert not np.allclose(step, step16, rtol=1e-5)
  # The codes the student trained with, each times its channel's bfloat16-rounded step.
  np.testing.assert_array_equal(
    np.round(get(rounded, "conv_in/kernel") / step16), np.round(kernel / step)
  )
  np.testing.assert_allclose(step16, np.asarray(step, jnp.bfloat16).astype(np.float32), rtol=1e-6)


def get(params, path):
  return functools.reduce(lambda tree, key: tree[key], path.split("/"), params)


def test_int8_boundary_layers_are_stored_as_int8(tmp_path):
  config = tiny_config(fp_boundary_bits=8)
  params = random_student(config)
  manifest = export_student(config, params, tmp_path / "w8", first_stage=None)
  rows = [r for r in layout.rows_from_table(manifest["policy"]) if r["treatment"] == "int"]
  assert {r["layer"] for r in rows} == {"time_embed_0", "time_embed_1", "conv_in", "conv_out"}
  assert manifest["parts"]["int8"]["bytes"] == sum(np.prod(r["kernel_shape"]) for r in rows)
  _, exported, _ = load_export(tmp_path / "w8")
  for row in rows:  # The effective (fake-quantized) kernels are the student's.
    np.testing.assert_allclose(
      int_quantize_kernel(get(exported, f"{row['layer']}/kernel"), 8),
      int_quantize_kernel(get(params, f"{row['layer']}/kernel"), 8),
      rtol=1e-6,
    )


# ------------------------------------------------------------------------------- workdirs


def save_stage(directory, config, state, step):
  manager = checkpointing.make_manager(str(directory), keep=1)
  checkpointing.save(manager, step, state, config)
  manager.wait_until_finished()
  manager.close()


def student_state(params):
  return qat_stage.QATState(
    step=jnp.asarray(7, jnp.int32),
    params=params,
    opt_state=optax.adam(1e-3).init(params),
    ema_params=params,
    rng=jax.random.PRNGKey(0),
    projections={"middle_block": jnp.ones((4, 2))},
  )


def test_export_from_a_workdir(student, loaded, tmp_path):
  config, _, params, _, manifest = student
  save_stage(tmp_path / "student", config, student_state(params), 7)
  from_workdir = export_student_from_workdir(tmp_path)
  assert from_workdir["student"]["step"] == 7
  assert from_workdir["parts"] == manifest["parts"]
  _, exported_params, _ = load_export(tmp_path / "export")
  jax.tree.map(np.testing.assert_array_equal, exported_params, loaded[1])
  # The teacher loader names the student instead of failing on shapes.
  with pytest.raises(TeacherError, match="quantized student.*--which=student"):
    load_teacher(tmp_path / "student")


# ------------------------------------------------------------------------------- bad inputs


def one_line(excinfo):
  assert "\n" not in str(excinfo.value)
  return str(excinfo.value)


def test_a_two_basis_student_is_refused(student, tmp_path):
  config, _, params, _, _ = student
  params = jax.tree.map(lambda p: p, params)
  params["input_blocks_1"]["res"]["conv_1"]["scale_2"] = np.full_like(
    params["input_blocks_1"]["res"]["conv_1"]["scale_1"], 0.01
  )
  with pytest.raises(ExportError) as e:
    export_student(config, params, tmp_path / "out", first_stage=None)
  assert "input_blocks_1/res/conv_1/scale_2" in one_line(e)
  assert "two bases" in str(e.value) and "switch" in str(e.value)
  assert not (tmp_path / "out").exists()


def test_a_workdir_without_a_student_is_refused(tmp_path):
  with pytest.raises(ExportError) as e:
    export_student_from_workdir(tmp_path)
  assert "student" in one_line(e) and "python -m binarydm_jax.main" in str(e.value)


def test_the_export_uses_the_model_it_is_given(student, loaded, tmp_path, monkeypatch):
  config, model, params, _, manifest = student

  def rebuilt(*args, **kwargs):
    raise AssertionError("export_student rebuilt the student it was given")

  monkeypatch.setattr(binarydm_jax.student, "student_model", rebuilt)
  again = export_student(config, params, tmp_path / "out", first_stage=None, model=model, step=7)
  assert again["student"]["step"] == 7
  for key in ("policy", "parts", "packed_bytes", "fp32_bytes"):
    assert again[key] == manifest[key], key
  jax.tree.map(np.testing.assert_array_equal, load_export(tmp_path / "out")[1], loaded[1])


def test_the_first_stage_must_match_the_config(student, tmp_path):
  config, _, params, _, _ = student
  with pytest.raises(ExportError) as e:
    export_student(config, params, tmp_path / "out", first_stage=object())
  assert "no first stage" in one_line(e)
  latent = lsun_churches.get_config("smoke")
  with pytest.raises(ExportError) as e:
    export_student(latent, {}, tmp_path / "out", first_stage=None)
  assert "first_stage=job.first_stage" in one_line(e)
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", ["fp_dtype", "quant_dtype"])
def test_an_unknown_dtype_is_refused(student, tmp_path, option):
  config, _, params, _, _ = student
  with pytest.raises(ExportError) as e:
    export_student(config, params, tmp_path / "out", first_stage=None, **{option: "float64"})
  assert one_line(e) == f"{option}='float64': expected one of float32, bfloat16, float16"


def test_an_occupied_out_dir_is_refused(student, tmp_path):
  config, _, params, _, _ = student
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "notes.txt").write_text("mine")
  with pytest.raises(ExportError) as e:
    export_student(config, params, tmp_path / "out", first_stage=None)
  assert "is not an export" in one_line(e)
  assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


@pytest.fixture
def copy(student, tmp_path):
  shutil.copytree(student[3], tmp_path / "export")
  return tmp_path / "export"


def test_another_format_version_is_refused(copy):
  manifest = json.loads((copy / "manifest.json").read_text())
  manifest["format_version"] = 2
  (copy / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(ExportError) as e:
    load_export(copy)
  assert "format_version 2" in one_line(e) and "reads version 1" in str(e.value)


def largest_file(export_dir):
  return max((p for p in (export_dir / "weights").rglob("*") if p.is_file()), key=os.path.getsize)


def test_a_truncated_file_is_refused(copy):
  path = largest_file(copy)
  path.write_bytes(path.read_bytes()[:-10])
  with pytest.raises(ExportError) as e:
    load_export(copy)
  assert path.relative_to(copy).as_posix() in one_line(e) and "truncated" in str(e.value)


def test_an_edited_file_is_refused(copy):
  path = largest_file(copy)
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 1
  path.write_bytes(bytes(data))
  with pytest.raises(ExportError) as e:
    load_export(copy)
  assert path.relative_to(copy).as_posix() in one_line(e) and "sha256" in str(e.value)


def test_a_missing_manifest_or_inference_mode_is_refused(copy):
  with pytest.raises(ExportError) as e:
    load_export(copy, inference="int4")
  assert "inference='int4'" in one_line(e) and "'int8'" in str(e.value)
  (copy / "manifest.json").unlink()
  with pytest.raises(ExportError) as e:
    load_export(copy)
  assert "no manifest.json" in one_line(e)


# ------------------------------------------------------------------------------- CLIs


def run_module(module, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


@pytest.mark.slow  # 11 s: a subprocess compiling the sampler again.
def test_sample_cli_writes_a_grid_and_an_npz(student, tmp_path):
  out = student[3]
  result = run_module(
    "binarydm_jax.sample",
    f"--export={out}",
    "--num=6",
    "--steps=2",
    f"--out={tmp_path / 'grid.png'}",
    f"--npz={tmp_path / 'samples.npz'}",
  )
  assert result.returncode == 0, result.stderr[-2000:]
  samples = np.load(tmp_path / "samples.npz")["arr_0"]
  assert samples.shape == (6, 8, 8, 1) and samples.dtype == np.uint8
  # 6 images in a 3x2 grid, each enlarged 8x to 64 px, with 1 px borders.
  assert Image.open(tmp_path / "grid.png").size == (3 * 65 + 1, 2 * 65 + 1)


@pytest.mark.slow
def test_clis_on_a_workdir(student, tmp_path):
  config, _, params, _, _ = student
  result = run_module("binarydm_jax.export", f"--workdir={tmp_path}")
  assert result.returncode == 1
  assert "holds no student checkpoint" in result.stderr.strip().splitlines()[-1]
  teacher = unet_from_config(config.model)
  fp_params = teacher.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), int))
  state = create_train_state(fp_params["params"], optax.adam(1e-3), jax.random.PRNGKey(0))
  save_stage(tmp_path / "teacher", config, state, 5)
  save_stage(tmp_path / "student", config, student_state(params), 7)
  result = run_module("binarydm_jax.export", f"--workdir={tmp_path}", "--fp_dtype=bfloat16")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "W1A4 student (step 7)" in result.stdout
  assert json.loads((tmp_path / "export" / "manifest.json").read_text())["fp_dtype"] == "bfloat16"
  for which in ("teacher", "student"):
    npz = tmp_path / f"{which}.npz"
    result = run_module(
      "binarydm_jax.sample", f"--workdir={tmp_path}", f"--which={which}", "--num=2", f"--npz={npz}"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert np.load(npz)["arr_0"].shape == (2, 8, 8, 1)


@pytest.mark.slow
def test_export_fid_benchmark_scores_each_storage_variant(tmp_path):
  config = digits.get_config("smoke")  # 16 px: the shipped digits classifier.
  params = random_student(config)
  save_stage(tmp_path / "student", config, student_state(params), 7)
  result = run_module(
    "benchmarks.export_fid",
    f"--workdir={tmp_path}",
    "--num_samples=8",
    "--variants=bfloat16/float16",
  )
  assert result.returncode == 0, result.stderr[-2000:]
  rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| ")]
  variants = [row[0].strip() for row in rows[1:]]
  assert variants == ["float32/float32", "bfloat16/float16"]  # The exact export comes first.
  (_, bytes32, saving32, fid32, change32), (_, bytes16, saving16, fid16, change16) = rows[1:]
  assert float(change32) == 0.0 and float(change16) > 0.0  # Rounded params move the samples.
  assert int(bytes16.replace(",", "")) < int(bytes32.replace(",", ""))
  assert float(saving16.strip(" x")) > float(saving32.strip(" x"))
  assert np.isfinite(float(fid32)) and np.isfinite(float(fid16))


@pytest.mark.slow
def test_throughput_benchmark_samples_the_int8_export(tmp_path):
  out = tmp_path / "throughput.json"
  result = run_module(
    "benchmarks.sampling_throughput",
    "--config=configs/digits.py:smoke",
    "--batch=2",
    "--steps=1",
    "--repeats=1",
    f"--json={out}",
  )
  assert result.returncode == 0, result.stderr[-2000:]
  measured = json.loads(out.read_text())
  assert set(measured["images_per_s"]) == {"teacher", "fake-quant", "int8"}
  assert all(rate > 0 for rate in measured["images_per_s"].values())
  config = digits.get_config("smoke")
  teacher_bytes = 4 * count_params(param_shapes(unet_from_config(config.model), (16, 16, 1)))
  assert measured["size_saving"] == round(teacher_bytes / measured["export_bytes"], 3)
  assert f"size_saving {measured['size_saving']}x" in result.stdout


def test_an_export_carries_the_activation_quantizers(tmp_path):
  """Timestep-grouped offset grids, split skip inputs and bias corrections: the export reproduces
  the student (float and int8 paths), and its manifest names each layer's quantizer."""
  config = tiny_config(
    act_quantizer="asymmetric", act_t_groups=4, act_split=True, bias_correction=True
  )
  params = random_student(config)
  manifest = export_student(config, params, tmp_path / "export", first_stage=None)
  rows = {row["layer"]: row for row in layout.rows_from_table(manifest["policy"])}
  skip = rows["output_blocks_0/res/skip"]
  assert (skip["act_t_groups"], skip["act_split"], skip["bias_correction"]) == (4, True, True)
  model, exported, _ = load_export(tmp_path / "export")
  assert exported["output_blocks_0"]["res"]["skip"]["act_offset"].shape == (4, 2)
  eps, samples = outputs(model, exported, config)
  ref_eps, ref_samples = outputs(workdir.student_model(config), params, config)
  np.testing.assert_allclose(eps, ref_eps, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(samples, ref_samples, rtol=1e-5, atol=1e-5)
  int8_model, int8_params, _ = load_export(tmp_path / "export", inference="int8")
  x, t = inputs(config)
  np.testing.assert_allclose(
    int8_model.apply({"params": int8_params}, x, t), ref_eps, rtol=1e-4, atol=1e-4
  )


def test_a_manifest_without_the_newer_policy_columns_reads_as_before():
  columns = list(layout.POLICY_COLUMNS[:7])
  table = {
    "columns": columns + ["bytes"],
    "rows": [["a/conv", [3, 3, 1, 2], "binary", 1, 32, 4, "signed", 9]],
  }
  (row,) = layout.rows_from_table(table)
  assert (row["act_t_groups"], row["act_split"], row["bias_correction"]) == (1, False, False)
  assert layout.policy_from_rows([row]).resolve("a/conv").act_t_groups == 1
