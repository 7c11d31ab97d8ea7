"""benchmarks/inception_throughput.py end to end with tiny numbers: the table and the JSON fields."""

import json

import pytest

from tests.test_export import run_module


@pytest.mark.slow
def test_inception_throughput_writes_every_field(tmp_path):
  out = tmp_path / "result.json"
  args = ["--batch=8", "--repeats=2", "--generate_and_score=8", "--steps=1", "--sample_batch=8"]
  result = run_module("benchmarks.inception_throughput", *args, f"--json={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert (
    "| flax |" in result.stdout and "| total at DDIM 100 (generation scaled) |" in result.stdout
  )
  data = json.loads(out.read_text())
  assert (data["batch"], data["image_size"], data["repeats"]) == (8, 32, 2)
  assert data["torch_fidelity"] == "0.4.0" and data["torch_device"] == "cpu"
  assert data["max_rel_diff_pool"] < 1e-4  # The two networks compute the same features.
  for name in ("flax", "torch-fidelity"):
    assert len(data["times_s"][name]) == 2 and data["images_per_s"][name] > 0
    assert data["images_per_s"][name] == pytest.approx(8 / data["seconds_per_batch"][name])
  timed = data["generate_and_score"]
  assert (timed["num_samples"], timed["ddim_steps"], timed["weights"]) == (8, 1, "random")
  assert timed["unet_params"] == 35_746_307  # configs/cifar.py's UNet.
  assert timed["total_s"] == pytest.approx(timed["generate_s"] + timed["score_s"])
  assert timed["estimated_total_s_at_ddim100"] == pytest.approx(
    100 * timed["generate_s"] + timed["score_s"]
  )
