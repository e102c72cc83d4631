"""Empirical privacy audit: Clopper-Pearson bounds, the epsilon lower bound, and audits of client_update."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fcfn_jax import models
from fcfn_jax.attacks import audit
from fcfn_jax.config import FederatedConfig, PrivacyConfig
from fcfn_jax.privacy import calibration, events, ledger
from fcfn_jax.validate import ConfigError

DELTA = 1e-5
SHAPE = (8, 8, 1)
CLASSES = 3
N = 7  # the client's own examples; with the canary, B = N + 1 puts every example in every step (q = 1).
STEPS = 4
FED = FederatedConfig(local_steps=STEPS, batch_size=N + 1, client_lr=0.1)
# B_max = N + 2 > N: the canary's neighbour (N + 1 examples) never overflows, so no truncation to account.
PRIVACY = PrivacyConfig(clip_norm=1.0, delta=DELTA, batch_capacity=N + 2)
# Subsampled audits: q = 2 / N for both samplers.
SUBSAMPLED = FederatedConfig(local_steps=STEPS, batch_size=2, client_lr=0.1)
SAMPLERS = {
  "poisson": PrivacyConfig(clip_norm=1.0, delta=DELTA, batch_capacity=N + 1),
  "fixed": PrivacyConfig(clip_norm=1.0, delta=DELTA, sampling="fixed"),
}
TRIALS = 4000
CHUNK = 64  # passed explicitly everywhere so that every call shares one compiled program
MODEL = models.LogisticRegression(CLASSES)


@functools.cache
def _client():
  """Params, N random images with a blank first row (where the canary lives), labels and the canary."""
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (N, *SHAPE), dtype=np.uint8)
  x[:, 0] = 0
  y = rng.integers(0, CLASSES, N).astype(np.int32)
  params = models.init_params(MODEL, jax.random.key(0), SHAPE)
  return params, x, y, audit.make_canary(x, label=1, num_pixels=SHAPE[1])


def _audit(
  noise_multiplier: float, seed: int = 1, fed: FederatedConfig = FED, privacy: PrivacyConfig = PRIVACY
) -> audit.AuditResult:
  params, x, y, canary = _client()
  return audit.audit_client(
    params,
    x,
    y,
    canary,
    noise_multiplier,
    jax.random.key(seed),
    apply_fn=MODEL.apply,
    fed=fed,
    privacy=privacy,
    num_trials=TRIALS,
    chunk_size=CHUNK,
  )


def _scores(noise_multiplier: float, seed: int) -> np.ndarray:
  params, x, y, canary = _client()
  scores = audit.canary_scores(
    params,
    x,
    y,
    canary,
    jnp.float32(noise_multiplier),
    jax.random.key(seed),
    apply_fn=MODEL.apply,
    fed=FED,
    privacy=PRIVACY,
    num_trials=TRIALS,
    chunk_size=CHUNK,
  )
  return np.asarray(scores)


def _claimed_noise(eps: float, fed: FederatedConfig = FED, privacy: PrivacyConfig = PRIVACY) -> float:
  """z whose RDP epsilon over the client's STEPS steps of the configured sampler is eps (the claim)."""
  sampler = events.sampler_of(fed, privacy)
  return float(calibration.calibrate_noise_multipliers(eps, N, STEPS, DELTA, sampler)[0])


def _claim(z: float, fed: FederatedConfig = FED, privacy: PrivacyConfig = PRIVACY) -> float:
  """The tightest accountant's epsilon of the audited client: PLD where supported, else RDP."""
  accountant = "rdp" if privacy.sampling == "fixed" else "pld"
  return ledger.accountant_epsilon(z, N, STEPS, DELTA, events.sampler_of(fed, privacy), accountant)


# ----------------------------------------------------------------------------------------------------------
# Statistics.
# ----------------------------------------------------------------------------------------------------------


def test_clopper_pearson_solves_the_binomial_tail_equations():
  n, alpha = 50, 0.05
  k = np.arange(n + 1)
  low, high = audit.clopper_pearson(k, n, alpha)
  np.testing.assert_allclose(stats.binom.sf(k[1:] - 1, n, low[1:]), alpha, rtol=1e-6)  # P[Bin >= k] at low
  np.testing.assert_allclose(stats.binom.cdf(k[:-1], n, high[:-1]), alpha, rtol=1e-6)  # P[Bin <= k] at high
  assert low[0] == 0.0 and high[-1] == 1.0
  np.testing.assert_allclose([high[0], low[-1]], [1 - alpha ** (1 / n), alpha ** (1 / n)], rtol=1e-9)
  assert np.all(low < k / n + 1e-12) and np.all(high > k / n - 1e-12)


def test_clopper_pearson_covers_at_the_nominal_level():
  n, p, alpha = 40, 0.3, 0.1
  counts = np.random.default_rng(0).binomial(n, p, size=20_000)
  low, high = audit.clopper_pearson(counts, n, alpha)
  # Exact intervals are conservative: each one-sided miss rate is at most alpha (3 sd of slack).
  slack = 3 * np.sqrt(alpha * (1 - alpha) / counts.size)
  assert np.mean(low > p) <= alpha + slack
  assert np.mean(high < p) <= alpha + slack


def test_perfect_separation_gives_the_closed_form_bound():
  n, confidence = 1000, 0.95
  a = ((1 - confidence) / 2) ** (1 / n)  # TPR_lo at n of n; FPR_hi at 0 of n is 1 - a.
  eps = audit.epsilon_lower_bound(n, 0, n, n, DELTA, confidence)
  np.testing.assert_allclose(eps, np.log((a - DELTA) / (1 - a)), rtol=1e-9)
  assert audit.epsilon_lower_bound(n // 2, n // 2, n, n, DELTA, confidence) == 0.0


def test_epsilon_bound_uses_the_better_of_both_tails():
  n = 1000
  # All "in" trials fire and 10% of "out" trials do: only the backward form log(TNR / FNR) is informative.
  eps = audit.epsilon_lower_bound(n, n // 10, n, n, DELTA)
  tpr_low, _ = audit.clopper_pearson(n, n, 0.025)
  _, fpr_high = audit.clopper_pearson(n // 10, n, 0.025)
  np.testing.assert_allclose(eps, np.log((1 - fpr_high - DELTA) / (1 - tpr_low)), rtol=1e-9)
  assert eps > 4.0


def test_gaussian_scores_bound_is_valid_and_powerful():
  """N(mu, 1) vs N(0, 1) is one Gaussian-mechanism step with z = 1/mu; its exact epsilon bounds the audit."""
  mu, n = 1.5, 20_000
  exact = ledger.accountant_epsilon(1 / mu, 1, 1, DELTA, events.Sampler("poisson", 1, 2), "pld")
  for seed in range(3):
    rng = np.random.default_rng(seed)
    result = audit.audit_scores(rng.normal(size=n), rng.normal(mu, 1.0, size=n), DELTA)
    assert 0.4 * exact < result.eps_lower <= exact, (result, exact)


def test_null_audit_rarely_claims_leakage():
  """Identical in/out distributions (epsilon = 0): a positive bound is a false alarm, rate <= 1 - conf."""
  rng = np.random.default_rng(0)
  alarms = [
    audit.audit_scores(rng.normal(size=200), rng.normal(size=200), DELTA).eps_lower > 0 for _ in range(200)
  ]
  assert np.mean(alarms) <= 0.05


def test_audit_scores_rejects_too_few_trials():
  with pytest.raises(ConfigError, match="scores_in has 3 trials"):
    audit.audit_scores(np.zeros(10), np.zeros(3), DELTA)
  with pytest.raises(ConfigError, match="scores_out is invalid"):
    audit.audit_scores(np.array([0.0, np.nan, 1.0, 2.0, 3.0]), np.zeros(10), DELTA)


# ----------------------------------------------------------------------------------------------------------
# The canary and client_update.
# ----------------------------------------------------------------------------------------------------------


def test_canary_lights_only_pixels_the_client_never_uses():
  params, x, y, canary = _client()
  assert canary.x.shape == SHAPE and canary.x.dtype == np.uint8
  np.testing.assert_array_equal(canary.x[0], 255)
  assert canary.x[1:].max() == 0
  # So the canary's kernel gradient is orthogonal to every client example's (they share only the bias).
  direction = audit.canary_direction(params, canary, MODEL.apply)
  loss_fn = models.make_loss_fn(MODEL.apply)
  grads = jax.grad(lambda p: jnp.sum(loss_fn(p, models.normalize_pixels(x), y)))(params)
  np.testing.assert_allclose(
    jnp.vdot(direction["Dense_0"]["kernel"], grads["Dense_0"]["kernel"]), 0.0, atol=1e-6
  )
  np.testing.assert_allclose(sum(jnp.vdot(d, d) for d in jax.tree.leaves(direction)), 1.0, rtol=1e-5)


def test_scores_follow_the_gaussian_mechanism():
  """s ~ N(b + ~S, S z^2) with the canary and N(b, S z^2) without: the S-fold Gaussian mechanism.

  b is the client's own push along v (through the shared bias only); the canary adds <clip_C(g), v> / C
  per step, just below 1 since its clipped gradient is almost parallel to v.
  """
  z = 1.5
  scores = _scores(z, seed=2)
  se = np.sqrt(2 * STEPS / TRIALS) * z
  assert STEPS * 0.9 < scores[1].mean() - scores[0].mean() < STEPS + 4 * se
  np.testing.assert_allclose(scores.std(axis=1), np.sqrt(STEPS) * z, rtol=0.05)
  np.testing.assert_array_equal(scores, _scores(z, seed=2))


@pytest.mark.parametrize("eps", [1.0, 2.0, 4.0])
def test_audit_stays_below_the_claimed_epsilon(eps):
  z = _claimed_noise(eps)
  result = _audit(z)
  assert result.eps_lower <= _claim(z) <= eps
  assert result.trials == TRIALS // 2


def test_noiseless_control_exceeds_three_times_the_claims():
  result = _audit(0.0)
  assert result.tpr == 1.0 and result.fpr == 0.0
  assert result.eps_lower > 3 * 2.0


def test_audit_refutes_an_under_noised_claim():
  """A client claiming eps = 1 but adding 1/8 of the calibrated noise is caught."""
  result = _audit(_claimed_noise(1.0) / 8)
  assert result.eps_lower > 1.0


@pytest.mark.parametrize("kind", ["poisson", pytest.param("fixed", marks=pytest.mark.slow)])
def test_subsampled_audit_stays_below_the_claim_and_catches_an_eighth_of_the_noise(kind):
  """The real round at q = 2/7: the canary is present or absent (Poisson, add/remove) or replaces an
  example (fixed, replace-one); the lower bound stays below the claim, and a client adding 1/8 of the
  claimed noise is caught (its lower bound exceeds the claimed epsilon)."""
  privacy = SAMPLERS[kind]
  eps = 2.0
  z = _claimed_noise(eps, SUBSAMPLED, privacy)
  honest = _audit(z, seed=3, fed=SUBSAMPLED, privacy=privacy)
  assert honest.eps_lower <= _claim(z, SUBSAMPLED, privacy) <= eps
  cheat = _audit(z / 8, seed=4, fed=SUBSAMPLED, privacy=privacy)
  assert cheat.eps_lower > eps, cheat


def test_subsampled_scores_are_the_poisson_mixture():
  """At q = 2/7 without noise, each step adds the canary's ~1 with probability q: the mean score gap is
  about S q (the canary joins Bin(S, q) steps), and some trials never see it."""
  params, x, y, canary = _client()
  privacy = SAMPLERS["poisson"]
  scores = np.asarray(
    audit.canary_scores(
      params,
      x,
      y,
      canary,
      jnp.float32(0.0),
      jax.random.key(5),
      apply_fn=MODEL.apply,
      fed=SUBSAMPLED,
      privacy=privacy,
      num_trials=TRIALS,
      chunk_size=CHUNK,
    )
  )
  gap = scores[1] - scores[0].mean()
  q = 2 / N
  assert STEPS * q * 0.85 < gap.mean() < STEPS * q * 1.05
  # Trials whose canary joined no step: gap ~ 0, about (1 - q)^S of them (binomial 99.9% interval).
  missed = np.sum(np.abs(gap) < 0.5)
  low, high = stats.binom.interval(0.999, TRIALS, (1 - q) ** STEPS)
  assert low <= missed <= high, (missed, low, high)


def test_non_private_path_is_rejected():
  params, x, y, canary = _client()
  with pytest.raises(ConfigError, match="privacy.private=False"):
    audit.canary_scores(
      params,
      x,
      y,
      canary,
      jnp.float32(1.0),
      jax.random.key(0),
      apply_fn=MODEL.apply,
      fed=FED,
      privacy=PrivacyConfig(private=False),
      num_trials=10,
    )
