"""Activation quantizers screened without training: calibrated-only students against their teacher.

  python -m benchmarks.quantizer_screen --out=/tmp/screen.json [--variants=a,b] [--preset=W32A4]

Every variant is the committed digits teacher (`--teacher`) with the `--preset`'s layers quantized
by one activation-quantizer setting of `config.quant`, calibrated (no QAT), then sampled from the
same N noises along the same DDIM path as the teacher: the paired measure of
`binarydm_jax/evaluation/fidelity.py` (PSNR, label agreement, mean bias, per-image errors), the mean
SQNR of its quantized inputs by timestep group, and the digits-FID of the same samples. The results
JSON is rewritten after each variant; variants already in it are skipped (a killed screen resumes).
`--report=F` prints the table and paired comparisons against the first variant; `--plot=PNG`
draws PSNR and FID per variant.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import app, flags, logging

from benchmarks.common import code_version
from binarydm_jax import diffusion, student
from binarydm_jax.convert.teacher import load_teacher
from binarydm_jax.data.input_pipeline import load_dataset
from binarydm_jax.evaluation import fidelity
from binarydm_jax.evaluation.digits_classifier import DigitsFeatureExtractor
from binarydm_jax.evaluation.digits_fid import digits_fid
from binarydm_jax.models.unet import unet_from_config
from binarydm_jax.quant import binarize, with_policy
from binarydm_jax.runtime import sharding
from binarydm_jax.sampling.samplers import make_sampler, sample_many
from binarydm_jax.training import qat_stage
from configs import digits

FLAGS = flags.FLAGS
flags.DEFINE_string(
  "teacher",
  "benchmarks/results/digits_teacher_2026-12-02",
  "The FP teacher: WORKDIR/teacher of a digits run, or a converted checkpoint.",
)
flags.DEFINE_string("preset", "W32A4", "quant.preset of every variant (W32A4: FP weights).")
flags.DEFINE_list("variants", None, "Variants to run (default: all of VARIANTS).")
flags.DEFINE_integer("num", 512, "Paired samples per variant.")
flags.DEFINE_integer("seed", 0, "Seed of the sampling noises.")
flags.DEFINE_integer("sqnr_images", 64, "Training images noised in each of 10 timestep groups.")
flags.DEFINE_string("out", None, "Results JSON (rewritten after each variant).")
flags.DEFINE_list("report", None, "Print the table of these results JSONs and exit.")
flags.DEFINE_string("plot", None, "With --report: a PNG of PSNR and digits-FID per variant.")

SPREAD = {"calib_batches": 4}  # Calibration on 4 batches at timesteps spread over 0..T-1.
MSE_OFFSET = {"act_quantizer": "asymmetric", "act_init": "mse", **SPREAD}
# Variant -> (config.quant overrides, calibrate on the QAT stage's first batch at random t?).
VARIANTS = {
  "signed_lsq_1batch": ({}, True),
  "signed_lsq": (SPREAD, False),
  "signed_mse": ({"act_init": "mse", **SPREAD}, False),
  "offset_minmax": ({"act_quantizer": "asymmetric", **SPREAD}, False),
  "offset_mse": (MSE_OFFSET, False),
  "offset_mse_t10": ({**MSE_OFFSET, "act_t_groups": 10}, False),
  "offset_mse_split": ({**MSE_OFFSET, "act_split": True}, False),
  "offset_mse_temb8": ({**MSE_OFFSET, "temb_act_bits": 8}, False),
  "offset_mse_bc": ({**MSE_OFFSET, "bias_correction": True}, False),
  "offset_mse_bc_t10": ({**MSE_OFFSET, "bias_correction": True, "act_t_groups": 10}, False),
  "offset_mse_split_temb8_bc": (
    {**MSE_OFFSET, "act_split": True, "temb_act_bits": 8, "bias_correction": True},
    False,
  ),
  "dynamic": ({"act_quantizer": "dynamic"}, False),
}


def screen_config(preset: str, overrides: dict):
  """The digits config with `quant.preset` and the variant's `quant` fields."""
  config = digits.get_config()
  config.quant.preset = preset
  config.qat.method = "baseline"  # One basis: no EBB (W32A4 has no binary weights anyway).
  for key, value in overrides.items():
    config.quant[key] = value
  return config


def run_variant(name, teacher_params, dataset, mesh, teacher_images, extractor, schedule) -> dict:
  """Calibrates the variant's student and measures it against the teacher's images."""
  overrides, first_batch = VARIANTS[name]
  config = screen_config(FLAGS.preset, overrides)
  model = unet_from_config(config.model)
  settings = student.resolve_settings(config.qat, config.quant)
  policy = student.student_policy(config, settings, model, dataset.train.shape[1:])
  if first_batch:  # As the QAT stage calibrated before the calibration batches spanned t.
    calibration = qat_stage.noised_batches(dataset, schedule, mesh, 1, config.qat.batch_size)[0]
  else:
    calibration = qat_stage.calibration_batch(
      dataset, schedule, mesh, config.quant.calib_batches, config.qat.batch_size
    )
  started = time.time()
  params = binarize(teacher_params, policy, calibration, model=model)
  quantized = with_policy(model, policy)
  images = sample_images(quantized, params, config, mesh, dataset)
  result = fidelity.image_fidelity(teacher_images, images, extractor)
  x_t, t = fidelity.timestep_group_batch(dataset.train[: FLAGS.sqnr_images], schedule, 10)
  result["sqnr"] = fidelity.sqnr_table(quantized, params, x_t, t, 10, schedule.num_timesteps)
  result["fid"] = digits_fid(images, dataset.heldout, extractor)["fid"]
  result["overrides"], result["seconds"] = overrides, round(time.time() - started, 1)
  return result


def sample_images(model, params, config, mesh, dataset) -> np.ndarray:
  """`--num` DDIM samples from the screen's fixed noises."""
  schedule = diffusion.schedule_from_config(config.diffusion)
  sampler = make_sampler(model, schedule, config.sampling, mesh, dataset.train.shape[1:])
  batch = min(config.eval.batch_size, FLAGS.num)
  return sample_many(sampler, params, jax.random.PRNGKey(FLAGS.seed), FLAGS.num, batch)


def print_report(results: dict) -> None:
  """A markdown row per variant; the paired column compares each with the first variant."""
  names = list(results["variants"])
  base = np.asarray(results["variants"][names[0]]["per_image_mse"])
  print(f"teacher digits-FID ({results['num']} samples): {results['teacher_fid']:.1f}")
  print(
    "| variant | PSNR (dB) | label agreement | mean bias | background (teacher "
    f"{results['background_teacher']:.3f}) | mean SQNR (dB) | digits-FID | images closer than "
    f"{names[0]} |"
  )
  print("|---|---|---|---|---|---|---|---|")
  for name in names:
    r = results["variants"][name]
    closer = np.mean(np.asarray(r["per_image_mse"]) < base)
    print(
      f"| {name} | {r['psnr']:.2f} | {r['label_agreement']:.3f} | {r['mean_bias']:+.3f} | "
      f"{r['background']['student']:.3f} | {r['sqnr']['mean']:.1f} | {r['fid']:.1f} | "
      f"{closer:.2f} |"
    )


def plot(results: dict, path: str) -> None:
  """Bars of PSNR and digits-FID per variant, saved as a PNG."""
  import matplotlib  # noqa: PLC0415 (benchmark-only dependency)

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  names = list(results["variants"])
  runs = [results["variants"][n] for n in names]
  figure, axes = plt.subplots(1, 2, figsize=(12, 0.4 * len(names) + 1.5), sharey=True)
  axes[0].barh(names, [r["psnr"] for r in runs], color="tab:blue")
  axes[0].set_xlabel("paired PSNR against the teacher (dB, higher is closer)")
  axes[1].barh(names, [r["fid"] for r in runs], color="tab:orange")
  axes[1].axvline(results["teacher_fid"], color="k", linestyle="--", label="teacher")
  axes[1].set_xlabel(f"digits-FID ({results['num']} samples, lower is better)")
  axes[1].legend()
  axes[0].invert_yaxis()
  figure.suptitle(f"{results['preset']} calibrated without training, committed digits teacher")
  figure.tight_layout()
  figure.savefig(path, dpi=100)


def main(argv):
  del argv
  if FLAGS.report:
    for path in FLAGS.report:
      with open(path) as f:
        results = json.load(f)
      print_report(results)
      if FLAGS.plot:
        plot(results, FLAGS.plot)
    return
  names = FLAGS.variants or list(VARIANTS)
  unknown = sorted(set(names) - set(VARIANTS))
  if unknown:
    raise app.UsageError(f"--variants: unknown {unknown}; expected some of {list(VARIANTS)}")
  base = screen_config(FLAGS.preset, {})
  mesh = sharding.make_mesh(base.mesh)
  dataset = load_dataset(base.data, base.model.channels)
  schedule = diffusion.schedule_from_config(base.diffusion)
  _, teacher_params = load_teacher(FLAGS.teacher)
  teacher_params = jax.device_put(teacher_params, sharding.tree_shardings(teacher_params, mesh))
  extractor = DigitsFeatureExtractor(base.data.image_size)
  teacher_images = sample_images(unet_from_config(base.model), teacher_params, base, mesh, dataset)
  results = {
    "preset": FLAGS.preset,
    "num": FLAGS.num,
    "seed": FLAGS.seed,
    "teacher_fid": digits_fid(teacher_images, dataset.heldout, extractor)["fid"],
    "background_teacher": float(np.mean(teacher_images <= fidelity.BACKGROUND)),
    "code": code_version(),
    "variants": {},
  }
  if FLAGS.out and os.path.exists(FLAGS.out):
    with open(FLAGS.out) as f:
      results["variants"] = json.load(f)["variants"]
  for name in names:
    if name in results["variants"]:
      continue
    result = run_variant(name, teacher_params, dataset, mesh, teacher_images, extractor, schedule)
    logging.info("screen %s: PSNR %.2f, FID %.1f", name, result["psnr"], result["fid"])
    results["variants"][name] = result
    if FLAGS.out:
      with open(FLAGS.out, "w") as f:
        json.dump(results, f, indent=1)
  print_report(results)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  app.run(main)
