"""The traced, tight map eps <-> z of the Poisson sampler (jnp; jit/vmap/grad-safe), and the in-program map.

docs/model.md "From epsilon_i to noise". The RDP of the Poisson-subsampled Gaussian at dp-accounting's
default orders ``TRACED_ORDERS`` (fractional 1.1..10.9, integer 11..63, 128..1024; the fractional ones by
dp-accounting's two erfc series at a fixed length plus a bound on the rest), the same RDP -> DP
conversion, so the traced epsilon is the RdpAccountant's (1e-6 relative, tested) and the inverse
eps -> z by a safeguarded Newton root find with an implicit gradient (:func:`traced_noise_multiplier`)
is the host RDP calibration's (~1e-4). :func:`program_noise` picks it or the surrogate inside a program.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from dp_accounting import rdp as dp_rdp
from scipy import special

from fcfn_jax.config import SAMPLERS
from fcfn_jax.privacy.calibration import CALIBRATION_Z_RANGE
from fcfn_jax.privacy.events import charged_delta, check_epsilons, check_run, check_sampling_rates
from fcfn_jax.privacy.surrogate import amplified_steps, inverse_noise
from fcfn_jax.validate import check_array, check_choice, require

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
  # Double where again: for large x > 0, erfc underflows to 0 and the unused log(0.5 e) would give an inf
  # derivative (0 * inf = nan in the gradient).
  body = jnp.where(near > 0, jnp.log1p(-0.5 * e), jnp.log(0.5 * jnp.where(near > 0, 1.0, e)))
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
  # Double where: an order left out (rdp = inf) has total = inf with no derivative, not d total / d steps =
  # inf, which times its zero cotangent would make d eps / d steps nan (and forward mode's 0 * nan too).
  finite = jnp.isfinite(rdp)
  total = jnp.where(finite, jnp.asarray(steps, rdp.dtype)[..., None] * jnp.where(finite, rdp, 0.0), jnp.inf)
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
  remaining = charged_delta(eps, delta, overflow)
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
  guess = -jnp.log(inverse_noise(eps, amplified_steps(q, steps), -jnp.log(delta)))

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
  delta in (0, 1), and the truncation's overflow probability p = ``events.overflow_probability`` (0 when
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
  check_epsilons(eps)
  check_sampling_rates(sampling_rate)
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
  live = (eps > 0) & (charged_delta(eps, delta, overflow) > 0)
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
  steps = check_run(steps, delta)
  check_epsilons(eps)
  eps = jnp.asarray(eps)
  eps = eps.astype(jnp.result_type(eps.dtype, float))
  remaining = charged_delta(eps, jnp.asarray(delta, eps.dtype), jnp.asarray(overflow, eps.dtype))
  live = (eps > 0) & (remaining > 0)
  u = inverse_noise(jnp.where(live, eps, 1.0), steps, -jnp.log(jnp.where(live, remaining, delta)))
  scale = 2.0 if sampler_kind == "fixed" else 1.0
  return jnp.where(live, scale / u, jnp.inf)
