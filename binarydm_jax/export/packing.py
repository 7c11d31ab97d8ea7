"""Sign bits of binarized kernels packed into uint32 words, in the Larq Compute Engine layout.

A kernel's output channel becomes the leading axis and its input channels the packed last axis:
an HWIO conv kernel (kh, kw, c_in, c_out) becomes words of shape (c_out, kh, kw, ceil(c_in / 32)),
a dense kernel (c_in, c_out) words of shape (c_out, ceil(c_in / 32)) (LCE's bitpacked OHWI/OI
filters). Bit j of word w holds input channel 32 w + j (least significant bit first); it is 1 for a
negative weight (kernel < 0) and 0 otherwise, so sign(0) = +1 as in `quant.ste.sign`. The input
channels are padded to a multiple of 32 with 0 bits.
"""

from __future__ import annotations

import numpy as np

WORD_BITS = 32
_SHIFTS = np.arange(WORD_BITS, dtype=np.uint32)


def num_words(c_in: int) -> int:
  """Words per (output channel, spatial position) for `c_in` input channels."""
  return -(-c_in // WORD_BITS)


def pack_signs(kernel: np.ndarray) -> np.ndarray:
  """Packs the signs of a kernel along its input-channel axis (the second to last).

  Args:
    kernel: a conv (kh, kw, c_in, c_out) or dense (c_in, c_out) kernel; any float dtype.

  Returns:
    uint32 words of shape (c_out, *spatial, ceil(c_in / 32)); bit = 1 where kernel < 0.
  """
  kernel = np.asarray(kernel)
  if kernel.ndim < 2:
    raise ValueError(f"pack_signs: kernel of shape {kernel.shape}; expected (..., c_in, c_out)")
  bits = np.moveaxis(kernel < 0, -1, 0)  # (c_out, *spatial, c_in)
  c_in = bits.shape[-1]
  pad = num_words(c_in) * WORD_BITS - c_in
  bits = np.pad(bits, [(0, 0)] * (bits.ndim - 1) + [(0, pad)])
  bits = bits.reshape(*bits.shape[:-1], -1, WORD_BITS).astype(np.uint32)
  return np.bitwise_or.reduce(bits << _SHIFTS, axis=-1).astype(np.uint32)


def unpack_signs(words: np.ndarray, c_in: int) -> np.ndarray:
  """The +-1 float32 kernel whose signs `pack_signs` packed into `words`.

  Args:
    words: uint32 words of shape (c_out, *spatial, ceil(c_in / 32)).
    c_in: the kernel's input channels (the padding bits beyond them are dropped).

  Returns:
    The kernel (*spatial, c_in, c_out): -1.0 where the bit is 1, +1.0 where it is 0.
  """
  words = np.asarray(words)
  if words.dtype != np.uint32 or words.ndim < 2 or words.shape[-1] != num_words(c_in):
    raise ValueError(
      f"unpack_signs: words {words.dtype}{list(words.shape)} do not hold c_in={c_in} input "
      f"channels; expected uint32 (c_out, ..., {num_words(c_in)})"
    )
  bits = (words[..., None] >> _SHIFTS) & 1
  bits = bits.reshape(*words.shape[:-1], -1)[..., :c_in]
  return np.moveaxis(np.where(bits == 1, -1.0, 1.0).astype(np.float32), 0, -1)
