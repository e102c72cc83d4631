"""Privacy budget epsilon_i <-> DP-SGD noise multiplier z_i of the sampler that runs.

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
(eps, delta' + (1 + e^eps) p_i)-DP when M~ is (eps, delta')-DP: the charge is paid out of delta.

Three ways to compute the map, side by side and tested against each other:

* Exact (host side, numpy float64): dp-accounting's RDP accountant (default orders) or PLD accountant
  (pessimistic, value discretization ``PLD_VALUE_DISCRETIZATION``) of :func:`dp_event`; the per-client
  ledger :func:`epsilon_spent` and the calibration :func:`calibrate_noise_multipliers` that inverts it.
* Traced and tight (jnp; jit/vmap/grad-safe): the RDP of the Poisson-subsampled Gaussian at
  dp-accounting's default orders ``TRACED_ORDERS`` (fractional 1.1..10.9, integer 11..63, 128..1024; the
  fractional ones by dp-accounting's two erfc series at a fixed length plus a bound on the rest), the same
  RDP -> DP conversion, so the traced epsilon is the RdpAccountant's (1e-6 relative, tested) and the
  inverse eps -> z by a safeguarded Newton root find with an implicit gradient
  (:func:`traced_noise_multiplier`) is the host RDP calibration's (~1e-4).
* Surrogate (jnp, closed form; conservative): the Gaussian mechanism without subsampling, composed over
  k = steps steps in RDP, rdp(alpha) = k alpha / (2 z^2), at the continuous optimal order
  alpha* = 1 + z sqrt(2 log(1/delta) / k):

      eps(z) = k / (2 z^2) + sqrt(2 k log(1/delta)) / z,

  a quadratic in u = 1/z, inverted in closed form. Ignoring subsampling, it upper-bounds dp-accounting's
  epsilon of the Poisson sampler for practical budgets (range in ``surrogate_epsilon``); the fixed sampler
  doubles z (sensitivity 2C) and the truncation charge is paid out of delta (:func:`program_noise`).
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
from dp_accounting import rdp as dp_rdp
from scipy import special, stats

from fcfn_jax.config import ACCOUNTANTS, SAMPLERS, FederatedConfig, PrivacyConfig
from fcfn_jax.validate import check_array, check_choice, check_int, check_open_unit, fail, require

# Value discretization of the PLD accountant. Its epsilon is a pessimistic (upper) estimate; at 1e-3 it
# is within 7e-4 (absolute) of dp-accounting's 1e-4 default for q in [0.01, 1], steps <= 1000,
# eps <= 11, at a tenth of the cost (~10-100 ms per evaluation; ~0.2-0.8 s with truncation).
PLD_VALUE_DISCRETIZATION = 1e-3

# The default B_max keeps every step's overflow probability below this (README "Privacy" measures epsilon
# and round time against B_max): the RDP truncation charge is then <= (1 + e^eps) steps 1e-12, 1% of
# delta = 1e-5 at eps = 8 over 30 steps.
CAPACITY_TAIL = 1e-12

# Noise multipliers the calibration searches; budgets that need z outside this range are rejected.
CALIBRATION_Z_RANGE = (0.05, 1e5)

_MAX_ITERATIONS = 200

_RDP_ORDERS = np.asarray(dp_rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS, dtype=np.float64)
_INTEGER_ORDERS = np.round(_RDP_ORDERS) == _RDP_ORDERS

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


def _check_sampler(sampler: Any) -> Sampler:
  require(isinstance(sampler, Sampler), f"sampler={sampler!r} is invalid: expected an accounting.Sampler")
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


def _check_examples(value: Any) -> None:
  check_array("num_examples", value, lambda a: a >= 1, "integers >= 1", kinds="iu")


def overflow_probability(num_examples: chex.ArrayNumpy, steps: int, sampler: Sampler) -> np.ndarray:
  """p_i = 1 - (1 - P[Bin(n_i + 1, q_i) > B_max])^steps: some Poisson step of either neighbour overflows.

  float64 [N] (0 for 'fixed' and where B_max > n_i). Exact for independent steps.
  """
  _check_sampler(sampler)
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
  _check_sampler(sampler)
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


def _make_accountant(accountant: str, relation: dp_accounting.NeighboringRelation):
  if accountant == "pld":
    return dp_accounting.pld.PLDAccountant(
      neighboring_relation=relation, value_discretization_interval=PLD_VALUE_DISCRETIZATION
    )
  return dp_rdp.RdpAccountant(neighboring_relation=relation)


def _charged_delta(eps: float, delta: float, overflow: float) -> float:
  """delta' = delta - (1 + e^eps) p left to the untruncated mechanism; <= 0 when p alone exceeds delta."""
  if overflow == 0:
    return delta
  if eps > 700:  # e^eps overflows a float; the charge exceeds any delta unless p < 1e-290
    return 0.0
  charge = (1.0 + math.exp(eps)) * overflow
  return delta - charge if charge < delta else 0.0


def _with_charge(epsilon_at: Callable[[float], float], delta: float, overflow: float) -> float:
  """The smallest eps with epsilon_at(delta - (1 + e^eps) p) <= eps, from below (inf if none).

  g(eps) = epsilon_at(delta - (1 + e^eps) p) is nondecreasing, so eps_{k+1} = g(eps_k) from g(-inf)
  climbs to the smallest fixed point; it stops once g no longer increases (then g(eps) <= eps holds).
  """
  eps = epsilon_at(delta)
  for _ in range(_MAX_ITERATIONS):
    remaining = _charged_delta(eps, delta, overflow)
    if remaining <= 0:
      return math.inf
    new = epsilon_at(remaining)
    if new <= eps:
      return eps
    eps = new
  raise RuntimeError(f"the truncation charge did not converge (overflow={overflow}, delta={delta})")


# ----------------------------------------------------------------------------------------------------------
# Input checks.
# ----------------------------------------------------------------------------------------------------------


def _check_epsilons(value: Any) -> None:
  check_array("eps", value, lambda a: np.isfinite(a) & (a >= 0), "finite values >= 0 (0 = stays out)")


def _check_noise_multipliers(value: Any) -> None:
  check_array("noise_multiplier", value, lambda a: a > 0, "values > 0 (inf = releases nothing)")


def _check_sampling_rates(value: Any) -> None:
  check_array("sampling_rate", value, lambda a: (a > 0) & (a <= 1), "values in (0, 1]")


def _check_run(steps: Any, delta: Any, minimum: int = 1) -> int:
  """Validates the run length (Python or numpy integer) and delta; returns steps as a Python int."""
  steps = int(steps) if isinstance(steps, np.integer) else steps
  check_int("steps", steps, minimum=minimum)
  check_open_unit("delta", delta)
  return steps


# ----------------------------------------------------------------------------------------------------------
# Differentiable surrogate.
# ----------------------------------------------------------------------------------------------------------


def _inverse_noise(eps: Any, steps: Any, log_inv_delta: Any) -> jax.Array:
  """u = 1/z solving (k/2) u^2 + b u = eps, b = sqrt(2 k log(1/delta)); k, delta may be arrays."""
  b = jnp.sqrt(2.0 * steps * log_inv_delta)
  # The root (-b + sqrt(b^2 + 2 k eps)) / k, rewritten to avoid cancellation when k eps << b^2.
  return 2.0 * eps / (b + jnp.sqrt(b * b + 2.0 * steps * eps))


def _surrogate_inverse(eps: chex.Array, steps: int, delta: float) -> tuple[jax.Array, jax.Array]:
  """(eps > 0, u) with u = 1/z(eps) where eps > 0 and u = 1/z(1) elsewhere (the double-where branch)."""
  steps = _check_run(steps, delta)
  _check_epsilons(eps)
  eps = jnp.asarray(eps)
  eps = eps.astype(jnp.result_type(eps.dtype, float))
  live = eps > 0
  return live, _inverse_noise(jnp.where(live, eps, 1.0), steps, math.log(1.0 / delta))


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
  alpha* > 1024) its largest order sets a floor. The fixed sampler and truncation: :func:`program_noise`.

  Args:
    noise_multiplier: z > 0, [...].
    steps: k = T * S >= 1 (static).
    delta: in (0, 1) (static).
  """
  steps = _check_run(steps, delta)
  _check_noise_multipliers(noise_multiplier)
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


# ----------------------------------------------------------------------------------------------------------
# Traced, tight accountant: RDP of the Poisson-subsampled Gaussian at dp-accounting's orders (jnp).
# ----------------------------------------------------------------------------------------------------------

# dp-accounting's default RDP orders (1.1, 1.2, ..., 10.9, 11, ..., 63, 128, 256, 512, 1024), so the traced
# epsilon is the RdpAccountant's (tested to 1e-6 relative in float64) and the traced z its calibration's.
TRACED_ORDERS = tuple(float(a) for a in dp_rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS)
# The integer orders the traced accountant used before (a subset: never below the RdpAccountant's epsilon,
# up to 7.1% more noise where its optimum is fractional, no tiny budgets); kept for benchmarks/bench_round.py.
INTEGER_TRACED_ORDERS = tuple(float(a) for a in range(2, 64)) + (128.0, 256.0)
# Terms i = 0..N-1 of each of the two series of a fractional order, plus an upper bound on the rest (see
# _fractional_log_a), so the value never falls below dp-accounting's, which sums until a term is e^-30 of
# the total (its cap: 1,000 terms). The bound is loose where the series converge slowly (|C(a, i)| ~
# i^-(a+1): q ~ 0.1-0.7, small z, small a); measured epsilon excess over dp-accounting (230 random configs
# with eps in (0.01, 50), q in [1e-4, 1), z in [0.3, 1e4]): N = 16: 1.0e-5, 24: 3.7e-6, 32: 1.8e-6,
# 48: 6.8e-7 (all at eps = 38); with 48, 1.2e-7 below eps = 30 (275 more configs). Cost: below.
FRACTIONAL_TERMS = 48
_DP_FRACTION_TERMS = dp_rdp.rdp_privacy_accountant._MAX_STEPS_LOG_A_FRAC  # 1,000 in dp-accounting 0.6


class _Orders(NamedTuple):
  """Host-side (numpy float64) tables of one order set; integer orders are summed exactly, fractional
  ones by the two series of _fractional_log_a."""

  orders: np.ndarray  # [O]
  integer: np.ndarray  # [O] bool
  order_of_term: np.ndarray  # [terms] integer order (index among the integer orders) of each term k
  k: np.ndarray  # [terms] k = 2..alpha of every integer order, flat
  term_order: np.ndarray  # [terms] alpha of each term
  log_binomial: np.ndarray  # [terms] log C(alpha, k)
  fractional: np.ndarray  # [F] the fractional orders
  log_coef: np.ndarray  # [F, N] log |C(alpha, i)|, i = 0..N-1
  j_values: np.ndarray  # [U] the distinct alpha - i
  j_index: np.ndarray  # [F, N] alpha - i = j_values[j_index]
  log_tail_coef: np.ndarray  # [F] log(sum_{i >= N} |C(alpha, i)|) = log(|C(alpha, N)| N / alpha)
  log_last_coef: np.ndarray  # [F] log |C(alpha, _DP_FRACTION_TERMS - 1)|
  permutation: np.ndarray  # [O] orders = concatenate([fractional, integer orders])[permutation]


def _log_abs_binomial(alpha: np.ndarray, k: np.ndarray) -> np.ndarray:
  """log |C(alpha, k)| (gammaln is log |Gamma|), float64 on the host: float32 programs get it rounded."""
  return special.gammaln(alpha + 1) - special.gammaln(k + 1) - special.gammaln(alpha - k + 1)


@functools.cache
def _order_tables(orders: tuple[float, ...]) -> _Orders:
  a = np.asarray(orders, np.float64)
  integer = np.round(a) == a
  require(
    a.ndim == 1 and a.size > 0 and bool(np.all(a >= 1.1)) and bool(np.all(a[~integer] < FRACTIONAL_TERMS)),
    f"orders={orders!r} is invalid: expected orders >= 1.1, fractional ones below {FRACTIONAL_TERMS}",
  )
  ints = a[integer].astype(np.int64)
  order_of_term = np.concatenate([np.full(n - 1, i) for i, n in enumerate(ints)] + [np.zeros(0, np.int64)])
  k = np.concatenate([np.arange(2, n + 1) for n in ints] + [np.zeros(0)]).astype(np.float64)
  frac = a[~integer]
  i = np.arange(FRACTIONAL_TERMS, dtype=np.float64)
  j = frac[:, None] - i
  # alpha - i repeats across orders (tenths): log_ndtr runs once per distinct value.
  j_values, j_index = np.unique(np.round(j, 9), return_inverse=True)
  position = np.concatenate([np.flatnonzero(~integer), np.flatnonzero(integer)])
  return _Orders(
    orders=a,
    integer=integer,
    order_of_term=order_of_term.astype(np.int32),
    k=k,
    term_order=ints[order_of_term].astype(np.float64),
    log_binomial=_log_abs_binomial(ints[order_of_term].astype(np.float64), k),
    fractional=frac,
    log_coef=_log_abs_binomial(frac[:, None], i),
    j_values=j_values,
    j_index=j_index.reshape(j.shape).astype(np.int32),
    log_tail_coef=_log_abs_binomial(frac, np.float64(FRACTIONAL_TERMS)) + np.log(FRACTIONAL_TERMS / frac),
    log_last_coef=_log_abs_binomial(frac, np.float64(_DP_FRACTION_TERMS - 1)),
    permutation=np.argsort(position).astype(np.int32),  # int32: one index dtype with x64 on or off
  )


def _log_expm1(x: jax.Array) -> jax.Array:
  """log(e^x - 1) for x > 0, stable at both ends: x + log(1 - e^-x)."""
  return x + jnp.log(-jnp.expm1(-x))


def traced_rdp(
  noise_multiplier: chex.Array, sampling_rate: chex.Array, orders: tuple[float, ...] = TRACED_ORDERS
) -> jax.Array:
  """RDP of ONE Poisson-subsampled (rate q) Gaussian step (multiplier z) at ``orders``: [..., orders].

  A_alpha = E_{x ~ N(0, z^2)}[((1 - q) + q e^{(2x - 1) / (2 z^2)})^alpha], rdp = log(A_alpha) / (alpha - 1)
  (Mironov, Talwar and Zhang 2019; docs/model.md "From epsilon_i to noise"). Integer alpha: the binomial
  sum A = sum_k C(alpha, k) (1-q)^(alpha-k) q^k exp((k^2 - k) / (2 z^2)); its weights sum to 1 and the
  k = 0, 1 terms have exponent 0, so A - 1 = sum_{k >= 2} C(alpha, k) (1-q)^(alpha-k) q^k expm1(...): a
  log-sum-exp of positive terms, accurate even when A - 1 is tiny (small q). Fractional alpha: the two
  series of :func:`_fractional_log_a`, as dp-accounting sums them. q = 1 gives alpha / (2 z^2). Broadcasts
  z and q to [...] (jit/vmap/grad-safe); ``orders`` is static (default: dp-accounting's default orders).
  """
  tables = _order_tables(tuple(orders))
  z, q = jnp.broadcast_arrays(*map(jnp.asarray, (noise_multiplier, sampling_rate)))
  dtype = jnp.result_type(z.dtype, q.dtype, float)
  z, q = z.astype(dtype)[..., None], q.astype(dtype)[..., None]
  subsampled = q < 1
  q_safe = jnp.where(subsampled, q, 0.5)  # double where: log1p(-1) = -inf would poison the gradient
  alpha = jnp.asarray(tables.term_order, dtype)
  k = jnp.asarray(tables.k, dtype)
  terms = (
    jnp.asarray(tables.log_binomial, dtype)
    + (alpha - k) * jnp.log1p(-q_safe)
    + k * jnp.log(q_safe)
    + _log_expm1(k * (k - 1) / (2 * z * z))
  )
  log_a = []
  if tables.fractional.size:
    log_a.append(_fractional_log_a(z, q_safe, tables))
  if tables.k.size:
    log_a.append(
      jnp.logaddexp(0.0, _segment_logsumexp(terms, tables.order_of_term, int(tables.integer.sum())))
    )
  log_a = jnp.concatenate(log_a, axis=-1)[..., tables.permutation]
  orders_ = jnp.asarray(tables.orders, dtype)
  return jnp.where(subsampled, log_a / (orders_ - 1), orders_ / (2 * z * z))


def _fractional_log_a(z: jax.Array, q: jax.Array, tables: _Orders) -> jax.Array:
  """log A_alpha at the fractional orders, as dp-accounting sums it: [..., 1] z, q in (0, 1) -> [..., F].

  Split the integral at x0 = z^2 log(1/q - 1) + 1/2, where q e^{(2x - 1)/(2 z^2)} = 1 - q, and expand the
  binomial on each side (Mironov, Talwar and Zhang 2019, section 3.3): A = sum_i (s0_i + s1_i),
      s0_i = C(alpha, i) q^i (1-q)^(alpha-i) e^{(i^2 - i)/(2 z^2)} Phi((x0 - i) / z),
      s1_i = C(alpha, i) q^j (1-q)^i e^{(j^2 - j)/(2 z^2)} Phi((j - x0) / z),  j = alpha - i.
  C(alpha, i) alternates in sign for i > alpha; dp-accounting (and so this sum) adds |C(alpha, i)|, an
  upper bound on A (its fractional RDP is larger than the true divergence: 0.0037 vs 0.0017 for log A at
  q = 0.2, z = 3, alpha = 1.5 by quadrature), so the RdpAccountant and the traced epsilon stay equal.
  The series converge slowly (|C(alpha, i)| ~ i^-(alpha+1)); a FIXED count N = FRACTIONAL_TERMS of terms
  keeps shapes static, and the rest is bounded from above and added, so the value is never below the full
  sum: with f(x) = alpha log(1-q) + x log(q / (1-q)) + (x^2 - x)/(2 z^2) (convex, least at x0),
  Phi(-t) <= e^{-t^2/2} min(1/2, 1/(t sqrt(2 pi))) for t > 0, and sum_{i >= N} |C(alpha, i)| =
  |C(alpha, N)| N / alpha (Gamma(i - alpha) / Gamma(i + 1) telescopes), every term i >= N is at most
  |C(alpha, i)| e^{M}, M = max(b + log min(1/2, 1/(t_N sqrt(2 pi))), f(N) if N < x0) for s0 (t_N = (N - x0)
  / z, the min read 1/2 where t_N <= 0; b = alpha log(1-q) - x0^2 / (2 z^2)) and likewise for s1 with
  t_N = (x0 - alpha + N) / z and f(alpha - N) if alpha - N > x0. Positive terms only: one log-sum-exp.
  """
  dtype = z.dtype
  n = float(FRACTIONAL_TERMS)
  i = jnp.arange(FRACTIONAL_TERMS, dtype=dtype)
  alpha = jnp.asarray(tables.fractional, dtype)
  j = jnp.asarray(tables.fractional[:, None] - np.arange(FRACTIONAL_TERMS), dtype)  # [F, N]
  log_q, log_1mq = jnp.log(q), jnp.log1p(-q)  # [..., 1]
  two_var = 2 * z * z
  x0 = z * z * (log_1mq - log_q) + 0.5
  # Every Phi of the sum in ONE log_ndtr (a large program: one copy compiles faster): the N arguments of
  # s0, the distinct alpha - i of s1, and the two terms at dp-accounting's last index (below).
  last = _DP_FRACTION_TERMS - 1.0
  j_last = alpha - last
  args = [x0 - i, jnp.asarray(tables.j_values, dtype) - x0, x0 - last, j_last - x0]
  log_phi = _log_ndtr(jnp.concatenate(args, axis=-1) / z)  # all [..., *]: x0 is [..., 1]
  splits = np.cumsum([FRACTIONAL_TERMS, tables.j_values.size, 1])
  log_phi0, log_phi1, phi_last0, phi_last1 = jnp.split(log_phi, splits, axis=-1)
  log_phi1 = jnp.take(log_phi1, jnp.asarray(tables.j_index), axis=-1)  # [..., F, N]
  coef = jnp.asarray(tables.log_coef, dtype)
  lq, l1q, var2 = (a[..., None] for a in (log_q, log_1mq, two_var))  # [..., 1, 1]
  s0 = coef + i * lq + j * l1q + (i * i - i) / var2 + log_phi0[..., None, :]
  s1 = coef + j * lq + i * l1q + (j * j - j) / var2 + log_phi1

  def f(x):
    return alpha * log_1mq + x * (log_q - log_1mq) + (x * x - x) / two_var

  def log_tail_factor(t):  # log min(1/2, 1/(t sqrt(2 pi))) for t > 0; log 1/2 otherwise
    positive = t > 0
    mills = -jnp.log(jnp.where(positive, t, 1.0)) - 0.5 * math.log(2 * math.pi)
    return jnp.where(positive, jnp.minimum(mills, math.log(0.5)), math.log(0.5))

  base = alpha * log_1mq - x0 * x0 / two_var  # [..., F]
  m0 = base + log_tail_factor((n - x0) / z)
  m0 = jnp.where(n < x0, jnp.maximum(m0, f(n)), m0)
  m1 = base + log_tail_factor((x0 - alpha + n) / z)
  m1 = jnp.where(alpha - n > x0, jnp.maximum(m1, f(alpha - n)), m1)
  tail = jnp.logaddexp(m0, m1) + jnp.asarray(tables.log_tail_coef, dtype)
  log_a = _log_sum_exp_near_one(jnp.concatenate([s0, s1, tail[..., None]], axis=-1))
  # dp-accounting gives up on an order (rdp = inf: left out of the minimum) when its terms are still above
  # e^-30 of the total after _DP_FRACTION_TERMS terms (q ~ 0.2-0.7 at small z, where such orders only
  # matter beyond eps ~100); so does this sum, by the two terms at that index (they decrease there).
  coef_last = jnp.asarray(tables.log_last_coef, dtype)
  last0 = coef_last + last * log_q + j_last * log_1mq + (last * last - last) / two_var + phi_last0
  last1 = coef_last + j_last * log_q + last * log_1mq + (j_last * j_last - j_last) / two_var + phi_last1
  return jnp.where(jnp.maximum(last0, last1) < log_a - 30, log_a, jnp.inf)


def _log_ndtr(x: jax.Array) -> jax.Array:
  """log Phi(x) with ONE erfc: log1p(-erfc(x / sqrt 2) / 2) for x > 0, log(erfc(-x / sqrt 2) / 2) down to
  x = -20 (float32: -10, where erfc still has its relative accuracy), below that the asymptotic series
  -x^2/2 - log(-x sqrt(2 pi)) + log(1 - 1/x^2 + 3/x^4 - 15/x^6 + 105/x^8) (next term 945/x^10: < 1e-10
  at -20, 1e-7 at -10). Same values as jax.scipy.special.log_ndtr at a third of its compile time (its
  several series branches dominated the traced inverse's compile)."""
  cut = -20.0 if x.dtype == jnp.float64 else -10.0
  tail = x <= cut
  near = jnp.where(tail, cut, x)  # double where: the unused branches stay finite (and their gradients)
  far = jnp.where(tail, x, cut)
  e = jax.lax.erfc(jnp.abs(near) / math.sqrt(2.0))
  body = jnp.where(near > 0, jnp.log1p(-0.5 * e), jnp.log(0.5 * e))
  r = 1.0 / (far * far)
  series = jnp.log1p(r * (-1.0 + r * (3.0 + r * (-15.0 + r * 105.0))))
  asymptotic = -0.5 * far * far - jnp.log(-far) - 0.5 * math.log(2 * math.pi) + series
  return jnp.where(tail, asymptotic, body)


def _log_sum_exp_near_one(terms: jax.Array) -> jax.Array:
  """log sum_j exp(terms[..., j]) as m + log1p(sum_j e^{t_j - m} - 1), m = max_j t_j: [..., J] -> [...].

  The largest term enters as expm1(0) = 0 instead of 1, so a total near 1 keeps its small part (float32:
  ~1e-9 absolute instead of the ~6e-8 of log(1 + small)); m carries no gradient (it cancels)."""
  peak = jax.lax.stop_gradient(jnp.max(terms, axis=-1, keepdims=True))
  first = jax.nn.one_hot(jnp.argmax(terms, axis=-1), terms.shape[-1], dtype=bool)  # one term, even on ties
  shifted = terms - peak
  rest = jnp.sum(jnp.where(first, jnp.expm1(shifted), jnp.exp(shifted)), axis=-1)
  return peak[..., 0] + jnp.log1p(rest)


def _segment_logsumexp(terms: jax.Array, ids: np.ndarray, count: int) -> jax.Array:
  """log sum_k exp(terms[..., j]) over the terms j of each order: [..., terms] -> [..., count]."""
  lead = terms.shape[:-1]
  flat = terms.reshape(-1, terms.shape[-1]).T  # [terms, M]: segment ops reduce the leading axis
  ids = jnp.asarray(ids)
  peak = jax.ops.segment_max(flat, ids, count, indices_are_sorted=True)
  # The shift cancels exactly (so no gradient through it); 0 where a whole order is -inf (z = inf).
  peak = jax.lax.stop_gradient(jnp.where(jnp.isfinite(peak), peak, 0.0))
  total = jax.ops.segment_sum(jnp.exp(flat - peak[ids]), ids, count, indices_are_sorted=True)
  return (peak + jnp.log(total)).T.reshape(*lead, count)


def _rdp_to_epsilon(
  rdp: jax.Array, steps: chex.Array, delta: chex.Array, orders: tuple[float, ...] = TRACED_ORDERS
) -> jax.Array:
  """dp-accounting's conversion at ``orders``: max(0, min_a eps_a), eps_a = R_a + log(1 - 1/a)
  - log(delta a) / (a - 1), R_a = steps rdp_a; eps_a = 0 where the KL bound already gives delta.

  In float32 the fractional orders skip the KL branch and clamp R_a >= 0: their log A (a log-sum-exp
  near 0, no expm1 form) is only good to ~1e-7 absolute there, and a rounded-down R_a must not read as
  'eps = 0'; the integer orders keep it (their A - 1 is accurate)."""
  tables = _order_tables(tuple(orders))
  alpha = jnp.asarray(tables.orders, rdp.dtype)
  total = jnp.asarray(steps, rdp.dtype)[..., None] * rdp
  delta = jnp.asarray(delta, rdp.dtype)[..., None]
  kl = tables.integer | (rdp.dtype == jnp.float64)
  if not kl.all():
    total = jnp.where(kl, total, jnp.maximum(total, 0.0))
  eps = total + jnp.log1p(-1 / alpha) - (jnp.log(delta) + jnp.log(alpha)) / (alpha - 1)
  eps = jnp.where(kl & (delta * delta + jnp.expm1(-total) > 0), 0.0, eps)
  return jnp.maximum(jnp.min(eps, axis=-1), 0.0)


def traced_epsilon(
  noise_multiplier: chex.Array,
  sampling_rate: chex.Array,
  steps: chex.Array,
  delta: chex.Array,
  orders: tuple[float, ...] = TRACED_ORDERS,
) -> jax.Array:
  """Epsilon at delta of ``steps`` untruncated Poisson-subsampled Gaussian steps: [...] (broadcast).

  Equals dp-accounting's RDP accountant at ``orders`` (default: its default orders; tested to 1e-6
  relative in float64); ``orders`` is static.
  """
  return _rdp_to_epsilon(traced_rdp(noise_multiplier, sampling_rate, orders), steps, delta, orders)


def _remaining_delta(eps: jax.Array, delta: jax.Array, overflow: jax.Array) -> jax.Array:
  """delta - (1 + e^eps) p, traced; exactly delta where p = 0 (e^eps may overflow there: no inf * 0)."""
  charged = overflow > 0
  return delta - jnp.where(charged, (1 + jnp.exp(jnp.where(charged, eps, 0.0))) * overflow, 0.0)


_LOG_Z_RANGE = tuple(math.log(z) for z in CALIBRATION_Z_RANGE)
# The root find aims this far (relative) below the target and stops within the tolerance of the aim.
# float32 aims lower, with a wider stop: its traced epsilon is within 1.5e-5 below / 4.6e-5 above the
# float64 one (measured over random q in [1e-4, 1), z in [0.3, 1e4], steps 1..1e4, delta 1e-9..1e-3; the
# fractional orders' log A has no expm1 form), so the answer's true epsilon stays below the target and the
# search does not chase rounding (a stop inside the rounding would bisect to the end for some clients).
_TRACED_AIM = {"float64": (5e-5, 2.5e-5), "float32": (2e-4, 1e-4)}  # (aim, tolerance)
_TRACED_ITERATIONS = 60


def _log_epsilon_gap(log_z, eps, q, steps, delta, overflow):
  """log traced_epsilon(e^log_z) at delta - (1 + e^eps) p, minus log(eps); decreasing in log_z."""
  remaining = _remaining_delta(eps, delta, overflow)
  return jnp.log(_rdp_to_epsilon(traced_rdp(jnp.exp(log_z), q), steps, remaining)) - jnp.log(eps)


def _solve_log_noise(eps, q, steps, delta, overflow):
  """Safeguarded Newton for log z on the scalar gap, aiming at gap = log(1 - aim) < 0: bracket
  [log 0.05, log 1e5] on the aim, Newton steps inside the bracket, bisection otherwise. Returns a point
  within the tolerance of the aim or the bracket's right end, both with eps <= target: log 0.05 when
  even that is below the aim; +inf when even z = 1e5 is not."""
  gap = functools.partial(_log_epsilon_gap, eps=eps, q=q, steps=steps, delta=delta, overflow=overflow)
  aim, tolerance = _TRACED_AIM.get(jnp.dtype(eps.dtype).name, _TRACED_AIM["float32"])
  aim = math.log1p(-aim)
  lo, hi = (jnp.asarray(v, eps.dtype) for v in _LOG_Z_RANGE)
  # Start from the surrogate with the small-q amplification folded into the steps (host calibration's guess).
  amplified = steps * jnp.minimum(1.0, 4.0 * q * q)
  guess = -jnp.log(_inverse_noise(eps, amplified, -jnp.log(delta)))

  def value_and_slope(u):  # forward mode: one pass, a smaller program than reverse mode
    return jax.jvp(gap, (u,), (jnp.ones_like(u),))

  def body(state):
    u, lo, hi, _, i = state
    g, slope = value_and_slope(u)
    above = g > aim  # too little noise; -inf (the KL branch: eps = 0) is below
    lo, hi = jnp.where(above, u, lo), jnp.where(above, hi, u)
    done = jnp.abs(g - aim) < tolerance
    newton = u - (g - aim) / slope
    ok = jnp.isfinite(newton) & (newton > lo) & (newton < hi)
    nxt = jnp.where(done, u, jnp.where(ok, newton, 0.5 * (lo + hi)))
    return nxt, lo, hi, done, i + 1

  def cond(state):
    u, lo, hi, done, i = state
    return ~done & (hi - lo > 1e-6) & (i < _TRACED_ITERATIONS)

  start = jnp.clip(jnp.where(jnp.isfinite(guess), guess, lo), lo, hi)
  # The ends are checked first, so the loop keeps a true bracket: gap(lo) > aim >= gap(hi).
  # One batched evaluation of both ends (one copy of the accountant in the program: it compiles slowly).
  low_fits, high_fits = jax.vmap(gap)(jnp.stack([lo, hi])) <= aim
  state = (start, lo, hi, low_fits | ~high_fits, jnp.zeros((), jnp.int32))
  u, _, right, done, _ = jax.lax.while_loop(cond, body, state)
  return jnp.where(low_fits, lo, jnp.where(high_fits, jnp.where(done, u, right), jnp.inf))


@jax.custom_jvp
def _log_noise(eps, q, steps, delta, overflow):
  return _solve_log_noise(eps, q, steps, delta, overflow)


@_log_noise.defjvp
def _log_noise_jvp(primals, tangents):
  """Implicit function theorem on gap(u; theta) = const: du = -(d_theta gap . dtheta) / d_u gap.

  Zero at the ends of the range, where the answer is clamped and does not move with theta.
  """
  u = _log_noise(*primals)
  lo, hi = _LOG_Z_RANGE
  inside = (u > lo) & (u < hi)
  u_safe = jnp.where(inside, u, 0.0)
  # One reverse pass gives d gap / d u and d gap / d theta (one copy of the accountant, as above).
  slope, *partials = jax.grad(_log_epsilon_gap, argnums=tuple(range(6)))(u_safe, *primals)
  moved = sum(p * t for p, t in zip(partials, tangents))
  return u, jnp.where(inside, -moved / slope, 0.0)


def traced_noise_multiplier(
  eps: chex.Array,
  sampling_rate: chex.Array,
  steps: chex.Array,
  delta: chex.Array,
  overflow: chex.Array = 0.0,
) -> jax.Array:
  """Smallest z whose :func:`traced_epsilon` is <= eps at delta - (1 + e^eps) p: [...] (broadcast).

  The inverse of the traced accountant for the Poisson sampler, jit/vmap/grad-safe. Every argument may
  be traced and per client: budget eps >= 0, sampling rate q in (0, 1], steps (a real number here),
  delta in (0, 1), and the truncation's overflow probability p = :func:`overflow_probability` (0 when
  B_max > n_i). The search aims 5e-5 (float32: 2e-4, which covers its rounding) below the target and stops
  within 2.5e-5 (float32: 1e-4) of the aim, so the returned z is within ~1e-4 (float32: ~3e-4) of the
  smallest admissible one and never above the target's epsilon (about 10 accountant evaluations per
  client). Gradients (w.r.t. every argument) by the implicit function theorem, not by unrolling the
  search.

  eps = 0 gives z = inf with gradient 0 (double-where), as does a budget the charge (1 + e^eps) p >= delta
  makes infeasible (no release is the only certificate left) or one that needs more noise than z = 1e5
  (``CALIBRATION_Z_RANGE``): budgets at or below the conversion's floor min_a [log(1/delta) - log a] /
  (a - 1) + log(1 - 1/a) (0.0035 at delta = 1e-5, a = 1024; below it only the KL branch, steps rdp_a <
  delta^2, certifies anything, at z of order 1e5 and beyond) or just above it. Budgets so
  large that z = 0.05 suffices get z = 0.05. The game's noise variance is v(eps) = z(eps)^2.
  """
  _check_epsilons(eps)
  _check_sampling_rates(sampling_rate)
  check_array("steps", steps, lambda a: a >= 1, "values >= 1")
  check_array("delta", delta, lambda a: (a > 0) & (a < 1), "values in (0, 1)")
  check_array("overflow", overflow, lambda a: (a >= 0) & (a <= 1), "probabilities in [0, 1]")
  return _traced_noise(eps, sampling_rate, steps, delta, overflow)


@jax.jit
def _traced_noise(eps, sampling_rate, steps, delta, overflow):
  """traced_noise_multiplier after its checks (one compiled program per shape and dtype)."""
  args = jnp.broadcast_arrays(*map(jnp.asarray, (eps, sampling_rate, steps, delta, overflow)))
  dtype = jnp.result_type(*args, float)
  eps, q, steps, delta, overflow = (a.astype(dtype) for a in args)
  live = (eps > 0) & (_remaining_delta(eps, delta, overflow) > 0)
  safe = [jnp.where(live, a, fill) for a, fill in ((eps, 1.0), (overflow, 0.0))]
  shape = eps.shape
  flat = [a.reshape(-1) for a in (safe[0], q, steps, delta, safe[1])]
  log_z = jax.vmap(_log_noise)(*flat).reshape(shape)
  return jnp.where(live, jnp.exp(log_z), jnp.inf)


def program_noise(
  eps: chex.Array,
  sampling_rate: chex.Array,
  overflow: chex.Array,
  steps: int,
  delta: float,
  sampler_kind: str,
  calibration: str,
) -> jax.Array:
  """z_i for budgets eps_i inside a traced program: 'traced' or 'surrogate' calibration, [clients].

  'traced': :func:`traced_noise_multiplier` ('poisson' only). 'surrogate': the closed form at the delta
  left after the truncation charge, delta - (1 + e^eps) p (the unsubsampled Gaussian dominates the
  untruncated Poisson step), times 2 for 'fixed' (replace-one sensitivity 2C). inf where eps = 0 or the
  charge leaves no delta.
  """
  check_choice("sampler_kind", sampler_kind, SAMPLERS)
  if calibration == "traced":
    require(sampler_kind == "poisson", "calibration='traced' needs sampler 'poisson'")
    return traced_noise_multiplier(eps, sampling_rate, steps, delta, overflow)
  require(
    calibration == "surrogate", f"calibration={calibration!r} is invalid: expected 'traced'/'surrogate'"
  )
  steps = _check_run(steps, delta)
  _check_epsilons(eps)
  eps = jnp.asarray(eps)
  eps = eps.astype(jnp.result_type(eps.dtype, float))
  remaining = _remaining_delta(eps, jnp.asarray(delta, eps.dtype), jnp.asarray(overflow, eps.dtype))
  live = (eps > 0) & (remaining > 0)
  u = _inverse_noise(jnp.where(live, eps, 1.0), steps, -jnp.log(jnp.where(live, remaining, delta)))
  scale = 2.0 if sampler_kind == "fixed" else 1.0
  return jnp.where(live, scale / u, jnp.inf)


# ----------------------------------------------------------------------------------------------------------
# Exact accounting (dp-accounting, host side).
# ----------------------------------------------------------------------------------------------------------


def accountant_epsilon(
  noise_multiplier: float,
  num_examples: int,
  steps: int,
  delta: float,
  sampler: Sampler,
  accountant: str = "rdp",
) -> float:
  """Epsilon at ``delta`` of :func:`dp_event` by dp-accounting's RDP or PLD accountant, charge included.

  'rdp': RdpAccountant with dp-accounting's default orders. 'pld': PLDAccountant, pessimistic estimate at
  value discretization ``PLD_VALUE_DISCRETIZATION``. z = inf or steps = 0 releases nothing (eps = 0).
  """
  check_choice("accountant", accountant, ACCOUNTANTS)
  steps = _check_run(steps, delta, minimum=0)
  _check_noise_multipliers(noise_multiplier)
  _check_examples(num_examples)
  client = dp_event(noise_multiplier, num_examples, steps, sampler, accountant)
  if isinstance(client.event, dp_accounting.NoOpDpEvent):
    return 0.0
  acc = _make_accountant(accountant, client.relation)
  acc.compose(client.event)
  return float(_with_charge(acc.get_epsilon, delta, client.overflow))


def _amplified_steps(sampling_rate: np.ndarray | float, steps: int) -> np.ndarray | float:
  """Steps of an unsubsampled Gaussian with about the same RDP: rdp ~ 2 q^2 alpha / z^2 for small q."""
  return steps * np.minimum(1.0, 4.0 * np.square(sampling_rate))


def _gaussian_optimal_order(z: float, sampling_rate: float, steps: int, delta: float) -> float:
  """alpha* = 1 + z sqrt(2 log(1/delta) / k): the surrogate's optimal order at the amplified k."""
  return 1.0 + z * math.sqrt(2.0 * math.log(1.0 / delta) / _amplified_steps(sampling_rate, steps))


class _EpsilonCurve:
  """(z, delta) -> epsilon of ``dp_event(z, n, steps, sampler, accountant)`` before any truncation charge.

  For the RDP accountant of the untruncated Poisson event only the orders that can attain the
  accountant's minimum are evaluated, so the value equals the full accountant's at a fraction of the
  cost. Per order a, dp-accounting reports eps_a = R_a + c_a, R_a = steps * rdp_a(q, z),
  c_a = log(1 - 1/a) - log(delta a) / (a - 1), and takes the minimum. At integer orders R_a is the exact
  Renyi divergence; the true one is nondecreasing in a and g(a) = (a - 1) R_a is convex (a log-moment-
  generating function). So for an unevaluated order a, the evaluated integer order below a and the chords
  through the two nearest evaluated integer orders on either side of a, extended to a, bound R_a from
  below. dp-accounting's fractional orders are no anchors: they overestimate the divergence (by 2.1x at
  q = 0.2, z = 3, alpha = 1.5, checked by quadrature), which breaks convexity but keeps the bounds valid.
  Orders are evaluated, most promising first, until every other order's bound exceeds the minimum found.
  The accountant's KL branch (eps_a = 0 when R_a < -log(1 - delta^2)) cannot fire when Pinsker's bound
  R_a >= KL >= 2 steps (q (2 Phi(1/(2z)) - 1))^2 exceeds that floor; otherwise the full accountant runs,
  as it always does for PLD and for the fixed sampler's bound (which is no exact divergence).
  """

  def __init__(self, num_examples: int, steps: int, sampler: Sampler, accountant: str):
    self._n, self._steps, self._sampler, self._accountant = num_examples, steps, sampler, accountant
    self._q = float(sampling_rates(np.int64(num_examples), sampler.batch_size))
    self._pruned = sampler.kind == "poisson" and accountant == "rdp"
    self._optimum = None  # Index of the last optimal order: the next search starts there.

  @staticmethod
  def _lower_bounds(rdp: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Lower bound of eps_a for each order with unknown (nan) R_a; inf for the evaluated ones."""
    a = _RDP_ORDERS
    known = np.flatnonzero(np.isfinite(rdp) & _INTEGER_ORDERS)
    g = (a - 1.0) * rdp
    below = np.searchsorted(known, np.arange(len(a)))  # anchors below each order.
    r = np.zeros(len(a))
    some = below >= 1
    r[some] = rdp[known[below[some] - 1]]
    if known.size >= 2:
      slope = np.diff(g[known]) / np.diff(a[known])
      # Chords of the two anchors just below (extended up) and of the two just above (extended down).
      for side, chord_at, anchor in (
        (below >= 2, below - 2, below - 1),
        (below <= known.size - 2, below, below),
      ):
        b = known[anchor[side]]
        chord = g[b] + slope[chord_at[side]] * (a[side] - a[b])
        r[side] = np.maximum(r[side], chord / (a[side] - 1.0))
    return np.where(np.isnan(rdp), r + c, np.inf)

  def _full(self, z: float, delta: float) -> float:
    client = dp_event(z, self._n, self._steps, self._sampler, self._accountant)
    acc = _make_accountant(self._accountant, client.relation)
    acc.compose(client.event)
    return float(acc.get_epsilon(delta))

  def __call__(self, noise_multiplier: float, delta: float) -> float:
    z, q, steps = noise_multiplier, self._q, self._steps
    pinsker = 2.0 * steps * (q * (2.0 * special.ndtr(0.5 / z) - 1.0)) ** 2
    if not self._pruned or pinsker < -math.log1p(-delta * delta):
      return self._full(z, delta)
    c = np.log1p(-1.0 / _RDP_ORDERS) - np.log(delta * _RDP_ORDERS) / (_RDP_ORDERS - 1.0)
    if self._optimum is None:
      self._optimum = int(np.searchsorted(_RDP_ORDERS, _gaussian_optimal_order(z, q, steps, delta)))
    event = dp_event(z, self._n, steps, self._sampler, self._accountant).event
    rdp = np.full(_RDP_ORDERS.shape, np.nan)
    # Start at the last optimum with two integer orders on either side as anchors.
    anchors = np.flatnonzero(_INTEGER_ORDERS)
    k = np.searchsorted(anchors, self._optimum)
    todo = np.union1d(
      np.arange(max(self._optimum - 1, 0), min(self._optimum + 2, len(_RDP_ORDERS))),
      anchors[max(k - 2, 0) : k + 2],
    )
    grow = 2
    while todo.size:
      acc = dp_rdp.RdpAccountant(_RDP_ORDERS[todo])
      acc.compose(event)
      rdp[todo] = acc.rdp
      done = ~np.isnan(rdp)
      eps, order = dp_rdp.compute_epsilon(_RDP_ORDERS[done], rdp[done], delta)
      bound = self._lower_bounds(rdp, c)
      todo = np.sort(np.argsort(bound)[:grow])
      todo, grow = todo[bound[todo] < eps], 2 * grow
    self._optimum = int(np.searchsorted(_RDP_ORDERS, order))
    return float(eps)


def _client_arrays(**arrays: Any) -> dict[str, np.ndarray]:
  """Broadcasts per-client inputs (scalars or [N]) to one 1-D shape [N]."""
  shapes = {name: np.shape(a) for name, a in arrays.items()}
  require(
    all(len(s) <= 1 for s in shapes.values()),
    f"per-client inputs must be scalars or 1-D [N]; got shapes {shapes}",
  )
  try:
    out = np.broadcast_arrays(*(np.asarray(a) for a in arrays.values()))
  except ValueError:
    fail(f"per-client inputs must share one length N; got shapes {shapes}")
  return {name: np.atleast_1d(a) for name, a in zip(arrays, out)}


def epsilon_spent(
  noise_multipliers: chex.ArrayNumpy,
  num_examples: chex.ArrayNumpy | int,
  steps_done: chex.ArrayNumpy | int,
  delta: float,
  sampler: Sampler,
  accountant: str = "rdp",
) -> np.ndarray:
  """Per-client privacy ledger: ``accountant_epsilon(z_i, n_i, t_i, delta, sampler)`` for every client, [N].

  Args:
    noise_multipliers: z: [N] (inf = released nothing).
    num_examples: n: [N] or scalar, the clients' public dataset sizes (>= 1).
    steps_done: t: [N] or scalar, DP-SGD steps taken so far (>= 0).
    delta: target delta in (0, 1).
    sampler: the round's :class:`Sampler`.
    accountant: 'rdp' (equal to the full accountant, cheap per client) or 'pld' (one PLD per client).

  Returns:
    eps: [N] float64; 0 where z = inf or t = 0.
  """
  check_choice("accountant", accountant, ACCOUNTANTS)
  check_open_unit("delta", delta)
  _check_sampler(sampler)
  _check_noise_multipliers(noise_multipliers)
  _check_examples(num_examples)
  steps_arr = np.asarray(steps_done)
  require(steps_arr.dtype.kind in "iu", f"steps_done has dtype {steps_arr.dtype}: expected integers")
  check_array("steps_done", steps_arr, lambda a: a >= 0, "integers >= 0")
  cols = _client_arrays(z=noise_multipliers, n=num_examples, t=steps_arr)
  z, n, t = cols["z"].astype(np.float64), cols["n"].astype(np.int64), cols["t"].astype(np.int64)
  eps = np.zeros(z.shape)
  live = np.isfinite(z) & (t > 0)
  keys, inverse = np.unique(np.stack([n[live], t[live], z[live]], axis=1), axis=0, return_inverse=True)
  values = np.empty(len(keys))
  curve, curve_key = None, None
  for j, (nj, tj, zj) in enumerate(keys):  # Sorted by (n, t, z): each search starts near the last.
    nj, tj = int(nj), int(tj)
    if curve_key != (nj, tj):
      curve, curve_key = _EpsilonCurve(nj, tj, sampler, accountant), (nj, tj)
      overflow = dp_event(1.0, nj, tj, sampler, accountant).overflow
    values[j] = _with_charge(functools.partial(curve, float(zj)), delta, overflow)
  eps[live] = values[inverse.reshape(-1)]
  return eps


# ----------------------------------------------------------------------------------------------------------
# Calibration: eps_i -> z_i.
# ----------------------------------------------------------------------------------------------------------


def _invert_curve(
  curve: Callable[[float], float],
  target: float,
  start: int,
  slope: float,
  grid: float,
  rtol: float,
  memo: dict[int, float],
  describe: Callable[[], str],
) -> tuple[int, float]:
  """Lattice index n with eps(z_n) <= target, z_n = exp(n * grid), and tight; plus the last slope.

  Returns as soon as target (1 - rtol) <= eps(z_n) <= target, or when eps(z_{n-1}) > target (z_n is then
  within one lattice step of the smallest admissible z). Secant steps in (log z, log eps), starting
  from ``slope`` = d log(eps) / d log(z), aim at target (1 - rtol/2); one-sided steps double until the
  target is bracketed; after a few bracketed secant steps, bisection. ``memo`` caches eps by lattice
  index and is shared by the targets of one curve at one delta.
  """
  n_min, n_max = (math.ceil(math.log(z) / grid) for z in CALIBRATION_Z_RANGE)
  goal = math.log(target) + math.log1p(-rtol / 2)
  lo = hi = None  # largest index with eps > target, smallest with eps <= target.
  slope, prev, leap, secants = slope * grid, None, 1, 4
  n = min(max(start, n_min), n_max)
  for _ in range(_MAX_ITERATIONS):
    if n not in memo:
      memo[n] = curve(math.exp(n * grid))
    eps = memo[n]
    if eps <= target:
      if eps >= target * (1.0 - rtol):
        return n, slope / grid
      hi = n if hi is None else min(hi, n)
    else:
      lo = n if lo is None else max(lo, n)
    if lo is not None and hi is not None and hi - lo <= 1:
      return hi, slope / grid
    if 0 < eps < math.inf:
      y = math.log(eps)
      if prev is not None and prev[0] != n and (y - prev[1]) / (n - prev[0]) < 0:
        slope = (y - prev[1]) / (n - prev[0])
      prev, step = (n, y), (goal - y) / slope
    else:
      step = leap if eps > target else -leap
    nxt = n + int(math.copysign(max(abs(round(step)), 1), step))
    if lo is not None and hi is not None:
      nxt, secants = (nxt if secants and lo < nxt < hi else (lo + hi) // 2), max(secants - 1, 0)
    elif hi is not None:
      nxt, leap = min(nxt, hi - leap), 2 * leap
    else:
      nxt, leap = max(nxt, lo + leap), 2 * leap
    nxt = min(max(nxt, n_min), n_max)
    require(
      nxt != n,
      f"{describe()} needs a noise multiplier outside {CALIBRATION_Z_RANGE}: "
      f"accountant epsilon at z={math.exp(n * grid):.6g} is {eps!r}",
    )
    n = nxt
  raise RuntimeError(f"calibration did not converge for {describe()}")


def _solve_sorted(
  n: np.ndarray,
  eps: np.ndarray,
  guess: np.ndarray,
  steps: int,
  delta: float,
  sampler: Sampler,
  accountant: str,
  rtol: float,
  describe: Callable[[int], str],
) -> np.ndarray:
  """Noise multipliers for targets sorted by (n ascending, eps descending), from log-z guesses: [M].

  One curve per dataset size n; target eps_j is met at delta_j = delta - (1 + e^eps_j) p_n (delta itself
  unless the accountant pays a truncation charge), with an evaluation cache per (curve, delta_j). Each
  search starts with a secant step from the previous solution on the same cache, else at the guess
  shifted by the previous (solution - guess).
  """
  grid = math.log1p(rtol / 4)
  out = np.empty(len(eps))
  offset, slope, curve, memos, memo, n_lat = 0.0, -1.5, None, {}, {}, None
  for j in range(len(eps)):
    target = float(eps[j])
    if curve is None or n[j] != n[j - 1]:
      size = int(n[j])
      curve, memos = _EpsilonCurve(size, steps, sampler, accountant), {}
      overflow = dp_event(1.0, size, steps, sampler, accountant).overflow
    target_delta = _charged_delta(target, delta, overflow)
    require(
      target_delta > 0,
      f"{describe(j)} cannot be certified at batch_capacity={sampler.capacity}: the truncation charge "
      f"(1 + e^eps) P[some step overflows] = (1 + e^eps) {overflow:.3g} exceeds delta; raise "
      "batch_capacity or use accountant='pld'",
    )
    previous, memo = memo, memos.setdefault(target_delta, {})
    if memo is not previous or not memo or not 0 < memo[n_lat] < math.inf:
      start = (guess[j] + offset) / grid
    else:
      start = n_lat + (math.log(target) + math.log1p(-rtol / 2) - math.log(memo[n_lat])) / (slope * grid)
    n_lat, slope = _invert_curve(
      functools.partial(curve, delta=target_delta),
      target,
      round(start),
      slope,
      grid,
      rtol,
      memo,
      functools.partial(describe, j),
    )
    out[j] = math.exp(n_lat * grid)
    offset = n_lat * grid - guess[j]
  return out


def calibrate_noise_multipliers(
  eps: chex.ArrayNumpy,
  num_examples: chex.ArrayNumpy | int,
  steps: int,
  delta: float,
  sampler: Sampler,
  accountant: str = "rdp",
  rtol: float = 1e-3,
) -> np.ndarray:
  """Smallest noise multipliers z_i whose accountant epsilon is <= eps_i, up to ``rtol``: [N].

  Guarantees, for every client with eps_i > 0, by direct evaluation of ``accountant_epsilon`` (the
  accountant of :func:`dp_event`, truncation charge included) at the returned z_i:
    accountant_epsilon(z_i) <= eps_i, and
    accountant_epsilon(z_i) >= eps_i (1 - rtol), unless z_i / (1 + rtol/4) already exceeds eps_i
    (where the accountant's epsilon jumps or is flat; z_i is then within rtol/4 of the smallest z).
  With a truncation charge the search meets eps_i at delta - (1 + e^eps_i) p_i, which is what makes the
  charged epsilon <= eps_i. z_i lies on the lattice exp(n log(1 + rtol/4)); eps_i = 0 gives z_i = inf.

  Clients with equal (n_i, eps_i) are solved once; the rest per dataset size in order of decreasing
  eps_i by a secant search warm-started from the previous solution. Initial guesses: the surrogate with
  the small-q amplification rdp ~ 2 q^2 alpha / z^2 folded into the step count (twice that z for
  'fixed'); for 'pld' the RDP calibration of the untruncated Poisson event. Cost per distinct (n_i,
  eps_i): one to three accountant evaluations, a few ms each for 'rdp' with 'poisson', ~0.6 s for 'rdp'
  with 'fixed' (dp-accounting's without-replacement bound at all orders), ~0.1-0.8 s for 'pld'.

  Args:
    eps: target budgets: [N], finite, >= 0.
    num_examples: n: [N] or scalar, the clients' public dataset sizes (>= 1); q_i = min(1, B / n_i).
    steps: DP-SGD steps of the whole run, T * S >= 1.
    delta: target delta in (0, 1).
    sampler: the round's :class:`Sampler`.
    accountant: 'rdp' or 'pld' ('pld' needs 'poisson').
    rtol: relative tolerance on epsilon, in (0, 1).

  Returns:
    z: [N] float64.

  Raises:
    ConfigError for invalid inputs, a budget that needs z outside ``CALIBRATION_Z_RANGE``, or one the
    truncation charge makes uncertifiable.
  """
  check_choice("accountant", accountant, ACCOUNTANTS)
  steps = _check_run(steps, delta)
  check_open_unit("rtol", rtol)
  _check_sampler(sampler)
  _check_epsilons(eps)
  _check_examples(num_examples)
  cols = _client_arrays(eps=eps, n=num_examples)
  e, n = cols["eps"].astype(np.float64), cols["n"].astype(np.int64)
  z = np.full(e.shape, np.inf)
  live = np.flatnonzero(e > 0)
  if not live.size:
    return z
  keys, first, inverse = np.unique(
    np.stack([n[live], -e[live]], axis=1), axis=0, return_index=True, return_inverse=True
  )
  n_keys, e_keys = keys[:, 0].astype(np.int64), -keys[:, 1]

  def describe(name: str) -> Callable[[int], str]:
    def message(j: int) -> str:
      i = int(live[first[j]])
      return (
        f"eps[{i}]={float(e[i])!r} (num_examples={int(n[i])}, sampler={sampler.kind!r}, steps={steps}, "
        f"delta={delta}, accountant={name!r})"
      )

    return message

  q_keys = sampling_rates(n_keys, sampler.batch_size)
  guess = -np.log(
    np.asarray(_inverse_noise(e_keys, _amplified_steps(q_keys, steps), math.log(1.0 / delta)), np.float64)
  )
  if sampler.kind == "fixed":  # dp-accounting's Gaussian multiplier is z / 2 (sensitivity 2C)
    guess += math.log(2.0)
  # Budgets that overflow the surrogate (NaN) need the smallest z; the search clamps to the range anyway.
  log_range = np.log(CALIBRATION_Z_RANGE)
  guess = np.clip(np.nan_to_num(guess, nan=log_range[0]), *log_range)
  if accountant == "pld":  # Warm start from the untruncated event's RDP calibration (cheap).
    untruncated = sampler._replace(capacity=max(sampler.capacity, int(n_keys.max()) + 1))
    rdp = _solve_sorted(n_keys, e_keys, guess, steps, delta, untruncated, "rdp", rtol, describe("rdp"))
    guess = np.log(rdp)
  solution = _solve_sorted(
    n_keys, e_keys, guess, steps, delta, sampler, accountant, rtol, describe(accountant)
  )
  z[live] = solution[inverse.reshape(-1)]
  return z
