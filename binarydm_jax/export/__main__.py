"""`python -m binarydm_jax.export --workdir=DIR [--out=DIR/export] [--fp_dtype=float32]
[--quant_dtype=float32]`."""

from absl import app, flags

from binarydm_jax.errors import one_line_errors
from binarydm_jax.export import FP_DTYPES, export_student_from_workdir

_WORKDIR = flags.DEFINE_string(
  "workdir", None, "A job's --workdir; its latest student checkpoint is exported.", required=True
)
_OUT = flags.DEFINE_string("out", None, "Export directory (default: WORKDIR/export).")
_FP_DTYPE = flags.DEFINE_string(
  "fp_dtype", "float32", f"Storage of the full-precision params: {', '.join(FP_DTYPES)}."
)
_QUANT_DTYPE = flags.DEFINE_string(
  "quant_dtype",
  "float32",
  f"Storage of the binary scales and activation steps: {', '.join(FP_DTYPES)}.",
)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  with one_line_errors():
    info = export_student_from_workdir(
      _WORKDIR.value, _OUT.value, _FP_DTYPE.value, _QUANT_DTYPE.value
    )
  out = _OUT.value or f"{_WORKDIR.value}/export"
  print(
    f"exported the {info['student']['bits']} student (step {info['student']['step']}) to {out}: "
    f"{info['export_bytes']} bytes on disk, {info['size_saving']}x smaller than its FP32 teacher "
    f"({info['fp32_bytes']} bytes)"
  )


if __name__ == "__main__":
  app.run(main)
