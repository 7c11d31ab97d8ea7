"""Gaussian diffusion (Ho et al. 2020): noise schedules, forward noising, eps loss, DDPM and DDIM sampling.

All functions are pure and jit-able. A model enters as `eps_fn(x_t, t) -> eps` with integer timesteps.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

EpsFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
VARIANCES = ("fixedlarge", "fixedsmall")


@flax.struct.dataclass
class Schedule:
  """Per-timestep constants of a discrete diffusion with `num_timesteps` steps (float32 arrays)."""

  betas: jnp.ndarray
  alphas_cumprod: jnp.ndarray

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]


def _schedule(betas: np.ndarray) -> Schedule:
  """The schedule of float64 `betas`, its cumulative product taken in float64, both stored float32."""
  return Schedule(
    betas=jnp.asarray(betas, jnp.float32),
    alphas_cumprod=jnp.asarray(np.cumprod(1.0 - betas), jnp.float32),
  )


def linear_schedule(
  beta_start: float = 1e-4, beta_end: float = 0.02, num_timesteps: int = 1000
) -> Schedule:
  """DDPM's linear beta schedule, computed in float64 and stored as float32."""
  return _schedule(np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64))


def scaled_linear_schedule(
  beta_start: float = 0.0015, beta_end: float = 0.0195, num_timesteps: int = 1000
) -> Schedule:
  """The latent-diffusion schedule, linear in sqrt(beta): linspace(sqrt(start), sqrt(end), T)^2.

  diffusers calls it 'scaled_linear', CompVis' latent-diffusion 'linear'. The paper's LDMs use
  beta_start 0.0015 and beta_end 0.0195 (LSUN-Bedrooms, FFHQ) or 0.0155 (LSUN-Churches).
  """
  sqrt_betas = np.linspace(np.sqrt(beta_start), np.sqrt(beta_end), num_timesteps, dtype=np.float64)
  return _schedule(np.square(sqrt_betas))


_SCHEDULES = {"linear": linear_schedule, "scaled_linear": scaled_linear_schedule}
BETA_SCHEDULES = tuple(_SCHEDULES)


def schedule_from_config(diffusion_config: ml_collections.ConfigDict) -> Schedule:
  """Builds the schedule of the `config.diffusion` section (`beta_schedule` one of BETA_SCHEDULES)."""
  name = diffusion_config.beta_schedule
  if name not in _SCHEDULES:
    raise ValueError(f"config.diffusion.beta_schedule={name!r}: expected one of {BETA_SCHEDULES}")
  return _SCHEDULES[name](
    diffusion_config.beta_start, diffusion_config.beta_end, diffusion_config.num_timesteps
  )


def _bcast(values: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
  """Gathers per-timestep constants and shapes them (N, 1, 1, 1) for NHWC images."""
  return values[t][:, None, None, None]


def q_sample(
  schedule: Schedule, x0: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray
) -> jnp.ndarray:
  """Samples x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)."""
  abar = _bcast(schedule.alphas_cumprod, t)
  return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise


def noisy_inputs(
  schedule: Schedule, x0: jnp.ndarray, rng: jax.Array
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Draws t ~ U{0..T-1} and eps ~ N(0, I) per example; returns (x_t, t, eps)."""
  t_rng, noise_rng = jax.random.split(rng)
  t = jax.random.randint(t_rng, (x0.shape[0],), 0, schedule.num_timesteps)
  noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
  return q_sample(schedule, x0, t, noise), t, noise


def eps_mse(eps_pred: jnp.ndarray, noise: jnp.ndarray) -> jnp.ndarray:
  """L_simple: mean squared error between predicted and true noise (paper Eq. 4)."""
  return jnp.mean(jnp.square(eps_pred.astype(jnp.float32) - noise))


def predict_x0(
  schedule: Schedule, x_t: jnp.ndarray, t: jnp.ndarray, eps: jnp.ndarray
) -> jnp.ndarray:
  """x_0 implied by x_t and predicted noise."""
  abar = _bcast(schedule.alphas_cumprod, t)
  return (x_t - jnp.sqrt(1.0 - abar) * eps) / jnp.sqrt(abar)


def ddpm_step(
  schedule: Schedule,
  eps: jnp.ndarray,
  x_t: jnp.ndarray,
  t: jnp.ndarray,
  noise: jnp.ndarray,
  clip_denoised: bool = True,
  variance: str = "fixedlarge",
) -> jnp.ndarray:
  """One ancestral step x_t -> x_{t-1} through the posterior q(x_{t-1} | x_t, x_0_hat).

  `variance` is sigma_t^2 = beta_t ("fixedlarge", DDPM's CIFAR-10 choice) or the posterior
  variance beta_tilde_t ("fixedsmall"). No noise is added at t = 0.
  """
  if variance not in VARIANCES:
    raise ValueError(f"variance={variance!r}; expected one of {VARIANCES}")
  abar = _bcast(schedule.alphas_cumprod, t)
  abar_prev = _bcast(jnp.concatenate([jnp.ones((1,)), schedule.alphas_cumprod[:-1]]), t)
  beta = _bcast(schedule.betas, t)
  x0 = predict_x0(schedule, x_t, t, eps)
  if clip_denoised:
    x0 = jnp.clip(x0, -1.0, 1.0)
  mean = (jnp.sqrt(abar_prev) * beta * x0 + jnp.sqrt(1.0 - beta) * (1.0 - abar_prev) * x_t) / (
    1.0 - abar
  )
  var = beta if variance == "fixedlarge" else beta * (1.0 - abar_prev) / (1.0 - abar)
  nonzero = (t > 0).astype(x_t.dtype)[:, None, None, None]
  return mean + nonzero * jnp.sqrt(var) * noise


def ddim_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """Uniformly skipped timesteps, descending: (S-1)*T//S, ..., T//S, 0 (DDIM "uniform")."""
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"num_steps={num_steps} must be in [1, {num_timesteps}]")
  return (np.arange(num_steps) * (num_timesteps // num_steps))[::-1].astype(np.int32)


def ddim_step(
  schedule: Schedule,
  eps: jnp.ndarray,
  x_t: jnp.ndarray,
  t: jnp.ndarray,
  t_prev: jnp.ndarray,
  noise: jnp.ndarray,
  eta: float = 0.0,
  clip_denoised: bool = True,
) -> jnp.ndarray:
  """One DDIM step x_t -> x_{t_prev} (Song et al. 2021, Eq. 12); t_prev < 0 means the final step."""
  abar = _bcast(schedule.alphas_cumprod, t)
  abar_prev = jnp.where(t_prev >= 0, schedule.alphas_cumprod[jnp.maximum(t_prev, 0)], 1.0)[
    :, None, None, None
  ]
  x0 = predict_x0(schedule, x_t, t, eps)
  if clip_denoised:
    x0 = jnp.clip(x0, -1.0, 1.0)
  sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
  direction = jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma**2, 0.0)) * eps
  return jnp.sqrt(abar_prev) * x0 + direction + sigma * noise


def _per_sample(rng: jax.Array) -> bool:
  """Whether `rng` is a batch of keys (typed (N,) or raw (N, 2)) rather than one key."""
  return rng.ndim == (1 if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) else 2)


def _split_keys(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(init, loop) keys of a sampler: split one key, or each of a batch of per-sample keys."""
  if _per_sample(rng):
    keys = jax.vmap(jax.random.split)(rng)
    return keys[:, 0], keys[:, 1]
  init_rng, loop_rng = jax.random.split(rng)
  return init_rng, loop_rng


def _normal(rng: jax.Array, shape: tuple[int, ...], t: jax.Array | None = None) -> jax.Array:
  """Gaussian noise of `shape` (from `rng` folded with `t`); with per-sample keys, row i from key i."""
  if _per_sample(rng):
    if rng.shape[0] != shape[0]:
      raise ValueError(f"{rng.shape[0]} per-sample keys for a batch of {shape[0]} samples")
    return jax.vmap(lambda key: _normal(key, shape[1:], t))(rng)
  return jax.random.normal(rng if t is None else jax.random.fold_in(rng, t), shape)


def ddpm_sample(
  eps_fn: EpsFn,
  schedule: Schedule,
  shape: tuple[int, ...],
  rng: jax.Array,
  clip_denoised: bool = True,
  variance: str = "fixedlarge",
) -> jnp.ndarray:
  """Ancestral sampling over all T steps with a `lax.scan`; deterministic given `rng`.

  `rng` is one key, or one key per sample (shape[0] of them): then sample i depends only on key i,
  not on the batch it is drawn in.
  """
  init_rng, loop_rng = _split_keys(rng)

  def body(x, t):
    tt = jnp.full((shape[0],), t, jnp.int32)
    noise = _normal(loop_rng, shape, t)
    return ddpm_step(schedule, eps_fn(x, tt), x, tt, noise, clip_denoised, variance), None

  x = _normal(init_rng, shape)
  x, _ = jax.lax.scan(body, x, jnp.arange(schedule.num_timesteps - 1, -1, -1))
  return x


def ddim_sample(
  eps_fn: EpsFn,
  schedule: Schedule,
  shape: tuple[int, ...],
  rng: jax.Array,
  num_steps: int = 100,
  eta: float = 0.0,
  clip_denoised: bool = True,
) -> jnp.ndarray:
  """DDIM sampling with `num_steps` uniformly skipped steps; eta=0 is deterministic given x_T.

  `rng` is one key, or one key per sample, as in `ddpm_sample`.
  """
  timesteps = ddim_timesteps(schedule.num_timesteps, num_steps)
  prev = np.append(timesteps[1:], -1).astype(np.int32)
  init_rng, loop_rng = _split_keys(rng)

  def body(x, ts):
    t, t_prev = ts
    tt = jnp.full((shape[0],), t, jnp.int32)
    tp = jnp.full((shape[0],), t_prev, jnp.int32)
    noise = _normal(loop_rng, shape, t)
    return ddim_step(schedule, eps_fn(x, tt), x, tt, tp, noise, eta, clip_denoised), None

  x = _normal(init_rng, shape)
  x, _ = jax.lax.scan(body, x, (jnp.asarray(timesteps), jnp.asarray(prev)))
  return x
