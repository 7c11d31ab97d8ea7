"""A `gs://` workdir: what the job writes goes through etils `epath`, the same code as a local one.

No network: the `bucket` fixture keeps epath's own `gs://` route (`epath.Path` -> its TensorFlow
backend -> `tf.io.gfile`) and only moves `gs://` paths under a local directory on the way into
`tf.io.gfile`, so every file the job writes can be checked there. A builtin `open()` or `os.path`
on a `gs://` path would miss the fake (and write below the working directory, which each test
checks stays empty). Orbax checkpoints go through tensorstore, whose GCS driver needs GCS itself:
they are tested on local paths (here and in test_train / test_preemption).
"""

import io
import json
import os
import pathlib
import re
import tokenize
import types

import jax
import numpy as np
import pytest
import tensorflow as tf
from clu import metric_writers
from etils import epath
from etils.epath import backend
from PIL import Image

from binarydm_jax import efficiency
from binarydm_jax.evaluation import evaluator, reference
from binarydm_jax.export import ExportError, manifest
from binarydm_jax.models.unet import param_shapes, unet_from_config
from binarydm_jax.runtime import fileio
from binarydm_jax.sampling import samplers
from binarydm_jax.sampling.sample_shards import MANIFEST_NAME, generate, load_samples
from binarydm_jax.sampling.sampleable import Sampleable
from binarydm_jax.training import checkpointing, workdir_lock
from tests.test_export import tiny_config

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "binarydm_jax"


class _LocalBucket:
  """epath's TensorFlow backend with `gs://X` read and written as the local `ROOT/X`."""

  def __init__(self, inner: backend.Backend, root: pathlib.Path):
    self._inner, self._root = inner, f"{root}/"

  def _local(self, arg):
    text = arg if isinstance(arg, str) else None
    return self._root + text[len("gs://") :] if text and text.startswith("gs://") else arg

  def _remote(self, path) -> str:
    path = os.fspath(path)
    return "gs://" + path[len(self._root) :] if path.startswith(self._root) else path

  def __getattr__(self, name):
    method = getattr(self._inner, name)

    def call(*args, **kwargs):
      result = method(*map(self._local, args), **kwargs)
      if name == "glob":
        return [self._remote(path) for path in result]
      if name == "walk":
        return ((self._remote(top), dirs, files) for top, dirs, files in result)
      return result

    return call


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """The local directory that holds `gs://` (e.g. gs://bucket/run is BUCKET/bucket/run)."""
  root = tmp_path / "gcs"
  root.mkdir()
  monkeypatch.setattr(backend, "tf_backend", _LocalBucket(backend.tf_backend, root))
  assert isinstance(epath.Path("gs://bucket/run")._backend, _LocalBucket)  # etils' own route.
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  yield root
  assert not list(cwd.iterdir()), "something wrote a gs:// path as a local relative path"


@pytest.fixture(params=["local", "gs"])
def workdir(request, tmp_path, bucket):
  """(the --workdir string, the local directory where its files land)."""
  if request.param == "gs":
    return "gs://bucket/run", bucket / "bucket" / "run"
  return str(tmp_path / "run"), tmp_path / "run"


def test_eval_json_and_efficiency_json(workdir):
  path, local = workdir
  epath.Path(path).mkdir(parents=True, exist_ok=True)
  results = {"teacher": {"fid": 12.5, "sampler": "ddim3"}}
  evaluator.write_results(results, path)
  written = efficiency.write_json(tiny_config(), epath.Path(path) / "efficiency.json")
  assert json.loads((epath.Path(path) / "eval.json").read_text()) == results
  assert json.loads((local / "eval.json").read_text()) == results
  assert json.loads((local / "efficiency.json").read_text()) == json.loads(json.dumps(written))
  assert sorted(p.name for p in local.iterdir()) == ["efficiency.json", "eval.json"]  # No temp.


def _images(n, size=8):
  """n distinct deterministic NHWC images in [-1, 1]."""
  return np.linspace(-1.0, 1.0, n * size * size).reshape(n, size, size, 1)


def test_sample_grids_of_training_and_evaluation(workdir):
  path, local = workdir
  config = tiny_config()
  config.eval.metric = "none"
  config.eval.num_samples = config.eval.batch_size = config.sampling.grid_size = 4
  writer = metric_writers.LoggingWriter()

  def sampler(params, rng, num):
    return _images(num)

  state = types.SimpleNamespace(ema_params=None)
  samplers.grid_callbacks(config, path, writer)("teacher", sampler)(state, 7)
  dataset = types.SimpleNamespace(train=_images(1))
  evaluator.evaluate_sampler("student", sampler, None, config, dataset, path, writer)
  grid = samplers.image_grid(_images(4))[..., 0]
  for name in ("teacher_0000007.png", "student_final.png"):
    remote = epath.Path(path) / "samples" / name
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(remote.read_bytes()))), grid)
    assert (local / "samples" / name).is_file()


def test_an_export_manifest_lands_and_reads_back(workdir):
  path, local = workdir
  out = epath.Path(path) / "export"
  weights = out / manifest.WEIGHTS / "d"
  weights.mkdir(parents=True)
  (weights / "blob").write_bytes(bytes(range(256)) * 3)
  (out / manifest.WEIGHTS / "meta").write_text("{}")
  table = manifest.file_table(out, manifest.WEIGHTS)
  assert sorted(table) == ["weights/d/blob", "weights/meta"]
  assert table["weights/d/blob"]["bytes"] == 768
  info = {"format": manifest.FORMAT, "format_version": manifest.FORMAT_VERSION}
  written = manifest.write(out, info | {"fp32_bytes": 4000, "files": table})
  on_disk = sum(p.stat().st_size for p in local.joinpath("export").rglob("*") if p.is_file())
  assert written["export_bytes"] == on_disk
  assert manifest.read(out) == written
  (weights / "blob").write_bytes(bytes(768))
  with pytest.raises(ExportError, match="does not match its sha256"):
    manifest.read(out)


@pytest.fixture(scope="module")
def source():
  """An 8x8 UNet with seeded normal params (its `init` would take ~40 s to compile on one core)."""
  config = tiny_config()
  model = unet_from_config(config.model)
  rng = np.random.default_rng(0)
  params = jax.tree.map(
    lambda a: rng.normal(0.0, 0.05, a.shape).astype(a.dtype), param_shapes(model, (8, 8, 1))
  )
  return Sampleable("tiny", model, params, (8, 8, 1), config.diffusion, config.sampling)


def test_generated_shards_and_their_manifest(workdir, source):
  path, local = workdir
  out = epath.Path(path) / "samples"
  result = generate(source, out, 3, seed=1, batch_size=8, shard_size=2, log=lambda _: None)
  assert result["drawn"] == 2
  assert sorted(p.name for p in (local / "samples").iterdir()) == [
    MANIFEST_NAME,
    "samples_00000.npz",
    "samples_00001.npz",
  ]
  samples = load_samples(out)
  assert samples.shape == (3, 8, 8, 1) and samples.dtype == np.uint8
  np.testing.assert_array_equal(samples, load_samples(local / "samples"))
  assert generate(source, out, 3, seed=1, batch_size=8, shard_size=2)["drawn"] == 0


def test_a_reference_cache(workdir):
  path, local = workdir
  extractor = types.SimpleNamespace(name="net-abc", source_sha256="abc")
  ref = {"format_version": 1, "dataset": "cifar10", "network_sha256": "abc", "mu": np.arange(3.0)}
  file = reference.reference_path(path, "cifar10", extractor)
  reference.save_reference(file, ref)
  assert (local / "ref_cifar10_net-abc.npz").is_file()
  loaded = reference.load_reference(file, "cifar10", extractor)
  np.testing.assert_array_equal(loaded.pop("mu"), ref.pop("mu"))
  assert loaded == ref


def test_the_workdir_lock(workdir):
  path, local = workdir
  with workdir_lock.hold(path):
    owner = json.loads((local / ".lock").read_text())
    assert owner["pid"] == os.getpid()
    with pytest.raises(workdir_lock.BadWorkdirError, match="in use by another job"):
      workdir_lock.acquire(path)
  assert not local.exists()  # Created by this job and left empty: removed with its lock.


def test_absolute_makes_only_local_paths_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert str(fileio.absolute("gs://bucket/run/teacher")) == "gs://bucket/run/teacher"
  assert str(fileio.absolute("run/teacher")) == os.path.join(os.getcwd(), "run", "teacher")
  assert fileio.is_remote("gs://bucket/run") and not fileio.is_remote("run")


def test_a_checkpoint_in_a_relative_local_workdir(tmp_path, monkeypatch):
  """Orbax gets an absolute path for a relative --workdir (gs:// ones are passed unchanged)."""
  monkeypatch.chdir(tmp_path)
  config = tiny_config()
  state = {"w": np.arange(4.0, dtype=np.float32)}
  with checkpointing.make_manager("run/teacher", keep=2) as manager:
    checkpointing.save(manager, 3, state, config)
    manager.wait_until_finished()
  with checkpointing.make_manager("run/teacher", keep=2) as manager:
    assert str(manager.directory) == os.path.join(os.getcwd(), "run", "teacher")
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    restored = checkpointing.restore_latest(manager, abstract, config, ("model",))
  np.testing.assert_array_equal(restored["w"], state["w"])


# The file operations that name a local path: a builtin open(), os file functions, pathlib,
# shutil, tempfile, glob, np.load / np.save on a path.
LOCAL_FILE_OPS = re.compile(
  r"(?<![\w.])open\(|\bos\.(path|makedirs|mkdir|listdir|scandir|walk|rename|replace|remove"
  r"|unlink|rmdir|open|fdopen|stat)\b|(?<![\w.])(pathlib|shutil|tempfile|glob)\b|\bnp\.(load|save)"
)
# Modules that never see a workdir: what they read or write is genuinely local.
LOCAL_ONLY = {
  "convert/diffusers_unet.py": "reads the user's diffusers checkpoint (safetensors reads files)",
  "convert/inception.py": "converts the user's local torch Inception .pth (torch.load)",
  "convert/compvis_ldm.py": "converts the user's local CompVis model.ckpt (torch.load)",
  "evaluation/inception.py": "the converted FID network's weights dir, copied to each host",
  "evaluation/digits_classifier.py": "the digits CNN shipped inside the package, or its user cache",
}
# Single lines allowed in the modules that handle workdirs.
ALLOWED_LINES = {
  (
    "training/workdir_lock.py",
    "os.open(lock, os.O_CREAT | os.O_EXCL",
  ): "exclusive create of a local lock",
  ("training/workdir_lock.py", "os.fdopen(fd,"): "writes the lock just created exclusively",
  ("runtime/fileio.py", "np.savez(buffer"): "an .npz built in memory",
  ("runtime/fileio.py", "np.load(io.BytesIO("): "an .npz read from bytes",
}


def _code(path: pathlib.Path) -> list[str]:
  """The lines of a module with its strings and comments blanked out."""
  lines = [list(line) for line in path.read_text().splitlines()]
  skip = {tokenize.STRING, tokenize.COMMENT, getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}
  with path.open("rb") as f:
    for token in tokenize.tokenize(f.readline):
      if token.type in skip:
        for row in range(token.start[0], token.end[0] + 1):
          line = lines[row - 1]
          start = token.start[1] if row == token.start[0] else 0
          end = token.end[1] if row == token.end[0] else len(line)
          line[start:end] = " " * (end - start)
  return ["".join(line) for line in lines]


def test_no_local_file_operations_on_workdir_paths():
  found, unused = [], set(LOCAL_ONLY)
  for module in sorted(PACKAGE.rglob("*.py")):
    name = module.relative_to(PACKAGE).as_posix()
    for number, code in enumerate(_code(module), 1):
      if not LOCAL_FILE_OPS.search(code):
        continue
      unused.discard(name)
      allowed = any(m == name and text in code for m, text in ALLOWED_LINES)
      if name not in LOCAL_ONLY and not allowed:
        found.append(f"binarydm_jax/{name}:{number}: {code.strip()}")
  assert not found, "use etils.epath / binarydm_jax.runtime.fileio on workdir paths:\n" + "\n".join(
    found
  )
  assert not unused, f"no local file operations left in {unused}: drop them from LOCAL_ONLY"


def test_unreachable_remote_workdir_is_one_line_naming_the_fix(bucket, monkeypatch):
  """What a gs:// workdir without credentials gives (tf.io.gfile's error, raised by the fake)."""

  def denied(path):
    raise tf.errors.PermissionDeniedError(None, None, f"401 Anonymous caller\n on {path}")

  monkeypatch.setattr(backend.tf_backend, "exists", denied)
  with pytest.raises(workdir_lock.BadWorkdirError) as e:
    with workdir_lock.hold("gs://bucket/run"):
      pass
  message = str(e.value)
  assert "\n" not in message
  assert "--workdir=gs://bucket/run cannot be read (PermissionDeniedError: 401" in message
  assert "GOOGLE_APPLICATION_CREDENTIALS" in message and "application-default login" in message
  assert not (bucket / "bucket").exists()  # Nothing written.


def test_unreadable_local_workdir_error_is_not_relabelled(tmp_path, monkeypatch):
  def broken(self):
    raise OSError("disk gone")

  monkeypatch.setattr(type(epath.Path(tmp_path)), "exists", broken)
  with pytest.raises(OSError, match="disk gone"):
    workdir_lock.check(str(tmp_path / "run"))
