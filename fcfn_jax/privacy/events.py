"""The sampler that runs, the DpEvent dp-accounting accounts for it, and the truncation charge.

docs/model.md "From epsilon_i to noise". Client i, with a public number of examples n_i, runs ``steps`` =
T * S DP-SGD steps; each adds N(0, (z_i C)^2 I) to the sum of its batch's clipped gradients (norms <= C)
and must be (epsilon_i, delta)-DP over the run. What a step releases depends on the :class:`Sampler`:

* 'poisson' (add/remove-one adjacency): every example joins with probability q_i = min(1, B / n_i); the
  step has B_max slots and a draw that overflows keeps a uniform subset of B_max. Without an overflow an
  added example moves the sum by at most C; with one it may also push another example out (2C).
* 'fixed' (replace-one adjacency): b_i = min(B, n_i) examples without replacement; replacing one moves the
  sum by up to 2C, so dp-accounting's Gaussian (noise / sensitivity) has multiplier z_i / 2.

ONE function, :func:`dp_event`, says what dp-accounting accounts for a client; calibration, the ledger,
the audit's claims and the reports all go through it:

  sampler  accountant  overflow?     per-step event (composed ``steps`` times)           delta charge
  poisson  pld         B_max <= n_i  TruncatedSubsampledGaussian(n_i+1, q_i, B_max, z_i)  0
  poisson  rdp, pld    B_max > n_i   PoissonSampled(q_i, Gaussian(z_i))                   0
  poisson  rdp         B_max <= n_i  PoissonSampled(q_i, Gaussian(z_i))                   (1 + e^eps) p_i
  fixed    rdp         -             SampledWithoutReplacement(n_i, b_i, Gaussian(z_i/2)) 0

dataset_size = n_i + 1: the neighbour with one added example, the larger of the two, whose other n_i
examples can fill the batch. Truncation coupling (the charged row; RDP has no truncated event): run the
truncated mechanism M and the untruncated M~ on the same draws; they release the same transcript unless
some step's draw overflows, which happens with probability at most p_i = 1 - (1 - P[Bin(n_i + 1, q_i) >
B_max])^steps on either neighbour (independently of the data's values). For every output set E,
P[M(D) in E] <= P[M~(D) in E] + p_i <= e^eps (P[M(D') in E] + p_i) + delta' + p_i, so M is
(eps, delta' + (1 + e^eps) p_i)-DP when M~ is (eps, delta')-DP: the charge is paid out of delta
(:func:`charged_delta`, the one place it is written).

The maps eps <-> z built on these events: privacy/ledger.py and privacy/calibration.py (exact, host side,
dp-accounting), privacy/traced.py (the traced RDP accountant and its inverse), privacy/surrogate.py (the
closed-form surrogate). This module also holds the input checks they share.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from fcfn_jax.config import ACCOUNTANTS, SAMPLERS, FederatedConfig, PrivacyConfig
from fcfn_jax.validate import check_array, check_choice, check_int, check_open_unit, require

# The default B_max keeps every step's overflow probability below this (docs/privacy.md measures epsilon
# and round time against B_max): the RDP truncation charge is then <= (1 + e^eps) steps 1e-12, 1% of
# delta = 1e-5 at eps = 8 over 30 steps.
CAPACITY_TAIL = 1e-12

# Iteration cap of the host searches (the charge's fixed point here, the calibration's lattice search).
MAX_ITERATIONS = 200

_ADD_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
_REPLACE_ONE = dp_accounting.NeighboringRelation.REPLACE_ONE


# ----------------------------------------------------------------------------------------------------------
# The sampler and the one event builder.
# ----------------------------------------------------------------------------------------------------------


class Sampler(NamedTuple):
  """How every local step picks a client's examples (static, public; docs/model.md "From epsilon_i to noise").

  kind: 'poisson' or 'fixed'. batch_size: B, the expected ('poisson') or exact ('fixed') batch size
  (min(B, n_i) for a client with fewer examples). capacity: the step's slots, B_max >= B for 'poisson'
  (a larger draw is truncated to a uniform subset), B for 'fixed'.
  """

  kind: str
  batch_size: int
  capacity: int


@functools.cache
def default_capacity(batch_size: int) -> int:
  """The smallest B_max >= B + 1 with P[Poisson(B + 1) > B_max] <= ``CAPACITY_TAIL``.

  A client's step draws Bin(n + 1, q) examples on the larger neighbour, with mean B (n + 1) / n <= B + 1
  when q < 1 (and n + 1 <= B_max when q = 1), and a binomial's upper tail is below the Poisson's of the
  same mean (Anderson and Samuels 1967): every client's per-step overflow is <= CAPACITY_TAIL. E.g.
  B = 8 -> 37, 32 -> 81, 128 -> 217 slots.
  """
  check_int("batch_size", batch_size)
  capacity = batch_size + 1
  while stats.poisson.sf(capacity, batch_size + 1) > CAPACITY_TAIL:
    capacity += 1
  return capacity


def sampler_of(fed: FederatedConfig, privacy: PrivacyConfig) -> Sampler:
  """The Sampler the configs describe: B = fed.batch_size; B_max = privacy.batch_capacity, or
  :func:`default_capacity` (B) when it is 0; 'fixed' always has B slots."""
  batch = fed.batch_size
  if privacy.sampling == "fixed":
    return Sampler("fixed", batch, batch)
  return Sampler("poisson", batch, privacy.batch_capacity or default_capacity(batch))


def check_sampler(sampler: Any) -> Sampler:
  require(isinstance(sampler, Sampler), f"sampler={sampler!r} is invalid: expected an events.Sampler")
  check_choice("sampler.kind", sampler.kind, SAMPLERS)
  check_int("sampler.batch_size", sampler.batch_size)
  check_int("sampler.capacity", sampler.capacity, minimum=sampler.batch_size)
  require(
    sampler.kind == "poisson" or sampler.capacity == sampler.batch_size,
    f"sampler.capacity={sampler.capacity} is invalid for kind='fixed': expected batch_size="
    f"{sampler.batch_size}",
  )
  return sampler


def sampling_rates(num_examples: chex.Array, batch_size: int) -> chex.Array:
  """q_i = min(1, B / n_i), elementwise (numpy in, float64 out; jax in, jax out; n_i = 0 gives 1).

  The one formula for the rate the round samples at and the rate the accountants are told.
  """
  xp = jnp if isinstance(num_examples, jax.Array) else np
  n = xp.maximum(xp.asarray(num_examples), 1)
  return xp.minimum(1.0, batch_size / n)


def check_examples(value: Any) -> None:
  check_array("num_examples", value, lambda a: a >= 1, "integers >= 1", kinds="iu")


def overflow_probability(num_examples: chex.ArrayNumpy, steps: int, sampler: Sampler) -> np.ndarray:
  """p_i = 1 - (1 - P[Bin(n_i + 1, q_i) > B_max])^steps: some Poisson step of either neighbour overflows.

  float64 [N] (0 for 'fixed' and where B_max > n_i). Exact for independent steps.
  """
  check_sampler(sampler)
  n = np.atleast_1d(np.asarray(num_examples, np.int64))
  if sampler.kind == "fixed":
    return np.zeros(n.shape)
  per_step = stats.binom.sf(sampler.capacity, n + 1, sampling_rates(n, sampler.batch_size))
  return np.where(sampler.capacity > n, 0.0, -np.expm1(steps * np.log1p(-per_step)))


def _truncation_charged(num_examples: int, sampler: Sampler, accountant: str) -> bool:
  """Whether the accountant sees the untruncated event and delta pays (1 + e^eps) p_i for truncation."""
  return sampler.kind == "poisson" and accountant == "rdp" and sampler.capacity <= num_examples


class ClientEvent(NamedTuple):
  """What dp-accounting accounts for one client: the composed ``event`` under the neighbouring
  ``relation``, and ``overflow`` p_i > 0 when delta must pay the truncation charge (1 + e^eps) p_i."""

  event: dp_accounting.DpEvent
  relation: dp_accounting.NeighboringRelation
  overflow: float


def dp_event(
  noise_multiplier: float, num_examples: int, steps: int, sampler: Sampler, accountant: str
) -> ClientEvent:
  """THE event of ``steps`` DP-SGD steps with multiplier z of a client with n examples (table above).

  z = inf or steps = 0 releases nothing (NoOpDpEvent).
  """
  check_sampler(sampler)
  check_choice("accountant", accountant, ACCOUNTANTS)
  n, z, batch = int(num_examples), float(noise_multiplier), sampler.batch_size
  check_int("num_examples", n)
  q = float(sampling_rates(np.int64(n), batch))
  if math.isinf(z) or steps == 0:
    return ClientEvent(dp_accounting.NoOpDpEvent(), _ADD_REMOVE, 0.0)
  if sampler.kind == "fixed":
    require(accountant == "rdp", "accountant='pld' has no sampling-without-replacement event: use 'rdp'")
    step = dp_accounting.SampledWithoutReplacementDpEvent(
      n, min(batch, n), dp_accounting.GaussianDpEvent(z / 2)
    )
    return ClientEvent(dp_accounting.SelfComposedDpEvent(step, steps), _REPLACE_ONE, 0.0)
  overflow = 0.0
  if sampler.capacity <= n and accountant == "pld":
    step = dp_accounting.TruncatedSubsampledGaussianDpEvent(n + 1, q, sampler.capacity, z)
  else:
    gaussian = dp_accounting.GaussianDpEvent(z)
    step = gaussian if q == 1 else dp_accounting.PoissonSampledDpEvent(q, gaussian)
    if _truncation_charged(n, sampler, accountant):
      overflow = float(overflow_probability(n, steps, sampler)[0])
  return ClientEvent(dp_accounting.SelfComposedDpEvent(step, steps), _ADD_REMOVE, overflow)


# ----------------------------------------------------------------------------------------------------------
# The truncation charge.
# ----------------------------------------------------------------------------------------------------------


def charged_delta(eps: Any, delta: Any, overflow: Any) -> Any:
  """delta' = delta - (1 + e^eps) p: the delta left to the untruncated mechanism; <= 0 when the charge
  alone reaches delta (nothing is certifiable). Exactly delta where p = 0 (e^eps may overflow there).

  Host floats (the ledger and the calibration: math.exp, eps > 700 gives -inf as e^eps overflows a float)
  or numpy / jax arrays, elementwise (jit/vmap/grad-safe: a double where keeps inf * 0 out).
  """
  if isinstance(eps, (int, float)) and isinstance(overflow, (int, float)):
    if overflow == 0:
      return delta
    return delta - (1.0 + math.exp(eps)) * overflow if eps <= 700 else -math.inf
  xp = jnp if any(isinstance(a, jax.Array) for a in (eps, delta, overflow)) else np
  charged = overflow > 0
  with np.errstate(over="ignore"):
    charge = xp.where(charged, (1 + xp.exp(xp.where(charged, eps, 0.0))) * overflow, 0.0)
  return delta - charge


def with_charge(epsilon_at: Callable[[float], float], delta: float, overflow: float) -> float:
  """The smallest eps with epsilon_at(delta - (1 + e^eps) p) <= eps, from below (inf if none).

  g(eps) = epsilon_at(delta - (1 + e^eps) p) is nondecreasing, so eps_{k+1} = g(eps_k) from g(-inf)
  climbs to the smallest fixed point; it stops once g no longer increases (then g(eps) <= eps holds).
  """
  eps = epsilon_at(delta)
  for _ in range(MAX_ITERATIONS):
    remaining = charged_delta(eps, delta, overflow)
    if remaining <= 0:
      return math.inf
    new = epsilon_at(remaining)
    if new <= eps:
      return eps
    eps = new
  raise RuntimeError(f"the truncation charge did not converge (overflow={overflow}, delta={delta})")


# ----------------------------------------------------------------------------------------------------------
# Input checks shared by every map eps <-> z.
# ----------------------------------------------------------------------------------------------------------


def check_epsilons(value: Any) -> None:
  check_array("eps", value, lambda a: np.isfinite(a) & (a >= 0), "finite values >= 0 (0 = stays out)")


def check_noise_multipliers(value: Any) -> None:
  check_array("noise_multiplier", value, lambda a: a > 0, "values > 0 (inf = releases nothing)")


def check_sampling_rates(value: Any) -> None:
  check_array("sampling_rate", value, lambda a: (a > 0) & (a <= 1), "values in (0, 1]")


def check_run(steps: Any, delta: Any, minimum: int = 1) -> int:
  """Validates the run length (Python or numpy integer) and delta; returns steps as a Python int."""
  steps = int(steps) if isinstance(steps, np.integer) else steps
  check_int("steps", steps, minimum=minimum)
  check_open_unit("delta", delta)
  return steps
