"""Gaussian diffusion: schedule, forward noising, the DDPM/DDIM steps and samplers (oracle tests)."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from binarydm_jax import diffusion

SHAPE = (3, 4, 4, 2)


def _x0(shape=SHAPE, seed=0):
  """A known clean image batch inside [-1, 1] (so clipping never changes it)."""
  return jnp.asarray(np.random.default_rng(seed).uniform(-0.9, 0.9, shape), jnp.float32)


def _oracle(schedule, x0):
  """The perfect eps predictor for a single known x0: eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""

  def eps_fn(x_t, t):
    abar = schedule.alphas_cumprod[t][:, None, None, None]
    return (x_t - jnp.sqrt(abar) * x0) / jnp.sqrt(1.0 - abar)

  return eps_fn


def _not_oracle(x_t, t):
  """Some smooth eps model, so samples depend on the initial noise."""
  return 0.5 * jnp.tanh(x_t) + 1e-4 * t[:, None, None, None]


# ------------------------------------------------------------------------ schedule and q


def test_linear_schedule():
  s = diffusion.linear_schedule()
  assert s.num_timesteps == 1000
  assert s.betas.dtype == jnp.float32 and s.alphas_cumprod.dtype == jnp.float32
  np.testing.assert_allclose(s.betas[0], 1e-4, rtol=1e-6)
  np.testing.assert_allclose(s.betas[-1], 0.02, rtol=1e-6)
  betas = np.linspace(1e-4, 0.02, 1000)
  np.testing.assert_allclose(s.betas, betas, rtol=1e-6)
  np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-5)
  np.testing.assert_allclose(s.alphas_cumprod[0], 1 - 1e-4, rtol=1e-7)
  np.testing.assert_allclose(s.alphas_cumprod[-1], 4.0358e-5, rtol=1e-3)  # DDPM's abar_T
  assert np.all(np.diff(s.alphas_cumprod) < 0)


def test_schedule_from_config():
  cfg = ml_collections.ConfigDict(
    dict(beta_schedule="linear", beta_start=1e-3, beta_end=0.1, num_timesteps=50)
  )
  s = diffusion.schedule_from_config(cfg)
  assert s.num_timesteps == 50
  np.testing.assert_allclose([s.betas[0], s.betas[-1]], [1e-3, 0.1], rtol=1e-6)
  cfg.beta_schedule = "cosine"
  with pytest.raises(
    ValueError, match=r"^config\.diffusion\.beta_schedule='cosine'.*scaled_linear"
  ):
    diffusion.schedule_from_config(cfg)


@pytest.mark.parametrize("beta_end", [0.0195, 0.0155])  # LSUN-Bedrooms and FFHQ; LSUN-Churches
def test_scaled_linear_schedule_matches_diffusers(beta_end):
  import diffusers  # A test requirement only; imports torch.

  reference = diffusers.DDPMScheduler(
    num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.0015, beta_end=beta_end
  )
  cfg = ml_collections.ConfigDict(
    dict(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=beta_end, num_timesteps=1000)
  )
  s = diffusion.schedule_from_config(cfg)
  assert s.betas.dtype == jnp.float32 and s.num_timesteps == 1000
  np.testing.assert_allclose(s.betas, reference.betas.numpy(), rtol=1e-6)
  np.testing.assert_allclose(s.alphas_cumprod, reference.alphas_cumprod.numpy(), rtol=2e-5)
  np.testing.assert_allclose([s.betas[0], s.betas[-1]], [0.0015, beta_end], rtol=1e-6)
  # Linear in sqrt(beta), not in beta.
  np.testing.assert_allclose(np.sqrt(s.betas), np.linspace(0.0015**0.5, beta_end**0.5, 1000), 1e-6)
  assert not np.allclose(s.betas, np.linspace(0.0015, beta_end, 1000), rtol=1e-2)


def test_default_config_schedule_is_ddpm_linear():
  from configs import default

  s = diffusion.schedule_from_config(default.get_config().diffusion)
  np.testing.assert_array_equal(s.betas, diffusion.linear_schedule().betas)
  np.testing.assert_array_equal(s.alphas_cumprod, diffusion.linear_schedule().alphas_cumprod)


def test_q_sample_statistics():
  s = diffusion.linear_schedule()
  x0 = _x0((1, 4, 4, 1))
  n = 20_000
  noise = jax.random.normal(jax.random.key(0), (n, 4, 4, 1))
  for t in (0, 300, 999):
    xt = diffusion.q_sample(s, jnp.broadcast_to(x0, noise.shape), jnp.full((n,), t), noise)
    abar = float(s.alphas_cumprod[t])
    sem = np.sqrt((1 - abar) / n)
    np.testing.assert_allclose(xt.mean(0), np.sqrt(abar) * x0[0], atol=5 * sem + 1e-6)
    np.testing.assert_allclose(xt.var(0), 1 - abar, rtol=0.06)


def test_noisy_inputs_and_eps_mse():
  s = diffusion.linear_schedule(num_timesteps=10)
  x0 = _x0((64, 2, 2, 1))
  xt, t, noise = diffusion.noisy_inputs(s, x0, jax.random.key(3))
  assert t.shape == (64,) and int(t.min()) >= 0 and int(t.max()) <= 9
  assert len(np.unique(t)) > 5
  np.testing.assert_allclose(xt, diffusion.q_sample(s, x0, t, noise), rtol=1e-6)
  np.testing.assert_allclose(diffusion.eps_mse(noise, noise), 0.0)
  np.testing.assert_allclose(
    diffusion.eps_mse(noise + 2.0, noise), 4.0, rtol=1e-5
  )  # mean over every element


# ------------------------------------------------------------------------ DDPM step


@pytest.mark.parametrize("variance", ["fixedlarge", "fixedsmall"])
def test_ddpm_step_matches_ho_eq11(variance):
  """Posterior mean via x0_hat (no clipping) = 1/sqrt(alpha_t) (x_t - beta_t/sqrt(1-abar_t) eps)."""
  s = diffusion.linear_schedule()
  rng = np.random.default_rng(1)
  t = np.array([0, 1, 10, 500, 999])
  shape = (len(t), 4, 4, 2)
  x_t, eps, z = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
  got = diffusion.ddpm_step(s, eps, x_t, jnp.asarray(t), z, clip_denoised=False, variance=variance)

  betas = np.linspace(1e-4, 0.02, 1000)  # float64 ground truth
  abar = np.cumprod(1 - betas)
  abar_prev = np.append(1.0, abar[:-1])
  b = lambda v: v[t][:, None, None, None]  # noqa: E731
  mean = (x_t - b(betas) / np.sqrt(1 - b(abar)) * eps) / np.sqrt(1 - b(betas))
  var = b(betas) if variance == "fixedlarge" else b(betas * (1 - abar_prev) / (1 - abar))
  expected = mean + (t > 0)[:, None, None, None] * np.sqrt(var) * z
  np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)  # f32 coefficients
  # No noise at t = 0; noise (with the right scale) at every t > 0.
  other = diffusion.ddpm_step(
    s, eps, x_t, jnp.asarray(t), z + 1.0, clip_denoised=False, variance=variance
  )
  np.testing.assert_array_equal(got[0], other[0])
  np.testing.assert_allclose((other - got)[1:], np.sqrt(var[1:]) * np.ones_like(z[1:]), rtol=1e-3)


def test_ddpm_step_clips_x0_and_rejects_bad_variance():
  s = diffusion.linear_schedule()
  t = jnp.array([999])
  x_t = jnp.full((1, 2, 2, 1), 50.0)  # implies x0 ~ 50 / sqrt(abar) far outside [-1, 1]
  eps = jnp.zeros_like(x_t)
  unclipped = diffusion.ddpm_step(s, eps, x_t, t, eps, clip_denoised=False)
  clipped = diffusion.ddpm_step(s, eps, x_t, t, eps, clip_denoised=True)
  assert float(clipped.max()) < float(unclipped.max())
  with pytest.raises(ValueError, match="variance"):
    diffusion.ddpm_step(s, eps, x_t, t, eps, variance="learned")


# ------------------------------------------------------------------------ DDIM


def test_ddim_timesteps():
  ts = diffusion.ddim_timesteps(1000, 100)
  np.testing.assert_array_equal(ts, np.arange(990, -1, -10))
  assert ts[0] == 990 and ts[-1] == 0 and len(ts) == 100
  np.testing.assert_array_equal(diffusion.ddim_timesteps(1000, 1000), np.arange(999, -1, -1))
  np.testing.assert_array_equal(diffusion.ddim_timesteps(10, 3), [6, 3, 0])
  np.testing.assert_array_equal(diffusion.ddim_timesteps(1000, 1), [0])
  for bad in (0, -5, 1001):
    with pytest.raises(ValueError, match="num_steps"):
      diffusion.ddim_timesteps(1000, bad)


def test_ddim_step_with_oracle():
  s = diffusion.linear_schedule()
  x0 = _x0()
  eps = jax.random.normal(jax.random.key(0), SHAPE)
  n = SHAPE[0]
  t, t_prev = jnp.full((n,), 990), jnp.full((n,), 980)
  x_t = diffusion.q_sample(s, x0, t, eps)
  # eta = 0 keeps the same noise: x_{t_prev} = q_sample(x0, t_prev, eps).
  step = diffusion.ddim_step(s, eps, x_t, t, t_prev, jnp.ones_like(eps), eta=0.0)
  np.testing.assert_allclose(step, diffusion.q_sample(s, x0, t_prev, eps), atol=1e-4)
  # The last step (t_prev = -1) returns x0, for any eta and noise.
  x_1 = diffusion.q_sample(s, x0, jnp.full((n,), 10), eps)
  for eta in (0.0, 1.0):
    last = diffusion.ddim_step(
      s, eps, x_1, jnp.full((n,), 10), jnp.full((n,), -1), jnp.ones_like(eps), eta=eta
    )
    np.testing.assert_allclose(last, x0, atol=1e-5)
  # eta = 1 adds noise on intermediate steps.
  a = diffusion.ddim_step(s, eps, x_t, t, t_prev, jnp.zeros_like(eps), eta=1.0)
  b = diffusion.ddim_step(s, eps, x_t, t, t_prev, jnp.ones_like(eps), eta=1.0)
  assert not np.allclose(a, b)


# ------------------------------------------------------------------------ samplers


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_sample_with_oracle_returns_x0(eta):
  s = diffusion.linear_schedule()
  x0 = _x0()
  sample = diffusion.ddim_sample(_oracle(s, x0), s, SHAPE, jax.random.key(0), 20, eta=eta)
  np.testing.assert_allclose(sample, x0, atol=1e-4)


def test_ddpm_sample_with_oracle_converges_to_x0():
  s = diffusion.linear_schedule(1e-3, 0.2, 50)
  x0 = _x0()
  for variance in diffusion.VARIANCES:
    sample = diffusion.ddpm_sample(_oracle(s, x0), s, SHAPE, jax.random.key(0), variance=variance)
    np.testing.assert_allclose(sample, x0, atol=1e-4)


def test_samplers_deterministic_from_key_and_jittable():
  s = diffusion.linear_schedule(1e-3, 0.2, 50)

  @functools.partial(jax.jit, static_argnames=("sampler", "eta"))
  def sample(rng, sampler, eta=0.0):
    if sampler == "ddim":
      return diffusion.ddim_sample(_not_oracle, s, SHAPE, rng, 10, eta=eta)
    return diffusion.ddpm_sample(_not_oracle, s, SHAPE, rng)

  k1, k2 = jax.random.key(1), jax.random.key(2)
  for sampler, eta in (("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)):
    a = sample(k1, sampler, eta)
    assert a.shape == SHAPE and np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, sample(k1, sampler, eta))
    assert not np.allclose(a, sample(k2, sampler, eta))
  # Jitted and un-jitted agree.
  eager = diffusion.ddim_sample(_not_oracle, s, SHAPE, k1, 10)
  np.testing.assert_allclose(sample(k1, "ddim"), eager, rtol=1e-5, atol=1e-5)


def test_config_validation_accepts_the_schedules_and_names_them():
  from binarydm_jax.errors import ConfigError
  from binarydm_jax.training.config_validation import validate_config
  from configs import default

  config = default.get_config()
  for name in diffusion.BETA_SCHEDULES:
    config.diffusion.beta_schedule = name
    validate_config(config)
  config.diffusion.beta_schedule = "cosine"
  with pytest.raises(ConfigError) as error:
    validate_config(config)
  message = str(error.value)
  assert "\n" not in message and "beta_schedule='cosine'" in message
  assert "'linear'" in message and "'scaled_linear'" in message
