"""FP train-step time of our Flax UNet (jit) vs diffusers' UNet2DModel (PyTorch), same machine.

  python benchmarks/train_step_vs_diffusers.py [--config=cifar|small] [--batch_size=8]
      [--repeats=5] [--steps_per_repeat=2] [--json=out.json]

One step = noise the batch at random timesteps, eps-prediction forward, eps-MSE loss, backward,
Adam update; the same architecture (the google/ddpm-cifar10-32 config by default, converted with
`model_config_from_diffusers`), the same batch and dropout 0.1 on both sides. Both frameworks use
every CPU core. After warm-up (and XLA compilation), `--repeats` rounds alternate between the two
(so machine load hits both alike) and each round times `--steps_per_repeat` steps; the medians of
the per-step times are reported, with their ratio ours/torch, as a markdown row.
torch and diffusers are test requirements (requirements-test.txt), not runtime ones.
"""

from __future__ import annotations

import json
import os
import statistics
import time

from absl import app, flags

from binarydm_jax.convert.diffusers_unet import DDPM_CIFAR10_CONFIG

_CONFIG = flags.DEFINE_enum("config", "cifar", ["cifar", "small"], "UNet2DModel config.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Batch size of one train step.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Interleaved timing rounds per framework.")
_STEPS = flags.DEFINE_integer("steps_per_repeat", 2, "Train steps timed in each round.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps per framework (after compilation).")
_JSON = flags.DEFINE_string("json", None, "Also write the results to this JSON file.")

# google/ddpm-cifar10-32's config.json (DDPM's CIFAR-10 UNet, 35.7M params), plus dropout 0.1.
CIFAR10 = {
  **{k: v for k, v in DDPM_CIFAR10_CONFIG.items() if k != "_class_name"},
  "dropout": 0.1,
}
SMALL = {
  **CIFAR10,
  "block_out_channels": [32, 64],
  "down_block_types": ["AttnDownBlock2D", "DownBlock2D"],
  "up_block_types": ["UpBlock2D", "AttnUpBlock2D"],
  "layers_per_block": 1,
  "norm_num_groups": 8,
  "attention_head_dim": 8,
  "sample_size": 16,
}
LEARNING_RATE = 2e-4


def _time_steps(step, n: int) -> float:
  """Seconds per step over `n` steps; `step()` must block until its result is ready."""
  start = time.perf_counter()
  for _ in range(n):
    step()
  return (time.perf_counter() - start) / n


def make_ours(diffusers_config: dict, batch_size: int):
  """Our jitted FP train step on a fixed batch; returns (step_fn, num_params)."""
  import jax
  import jax.numpy as jnp
  import optax

  from binarydm_jax import diffusion
  from binarydm_jax.convert.diffusers_unet import model_config_from_diffusers
  from binarydm_jax.models.unet import count_params, unet_from_config

  model_config = model_config_from_diffusers(diffusers_config)
  model = unet_from_config(model_config)
  schedule = diffusion.linear_schedule()
  tx = optax.adam(LEARNING_RATE)
  size, ch = model_config.image_size, model_config.channels
  rng = jax.random.key(0)
  x0 = jax.random.uniform(jax.random.fold_in(rng, 1), (batch_size, size, size, ch), minval=-1)
  params = jax.jit(model.init)(rng, x0[:1], jnp.zeros((1,), jnp.int32))["params"]
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

  def train_step(state, x0):
    step_rng = jax.random.fold_in(rng, state["step"])
    noise_rng, dropout_rng = jax.random.split(step_rng)

    def loss_fn(params):
      x_t, t, noise = diffusion.noisy_inputs(schedule, x0, noise_rng)
      eps = model.apply({"params": params}, x_t, t, train=True, rngs={"dropout": dropout_rng})
      return diffusion.eps_mse(eps, noise)

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, loss

  train_step = jax.jit(train_step, donate_argnums=(0,))
  holder = {"state": state}

  def step():
    holder["state"], loss = train_step(holder["state"], x0)
    loss.block_until_ready()

  return step, count_params(params)


def make_torch(diffusers_config: dict, batch_size: int):
  """diffusers UNet2DModel + torch.optim.Adam train step on a fixed batch; (step_fn, num_params)."""
  import diffusers
  import torch

  torch.manual_seed(0)
  model = diffusers.UNet2DModel(**diffusers_config).train()
  opt = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
  betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
  abar = torch.cumprod(1 - betas, 0).float()
  size, ch = diffusers_config["sample_size"], diffusers_config["in_channels"]
  x0 = torch.rand(batch_size, ch, size, size) * 2 - 1

  def step():
    t = torch.randint(0, 1000, (batch_size,))
    noise = torch.randn_like(x0)
    a = abar[t][:, None, None, None]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    loss = torch.nn.functional.mse_loss(model(x_t, t).sample, noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

  return step, sum(p.numel() for p in model.parameters())


def main(argv: list[str]) -> None:
  del argv
  import jax
  import torch

  cores = os.cpu_count()
  torch.set_num_threads(cores)  # XLA's CPU client uses every core by default.
  config = {"cifar": CIFAR10, "small": SMALL}[_CONFIG.value]
  batch = _BATCH.value

  load_before = os.getloadavg()[0]
  start = time.perf_counter()
  ours, n_ours = make_ours(config, batch)
  ours()  # compiles
  compile_s = time.perf_counter() - start
  theirs, n_theirs = make_torch(config, batch)
  if n_ours != n_theirs:
    raise SystemExit(f"different architectures: {n_ours} vs {n_theirs} params")
  for _ in range(_WARMUP.value):
    ours()
    theirs()

  times = {"ours": [], "torch": []}
  for _ in range(_REPEATS.value):
    times["ours"].append(_time_steps(ours, _STEPS.value))
    times["torch"].append(_time_steps(theirs, _STEPS.value))
  med = {k: statistics.median(v) for k, v in times.items()}
  result = {
    "config": _CONFIG.value,
    "batch_size": batch,
    "params": n_ours,
    "ours_ms": 1e3 * med["ours"],
    "torch_ms": 1e3 * med["torch"],
    "ratio_ours_over_torch": med["ours"] / med["torch"],
    "ours_compile_s": compile_s,
    "times_s": times,
    "repeats": _REPEATS.value,
    "steps_per_repeat": _STEPS.value,
    "cpu_cores": cores,
    # Other processes on the machine distort both sides (torch's OpenMP spin-waits suffer most;
    # OMP_WAIT_POLICY=PASSIVE helps it on a loaded machine): record the 1-min load average.
    "loadavg_1min_before_after": [load_before, os.getloadavg()[0]],
    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
    "torch_threads": torch.get_num_threads(),
    "jax": jax.__version__,
    "torch": torch.__version__,
    "device": jax.devices()[0].device_kind,
  }
  print(
    "| config | batch | params | ours (Flax, jit) ms/step | diffusers (torch) ms/step "
    "| ours/torch | cores | load avg |"
  )
  print("|---|---|---|---|---|---|---|---|")
  print(
    f"| {result['config']} | {batch} | {n_ours:,} | {result['ours_ms']:.0f} "
    f"| {result['torch_ms']:.0f} | {result['ratio_ours_over_torch']:.2f} | {cores} "
    f"| {load_before:.1f} -> {os.getloadavg()[0]:.1f} |"
  )
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  app.run(main)
