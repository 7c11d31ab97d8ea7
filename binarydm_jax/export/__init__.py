"""The 1-bit export of a trained single-basis student: packed sign bits, a loader and the CLI.

`python -m binarydm_jax.export --workdir=DIR` writes DIR/export; `load_export` rebuilds the model.
"""

from binarydm_jax.export.manifest import FORMAT_VERSION, FP_DTYPES, ExportError
from binarydm_jax.export.packing import pack_signs, unpack_signs
from binarydm_jax.export.reader import load_export
from binarydm_jax.export.writer import export_student, export_student_from_workdir
from binarydm_jax.quant import INFERENCE_MODES

__all__ = [
  "FORMAT_VERSION",
  "FP_DTYPES",
  "INFERENCE_MODES",
  "ExportError",
  "export_student",
  "export_student_from_workdir",
  "load_export",
  "pack_signs",
  "unpack_signs",
]
