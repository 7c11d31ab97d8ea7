"""The FID InceptionV3 in Flax: the TF 2015-12-05 graph that ADM's evaluator and torch-fidelity run.

`InceptionV3` is torch-fidelity 0.4.0's `FeatureExtractorInceptionV3` layer for layer (itself the
TF graph ported to PyTorch): uint8 NHWC images of any size are resized to 299x299 with TF1's
bilinear kernel (`tf1_resize`), mapped to [-1, 1) by (x - 128) / 128, and run through the
FID-specific blocks (average pools that ignore the padding in Mixed_5b-5d, 6b-6e and 7b, a max pool
in 7c's pool branch). Batch norms are folded into the conv biases by the converter
(`binarydm_jax.convert.inception`), so a BasicConv2d here is one biased conv and a ReLU.

Outputs (`InceptionOutputs`):
  pool: the 2048-d `pool_3` features of FID, precision/recall and KID.
  spatial: sFID's features, ADM's `mixed_6/conv` (Mixed_6d's 1x1 branch after its ReLU) cut to the
    first 7 channels, 17x17x7 flattened in NHWC order (2023-d), the layout of ADM's reference npz.
  logits_unbiased: pool @ fc.kernel, the 1008 logits without the bias, which ADM's evaluator
    (`softmax/logits/MatMul`) and torch-fidelity (`logits_unbiased`) feed to the Inception Score.
  logits: logits_unbiased + fc.bias, the classifier's logits.

Weights: `load_inception(DIR)` reads what the converter wrote from torch-fidelity's
`weights-inception-2015-12-05-6726825d.pth` (`WEIGHTS_URL`; sha256 `WEIGHTS_SHA256`) and refuses
other weights unless asked to take them.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, NamedTuple

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from binarydm_jax.errors import UserError
from binarydm_jax.evaluation.tf1_resize import resize_bilinear_tf1

WEIGHTS_URL = (
  "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
  "weights-inception-2015-12-05-6726825d.pth"
)
# sha256 of the file above (95,628,359 bytes); torch.hub's name suffix 6726825d is its prefix.
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
DEFAULT_DIR = pathlib.Path("~/.cache/binarydm_jax/inception_fid").expanduser()
PARAMS_NAME = "inception_fid.msgpack"
META_NAME = "inception_fid.json"
INPUT_SIZE = 299
NUM_CLASSES = 1008
POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS
_FORMAT_VERSION = 1
_HIGHEST = jax.lax.Precision.HIGHEST
_CONVERT_HINT = "python -m binarydm_jax.convert.inception --pth=FILE.pth --out=DIR"


class InceptionError(UserError, ValueError):
  """Missing, unconverted, corrupt or unexpected Inception weights."""


class InceptionOutputs(NamedTuple):
  """Per-image outputs of `InceptionV3` (see the module docstring)."""

  pool: Any
  spatial: Any
  logits_unbiased: Any
  logits: Any


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
  return (value, value) if isinstance(value, int) else value


def _conv(
  x: jax.Array,
  name: str,
  features: int,
  kernel: int | tuple[int, int],
  strides: int = 1,
  padding: int | tuple[int, int] = 0,
) -> jax.Array:
  """torch-fidelity's BasicConv2d (conv, batch norm, ReLU) with the batch norm folded in."""
  pad_h, pad_w = _pair(padding)
  conv = nn.Conv(
    features,
    _pair(kernel),
    strides=_pair(strides),
    padding=((pad_h, pad_h), (pad_w, pad_w)),
    precision=_HIGHEST,
    name=name,
  )
  return nn.relu(conv(x))


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  """TF's 3x3 stride-1 SAME average pool: the padded zeros are not counted."""
  return nn.avg_pool(x, (3, 3), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array, strides: int, padding: int) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(strides, strides), padding=((padding, padding),) * 2)


class _InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    branch1x1 = _conv(x, "branch1x1", 64, 1)
    branch5x5 = _conv(x, "branch5x5_1", 48, 1)
    branch5x5 = _conv(branch5x5, "branch5x5_2", 64, 5, padding=2)
    branch3x3dbl = _conv(x, "branch3x3dbl_1", 64, 1)
    branch3x3dbl = _conv(branch3x3dbl, "branch3x3dbl_2", 96, 3, padding=1)
    branch3x3dbl = _conv(branch3x3dbl, "branch3x3dbl_3", 96, 3, padding=1)
    branch_pool = _conv(_avg_pool_3x3(x), "branch_pool", self.pool_features, 1)
    return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class _InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    branch3x3 = _conv(x, "branch3x3", 384, 3, strides=2)
    branch3x3dbl = _conv(x, "branch3x3dbl_1", 64, 1)
    branch3x3dbl = _conv(branch3x3dbl, "branch3x3dbl_2", 96, 3, padding=1)
    branch3x3dbl = _conv(branch3x3dbl, "branch3x3dbl_3", 96, 3, strides=2)
    branch_pool = _max_pool_3x3(x, strides=2, padding=0)
    return jnp.concatenate([branch3x3, branch3x3dbl, branch_pool], axis=-1)


class _InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns the block's output and its 1x1 branch (sFID reads Mixed_6d's)."""
    c7 = self.channels_7x7
    branch1x1 = _conv(x, "branch1x1", 192, 1)
    branch7x7 = _conv(x, "branch7x7_1", c7, 1)
    branch7x7 = _conv(branch7x7, "branch7x7_2", c7, (1, 7), padding=(0, 3))
    branch7x7 = _conv(branch7x7, "branch7x7_3", 192, (7, 1), padding=(3, 0))
    branch7x7dbl = _conv(x, "branch7x7dbl_1", c7, 1)
    branch7x7dbl = _conv(branch7x7dbl, "branch7x7dbl_2", c7, (7, 1), padding=(3, 0))
    branch7x7dbl = _conv(branch7x7dbl, "branch7x7dbl_3", c7, (1, 7), padding=(0, 3))
    branch7x7dbl = _conv(branch7x7dbl, "branch7x7dbl_4", c7, (7, 1), padding=(3, 0))
    branch7x7dbl = _conv(branch7x7dbl, "branch7x7dbl_5", 192, (1, 7), padding=(0, 3))
    branch_pool = _conv(_avg_pool_3x3(x), "branch_pool", 192, 1)
    out = jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)
    return out, branch1x1


class _InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    branch3x3 = _conv(x, "branch3x3_1", 192, 1)
    branch3x3 = _conv(branch3x3, "branch3x3_2", 320, 3, strides=2)
    branch7x7x3 = _conv(x, "branch7x7x3_1", 192, 1)
    branch7x7x3 = _conv(branch7x7x3, "branch7x7x3_2", 192, (1, 7), padding=(0, 3))
    branch7x7x3 = _conv(branch7x7x3, "branch7x7x3_3", 192, (7, 1), padding=(3, 0))
    branch7x7x3 = _conv(branch7x7x3, "branch7x7x3_4", 192, 3, strides=2)
    branch_pool = _max_pool_3x3(x, strides=2, padding=0)
    return jnp.concatenate([branch3x3, branch7x7x3, branch_pool], axis=-1)


class _InceptionE(nn.Module):
  """Mixed_7b (average pool, `max_pool=False`) or Mixed_7c (max pool, as the TF graph has it)."""

  max_pool: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    def split_3x3(y: jax.Array, prefix: str) -> jax.Array:
      return jnp.concatenate(
        [
          _conv(y, f"{prefix}a", 384, (1, 3), padding=(0, 1)),
          _conv(y, f"{prefix}b", 384, (3, 1), padding=(1, 0)),
        ],
        axis=-1,
      )

    branch1x1 = _conv(x, "branch1x1", 320, 1)
    branch3x3 = split_3x3(_conv(x, "branch3x3_1", 384, 1), "branch3x3_2")
    branch3x3dbl = _conv(x, "branch3x3dbl_1", 448, 1)
    branch3x3dbl = _conv(branch3x3dbl, "branch3x3dbl_2", 384, 3, padding=1)
    branch3x3dbl = split_3x3(branch3x3dbl, "branch3x3dbl_3")
    pooled = _max_pool_3x3(x, strides=1, padding=1) if self.max_pool else _avg_pool_3x3(x)
    branch_pool = _conv(pooled, "branch_pool", 192, 1)
    return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=-1)


class _Logits(nn.Module):
  """The 2048 -> 1008 classifier, returning its logits without and with the bias."""

  @nn.compact
  def __call__(self, pool: jax.Array) -> tuple[jax.Array, jax.Array]:
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (POOL_DIM, NUM_CLASSES))
    bias = self.param("bias", nn.initializers.zeros_init(), (NUM_CLASSES,))
    unbiased = jnp.dot(pool, kernel, precision=_HIGHEST)
    return unbiased, unbiased + bias


class InceptionV3(nn.Module):
  """The FID InceptionV3 (module names and order as torch-fidelity's, BN folded into the convs)."""

  @nn.compact
  def __call__(self, images: jax.Array) -> InceptionOutputs:
    """Runs the network.

    Args:
      images: uint8 (or integer-valued float) NHWC RGB images, any height and width.

    Returns:
      `InceptionOutputs` of float32 arrays: pool (N, 2048), spatial (N, 2023),
      logits_unbiased (N, 1008), logits (N, 1008).
    """
    x = resize_bilinear_tf1(images.astype(jnp.float32), (INPUT_SIZE, INPUT_SIZE))
    x = (x - 128.0) / 128.0
    x = _conv(x, "Conv2d_1a_3x3", 32, 3, strides=2)
    x = _conv(x, "Conv2d_2a_3x3", 32, 3)
    x = _conv(x, "Conv2d_2b_3x3", 64, 3, padding=1)
    x = _max_pool_3x3(x, strides=2, padding=0)
    x = _conv(x, "Conv2d_3b_1x1", 80, 1)
    x = _conv(x, "Conv2d_4a_3x3", 192, 3)
    x = _max_pool_3x3(x, strides=2, padding=0)
    x = _InceptionA(32, name="Mixed_5b")(x)
    x = _InceptionA(64, name="Mixed_5c")(x)
    x = _InceptionA(64, name="Mixed_5d")(x)
    x = _InceptionB(name="Mixed_6a")(x)
    x, _ = _InceptionC(128, name="Mixed_6b")(x)
    x, _ = _InceptionC(160, name="Mixed_6c")(x)
    x, mixed_6_conv = _InceptionC(160, name="Mixed_6d")(x)
    x, _ = _InceptionC(192, name="Mixed_6e")(x)
    x = _InceptionD(name="Mixed_7a")(x)
    x = _InceptionE(max_pool=False, name="Mixed_7b")(x)
    x = _InceptionE(max_pool=True, name="Mixed_7c")(x)
    pool = jnp.mean(x, axis=(1, 2))
    logits_unbiased, logits = _Logits(name="fc")(pool)
    spatial = mixed_6_conv[..., :SPATIAL_CHANNELS].reshape(pool.shape[0], -1)
    return InceptionOutputs(pool, spatial, logits_unbiased, logits)


def abstract_params() -> dict[str, Any]:
  """The `params` tree of `InceptionV3` as shape/dtype structs (nothing is computed)."""
  images = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.uint8)
  return jax.eval_shape(InceptionV3().init, jax.random.key(0), images)["params"]


def check_params(params: Any) -> None:
  """Raises InceptionError (naming the differences) unless `params` fit `InceptionV3` exactly."""
  want = {
    "/".join(p.key for p in path): leaf.shape
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params())
  }
  have = {
    "/".join(p.key for p in path): np.shape(leaf)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params)
  }
  problems = [f"missing {k}" for k in sorted(want.keys() - have.keys())]
  problems += [f"unexpected {k}" for k in sorted(have.keys() - want.keys())]
  problems += [
    f"{k}: shape {have[k]}, expected {want[k]}"
    for k in sorted(want.keys() & have.keys())
    if tuple(have[k]) != tuple(want[k])
  ]
  if problems:
    raise InceptionError(f"params do not fit the FID InceptionV3: {'; '.join(problems[:10])}")


def file_sha256(path: str | os.PathLike) -> str:
  """Hex sha256 of a file's bytes."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def save_inception(
  out_dir: str | os.PathLike,
  params: dict[str, Any],
  *,
  source_name: str,
  source_sha256: str,
  overwrite: bool = False,
) -> pathlib.Path:
  """Writes converted params and their provenance to `out_dir` (`PARAMS_NAME`, `META_NAME`).

  Args:
    out_dir: the directory to create (atomically: written beside it, then renamed).
    params: InceptionV3's `params` tree (float32 arrays).
    source_name: the file the params were converted from (recorded).
    source_sha256: that file's sha256, which `load_inception` checks against `WEIGHTS_SHA256`.
    overwrite: replace `out_dir` if it exists.

  Returns:
    The absolute path of `out_dir`.

  Raises:
    InceptionError: if `params` do not fit the network, or `out_dir` exists and not `overwrite`.
  """
  check_params(params)
  out_dir = pathlib.Path(out_dir).expanduser().absolute()
  if out_dir.exists() and not overwrite:
    raise InceptionError(
      f"{out_dir} exists: pass --overwrite (overwrite=True) or pick another --out"
    )
  payload = flax.serialization.msgpack_serialize(
    jax.tree.map(lambda a: np.asarray(a, np.float32), params)
  )
  meta = {
    "format_version": _FORMAT_VERSION,
    "source_file": source_name,
    "source_sha256": source_sha256,
    "params_sha256": hashlib.sha256(payload).hexdigest(),
  }
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
  (tmp / PARAMS_NAME).write_bytes(payload)
  (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
  if out_dir.exists():
    shutil.rmtree(out_dir)
  tmp.rename(out_dir)
  return out_dir


class InceptionExtractor:
  """The FID InceptionV3 with its params: jitted, batched, on host uint8 images.

  Attributes:
    params: the `params` tree on the default device.
    source_sha256: sha256 of the `.pth` the params were converted from.
    name: "inception_2015_12_05_" + the first 8 hex digits of `source_sha256`, for result files.
  """

  def __init__(self, params: dict[str, Any], source_sha256: str):
    check_params(params)
    self.params = jax.tree.map(jnp.asarray, params)
    self.source_sha256 = source_sha256
    self.name = f"inception_2015_12_05_{source_sha256[:8]}"
    self._apply = jax.jit(InceptionV3().apply)

  def __call__(self, images: np.ndarray, batch_size: int = 250) -> InceptionOutputs:
    """Features of uint8 NHWC RGB images, in batches of `batch_size` (the last one padded).

    Args:
      images: uint8 array (N, H, W, 3), N >= 1, any H and W (resized to 299 inside).
      batch_size: images per device call (one compiled shape per image size).

    Returns:
      `InceptionOutputs` of float32 numpy arrays with N rows each.

    Raises:
      ValueError: if `images` is not a non-empty uint8 (N, H, W, 3) array.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
      raise ValueError(
        f"Inception needs RGB images of shape (N >= 1, H, W, 3), got {images.shape}: "
        "grayscale images can be repeated with np.repeat(images, 3, axis=-1)"
      )
    if images.dtype != np.uint8:
      raise ValueError(
        f"Inception needs uint8 images, got {images.dtype}: round and clip first, "
        "np.clip(np.rint(x), 0, 255).astype(np.uint8) for x in [0, 255]"
      )
    batch = min(batch_size, len(images))
    parts = []
    for start in range(0, len(images), batch):
      chunk = images[start : start + batch]
      padded = np.concatenate([chunk, np.zeros((batch - len(chunk), *chunk.shape[1:]), np.uint8)])
      out = self._apply({"params": self.params}, padded)
      parts.append([np.asarray(a)[: len(chunk)] for a in out])
    return InceptionOutputs(*(np.concatenate(field) for field in zip(*parts, strict=True)))


def check_weights(
  path: str | os.PathLike | None = None, *, allow_other_weights: bool = False
) -> dict[str, Any]:
  """Checks, without reading the params, that `path` holds converted FID Inception weights.

  What a job runs before its hours of training: the missing-directory, format and source-hash
  errors of `load_inception` (the params file's own hash is checked when it is loaded).

  Args:
    path: the converter's `--out` directory; `DEFAULT_DIR` when None.
    allow_other_weights: accept params converted from a file whose sha256 is not `WEIGHTS_SHA256`.

  Returns:
    The weights' provenance (`META_NAME`): `source_file`, `source_sha256`, `params_sha256`.

  Raises:
    InceptionError: (one line) see `load_inception`.
  """
  path = pathlib.Path(DEFAULT_DIR if path is None else path).expanduser()
  if path.is_file() and path.suffix == ".pth":
    raise InceptionError(
      f"{path} is the PyTorch file: convert it once with "
      f"python -m binarydm_jax.convert.inception --pth={path} --out=DIR and load DIR"
    )
  if not (path / PARAMS_NAME).is_file() or not (path / META_NAME).is_file():
    raise InceptionError(
      f"no converted FID Inception weights in {path} ({PARAMS_NAME}, {META_NAME}): download "
      f"{WEIGHTS_URL} and run {_CONVERT_HINT.replace('DIR', str(path))}"
    )
  meta = json.loads((path / META_NAME).read_text())
  if meta.get("format_version") != _FORMAT_VERSION:
    raise InceptionError(
      f"{path / META_NAME} has format_version {meta.get('format_version')!r}, this code reads "
      f"{_FORMAT_VERSION}: convert the .pth again with {_CONVERT_HINT}"
    )
  if meta["source_sha256"] != WEIGHTS_SHA256 and not allow_other_weights:
    raise InceptionError(
      f"{path} was converted from {meta['source_file']} with sha256 {meta['source_sha256']}, not "
      f"the FID Inception ({WEIGHTS_SHA256}): download {WEIGHTS_URL} and convert it, or pass "
      "allow_other_weights=True for other weights"
    )
  return meta


def load_inception(
  path: str | os.PathLike | None = None, *, allow_other_weights: bool = False
) -> InceptionExtractor:
  """Loads the converted FID Inception weights written by `binarydm_jax.convert.inception`.

  Args:
    path: the converter's `--out` directory; `DEFAULT_DIR` (~/.cache/binarydm_jax/inception_fid)
      when None.
    allow_other_weights: accept params converted from a file whose sha256 is not `WEIGHTS_SHA256`
      (tests' random weights); their features are not the standard FID's.

  Returns:
    An `InceptionExtractor`.

  Raises:
    InceptionError: (one line) when the directory or its files are missing, the params file is
      corrupt, or the weights are not torch-fidelity's 2015-12-05 Inception.
  """
  meta = check_weights(path, allow_other_weights=allow_other_weights)
  path = pathlib.Path(DEFAULT_DIR if path is None else path).expanduser()
  payload = (path / PARAMS_NAME).read_bytes()
  if hashlib.sha256(payload).hexdigest() != meta["params_sha256"]:
    raise InceptionError(
      f"{path / PARAMS_NAME} does not match the sha256 recorded in {META_NAME} (corrupt or "
      f"edited): convert the .pth again with {_CONVERT_HINT}"
    )
  params = flax.serialization.msgpack_restore(payload)
  return InceptionExtractor(params, meta["source_sha256"])
