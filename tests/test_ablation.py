"""The ablation benchmark's command line: --set overrides, the validated grid, result settings."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
from absl import app

from benchmarks import ablation_digits as ablation
from benchmarks import common
from configs import digits

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_set_values_parse_as_python_literals_or_strings():
  overrides = ablation.parse_overrides(
    ["qat.lrm_weight=1e-3", "qat.switch_step=400", "qat.lr_schedule=cosine_stage2", "qat.lrm=True"]
  )
  assert overrides == {
    "qat.lrm_weight": 1e-3,
    "qat.switch_step": 400,
    "qat.lr_schedule": "cosine_stage2",
    "qat.lrm": True,
  }
  with pytest.raises(app.UsageError, match="expected KEY=VALUE"):
    ablation.parse_overrides(["qat.lrm_weight"])


def test_overrides_change_the_config_and_bad_fields_are_usage_errors():
  config = digits.get_config()
  ablation.apply_overrides(config, {"qat.lrm_weight": 1e-3, "qat.num_steps": 1600})
  assert (config.qat.lrm_weight, config.qat.num_steps) == (1e-3, 1600)
  with pytest.raises(app.UsageError, match="qat.lrm_wieght"):
    ablation.apply_overrides(config, {"qat.lrm_wieght": 1e-3})
  with pytest.raises(app.UsageError, match="qat.num_steps"):
    ablation.apply_overrides(config, {"qat.num_steps": "long"})


def test_grid_is_seed_major_validated_and_sets_each_method():
  base = digits.get_config()
  grid = ablation.grid_configs(base, ["W1A32", "W1A4"], ["baseline", "lrm"], [0, 1])
  assert [key for key, _ in grid][:4] == [
    ("W1A32", "baseline", 0),
    ("W1A32", "lrm", 0),
    ("W1A4", "baseline", 0),
    ("W1A4", "lrm", 0),
  ]
  (_, lrm_config) = grid[1]
  assert lrm_config.quant.preset == "W1A32"
  assert (lrm_config.qat.method, lrm_config.qat.ebb, lrm_config.qat.lrm) == (
    "binarydm",
    False,
    True,
  )
  assert base.qat.lrm is None  # The base config is not modified.
  with pytest.raises(app.UsageError, match="--methods: unknown \\['lmr'\\]"):
    ablation.grid_configs(base, ["W1A4"], ["lmr"], [0])
  with pytest.raises(app.UsageError, match="--bits: unknown \\['W2A4'\\]"):
    ablation.grid_configs(base, ["W2A4"], ["baseline"], [0])
  base.qat.lr_schedule = "step"  # A bad --set value fails before any work starts.
  with pytest.raises(app.UsageError, match="config.qat.lr_schedule='step'"):
    ablation.grid_configs(base, ["W1A4"], ["baseline"], [0])


def test_results_of_other_overrides_have_other_settings():
  plain = {"qat_steps": 1600, "ebb_form": "paper", "runs": []}  # Written before --set existed.
  assert ablation.settings_of(plain) == ablation.settings_of({**plain, "overrides": {}})
  assert ablation.settings_of(plain) != ablation.settings_of(
    {**plain, "overrides": {"qat.lrm_weight": 1e-3}}
  )
  fresh = {**plain, "overrides": {"model.ch_mult": (1, 2)}}  # Read back, the tuple is a list.
  assert ablation.settings_of(fresh) == ablation.settings_of(json.loads(json.dumps(fresh)))


def test_code_version_names_the_checkout_commit():
  head = subprocess.run(
    ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
  ).stdout.strip()
  assert re.fullmatch(re.escape(head) + r"(\+dirty)?", common.code_version())


def test_report_merges_workers_into_means_and_per_seed_rows(capsys):
  def run(method, seed, fid, at_800=None):
    curve = {} if at_800 is None else {"fid_curve": {"800": at_800}}
    fidelity = {"psnr": 30 - fid / 10, "label_agreement": 0.5}
    return {
      "bits": "W1A8",
      "method": method,
      "seed": seed,
      "fid": fid,
      "fidelity": fidelity,
      **curve,
    }

  settings = {"qat_steps": 1600, "ebb_form": "paper", "overrides": {}}
  worker0 = {**settings, "teacher": 38.8, "runs": [run("baseline", 0, 50.0, 60.0)]}
  worker1 = {
    **settings,
    "teacher": None,
    "runs": [run("baseline", 1, 40.0, 50.0), run("binarydm", 1, 30.0)],
  }
  ablation.print_table([worker0, worker1], ["W1A8"], ["baseline", "binarydm"])
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == "teacher (FP): digits-FID 38.8"
  # The spread is the sample standard deviation (n - 1); one seed has none.
  assert "| W1A8 | 45.0 ± 7.1 (n=2) | 30.0 ± nan (n=1) |" in lines
  header = (
    "| method | seed 0 | seed 1 | mean ± std | at step 800 | paired PSNR (dB) | label agreement |"
  )
  assert header in lines
  assert (
    "| baseline | 50.0 | 40.0 | 45.0 ± 7.1 (n=2) | 55.0 ± 7.1 (n=2) | 25.50 ± 0.71 (n=2) | "
    "0.500 ± 0.000 (n=2) |"
  ) in lines
  assert (
    "| binarydm | - | 30.0 | 30.0 ± nan (n=1) | - | 27.00 ± nan (n=1) | 0.500 ± nan (n=1) |"
    in lines
  )
  # Paired by seed: only seed 1 has both methods.
  assert "| binarydm - baseline | fid | -10.0 | -10.0 ± nan (n=1) | 1/1 |" in lines
  assert "| binarydm - baseline | psnr | +1.00 | 1.00 ± nan (n=1) | 1/1 |" in lines


@pytest.mark.slow
def test_a_short_run_records_the_switch_and_the_steadier_scores(tmp_path):
  """Four QAT steps of BinaryDM from the committed teacher (switch at 2), scored on 16 samples."""
  out = tmp_path / "ablation.json"
  command = [
    sys.executable,
    "-m",
    "benchmarks.ablation_digits",
    f"--teacher={ROOT / 'benchmarks/results/digits_teacher_2026-12-02'}",
    "--bits=W1A4",
    "--methods=binarydm",
    "--seeds=0",
    "--qat_steps=4",
    "--switch_num_samples=16",
    "--set=eval.num_samples=16",
    "--set=eval.allow_few_samples=True",
    "--set=sampling.ddim_steps=2",
    "--set=qat.batch_size=8",
    "--fidelity_num=8",
    f"--out={out}",
  ]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
  assert result.returncode == 0, result.stderr[-3000:]
  (run,) = json.loads(out.read_text())["runs"]
  assert (run["bits"], run["method"], run["seed"]) == ("W1A4", "binarydm", 0)
  low, high = run["fid_ci"]
  assert 0 < low <= high and run["fid"] > 0 and run["fid_all"] > 0 and run["fid_all"] != run["fid"]
  assert run["kid_std_x1e3"] >= 0 and run["reliable"] is False  # 16 samples: too few for FID.
  assert run["switch"]["step"] == 2 and run["switch"]["num_samples"] == 16
  switch = run["switch"]
  keys = ("fid_two_basis", "fid_two_basis_raw", "fid_collapsed_ema", "fid_collapsed")
  assert all(switch[key] > 0 for key in keys), switch
  # sigma_II != 0 at S, so dropping it changes the EMA student's samples; the EMA is not the raw.
  assert switch["fid_collapsed_ema"] != switch["fid_two_basis"] != switch["fid_two_basis_raw"]
  # The paired measure of the final student against the teacher, on 8 shared noises.
  assert len(run["fidelity"]["per_image_mse"]) == 8 and 0 < run["fidelity"]["psnr"] < 60
  assert 0 <= run["fidelity"]["label_agreement"] <= 1
