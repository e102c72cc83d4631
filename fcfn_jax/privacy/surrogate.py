"""The surrogate map eps <-> z: closed form, conservative, jnp (jit/vmap/grad-safe).

docs/model.md "From epsilon_i to noise". The Gaussian mechanism without subsampling, composed over
k = steps steps in RDP, rdp(alpha) = k alpha / (2 z^2), at the continuous optimal order
alpha* = 1 + z sqrt(2 log(1/delta) / k):

    eps(z) = k / (2 z^2) + sqrt(2 k log(1/delta)) / z,

a quadratic in u = 1/z, inverted in closed form. Ignoring subsampling, it upper-bounds dp-accounting's
epsilon of the Poisson sampler for practical budgets (range in :func:`surrogate_epsilon`); the fixed
sampler doubles z (sensitivity 2C) and the truncation charge is paid out of delta
(privacy/traced.py ``program_noise``).
"""

from __future__ import annotations

import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from fcfn_jax.privacy.events import check_epsilons, check_noise_multipliers, check_run


def amplified_steps(sampling_rate: Any, steps: Any) -> Any:
  """Steps of an unsubsampled Gaussian with about the same RDP: rdp ~ 2 q^2 alpha / z^2 for small q, so
  k min(1, 4 q^2) (numpy or jax, elementwise): the surrogate's starting guess for the tight maps."""
  xp = jnp if isinstance(sampling_rate, jax.Array) else np
  return steps * xp.minimum(1.0, 4.0 * sampling_rate * sampling_rate)


def inverse_noise(eps: Any, steps: Any, log_inv_delta: Any) -> jax.Array:
  """u = 1/z solving (k/2) u^2 + b u = eps, b = sqrt(2 k log(1/delta)); k, delta may be arrays."""
  b = jnp.sqrt(2.0 * steps * log_inv_delta)
  # The root (-b + sqrt(b^2 + 2 k eps)) / k, rewritten to avoid cancellation when k eps << b^2.
  return 2.0 * eps / (b + jnp.sqrt(b * b + 2.0 * steps * eps))


def _surrogate_inverse(eps: chex.Array, steps: int, delta: float) -> tuple[jax.Array, jax.Array]:
  """(eps > 0, u) with u = 1/z(eps) where eps > 0 and u = 1/z(1) elsewhere (the double-where branch)."""
  steps = check_run(steps, delta)
  check_epsilons(eps)
  eps = jnp.asarray(eps)
  eps = eps.astype(jnp.result_type(eps.dtype, float))
  live = eps > 0
  return live, inverse_noise(jnp.where(live, eps, 1.0), steps, math.log(1.0 / delta))


def surrogate_epsilon(noise_multiplier: chex.Array, steps: int, delta: float) -> chex.Array:
  """Surrogate epsilon of ``steps`` unsubsampled Gaussian steps: eps = k/(2 z^2) + sqrt(2 k log(1/delta))/z.

  Elementwise over z: [...] (z = inf gives 0). Optimal-order Gaussian RDP with the basic RDP -> DP
  conversion (docs/model.md "From epsilon_i to noise"). Conservative for the untruncated Poisson sampler:
  never below dp-accounting's RDP or PLD epsilon, at any sampling rate, for surrogate budgets in
  [0.02, 220] and delta in [1e-9, 0.5] (at q = 1 the comparison depends only on delta and the optimal
  order alpha* = 1 + z sqrt(2 log(1/delta) / k), checked exhaustively; q < 1 by randomized tests). Outside,
  the RDP accountant's discrete orders lose to the continuous optimum: for budgets above ~220-600
  (alpha* < ~1.25, where the grid 1.1, 1.2, ... is coarse) its epsilon can be a few percent larger, e.g.
  2311.8 vs 2303.5 at q = 1, k = 1000, z = 0.5, delta = 1e-5; below ~0.01-0.03 (delta <= 1e-7,
  alpha* > 1024) its largest order sets a floor. The fixed sampler and truncation: ``traced.program_noise``.

  Args:
    noise_multiplier: z > 0, [...].
    steps: k = T * S >= 1 (static).
    delta: in (0, 1) (static).
  """
  steps = check_run(steps, delta)
  check_noise_multipliers(noise_multiplier)
  z = jnp.asarray(noise_multiplier)
  u = 1.0 / z.astype(jnp.result_type(z.dtype, float))
  return 0.5 * steps * u * u + math.sqrt(2.0 * steps * math.log(1.0 / delta)) * u


def surrogate_noise_multiplier(eps: chex.Array, steps: int, delta: float) -> chex.Array:
  """Closed-form inverse of ``surrogate_epsilon``: z = 1/u, u = 2 eps / (b + sqrt(b^2 + 2 k eps)).

  Elementwise over eps: [...], b = sqrt(2 k log(1/delta)). eps = 0 (the client stays out) gives z = inf
  with gradient 0 (double-where: no NaN from 1/0); for eps > 0, dz/deps = -z^2 du/deps is finite.
  """
  live, u = _surrogate_inverse(eps, steps, delta)
  return jnp.where(live, 1.0 / u, jnp.inf)


def noise_variance(eps: chex.Array, steps: int, delta: float) -> chex.Array:
  """v(eps) = z(eps)^2 = 1/u^2: the surrogate's noise variance per unit sensitivity, elementwise [...].

  The v of the DP-aware quality G = -sum_i a_i^2 v(eps_i) (docs/model.md "Stage I"). v(0) = inf with
  gradient 0; mask non-participants with ``jnp.where``, not by multiplying (0 * inf = nan). The tight
  alternative for the Poisson sampler is ``traced_noise_multiplier(eps, q_i, steps, delta) ** 2``.
  """
  live, u = _surrogate_inverse(eps, steps, delta)
  return jnp.where(live, 1.0 / jnp.square(u), jnp.inf)
