"""Statistics for claims across seeds: confidence intervals, paired differences, rank correlation.

The unit of replication is the seed (it draws the clients' costs and the data partition); training-noise
draws within a seed are nested in it. A figure measured over seeds x draws is therefore first averaged over
the draws of each seed, and its interval is Student's t interval over the per-seed means (docs/model.md
"Metrics"):

  mean +- t_{(1 + c) / 2, m - 1} s / sqrt(m),   s = the sample std of the m per-seed means.

Two mechanisms are compared PAIRED by seed: the interval is that of the per-seed differences, and
"A beats B" is claimed only when it excludes 0 AND is evidence: it rests on at least ``MIN_SEEDS`` seeds and
a nonzero sample variance (a t interval from 2 seeds, or from equal values, is no evidence of anything).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
from scipy import stats as sps

from fcfn_jax.validate import check_open_unit, require

# Seeds an interval needs before any verdict: with m = 2 the t interval has one degree of freedom (its
# quantile is 12.7) and a single coincidence decides it.
MIN_SEEDS = 3
# A half width below this fraction of |mean| is float rounding of equal values: zero sample variance.
_ROUNDING = 1e-12
INSUFFICIENT_SEEDS = f"insufficient seeds (n < {MIN_SEEDS})"
ZERO_VARIANCE = "zero variance"
NOT_SIGNIFICANT = "not significant"


class Interval(NamedTuple):
  """A mean with its two-sided confidence interval [low, high] over ``n`` replicates."""

  mean: float
  low: float
  high: float
  n: int

  @property
  def half_width(self) -> float:
    return (self.high - self.low) / 2

  def excludes_zero(self) -> bool:
    return self.low > 0 or self.high < 0

  def weakness(self) -> str | None:
    """Why the interval is no evidence: ``INSUFFICIENT_SEEDS`` (n < MIN_SEEDS), ``ZERO_VARIANCE`` (half
    width <= 1e-12 |mean|: the replicates are equal), or None when it is evidence."""
    if self.n < MIN_SEEDS:
      return INSUFFICIENT_SEEDS
    if self.half_width <= _ROUNDING * abs(self.mean):
      return ZERO_VARIANCE
    return None

  def is_evidence(self) -> bool:
    """n >= MIN_SEEDS replicates with a nonzero sample variance: the interval may support a verdict."""
    return self.weakness() is None

  def significant(self) -> bool:
    """The interval is evidence and excludes 0."""
    return self.is_evidence() and self.excludes_zero()

  def __format__(self, spec: str) -> str:
    spec = spec or ".3g"
    return f"{self.mean:{spec}} +- {self.half_width:{spec}}"


def _per_seed(values: np.ndarray | Sequence, name: str) -> np.ndarray:
  """[seeds] or [seeds, draws] -> per-seed means [seeds]; ConfigError on NaN or fewer than 2 seeds."""
  arr = np.asarray(values, np.float64)
  require(arr.ndim in (1, 2), f"{name} has shape {arr.shape}: expected [seeds] or [seeds, draws]")
  require(
    arr.shape[0] >= 2 and arr.size, f"{name} has {arr.shape[0]} seeds: a confidence interval needs >= 2"
  )
  require(np.all(np.isfinite(arr)), f"{name} holds non-finite values: expected finite measurements")
  return arr.mean(axis=1) if arr.ndim == 2 else arr


def mean_interval(values: np.ndarray | Sequence, confidence: float = 0.95) -> Interval:
  """Mean and t interval over seeds of ``values`` [seeds] or [seeds, draws] (draws averaged per seed)."""
  check_open_unit("confidence", confidence)
  means = _per_seed(values, "values")
  m = means.size
  center = float(means.mean())
  spread = float(means.std(ddof=1)) / np.sqrt(m)
  half = float(sps.t.ppf((1 + confidence) / 2, m - 1)) * spread
  return Interval(center, center - half, center + half, m)


def paired_difference(
  a: np.ndarray | Sequence, b: np.ndarray | Sequence, confidence: float = 0.95
) -> Interval:
  """The t interval of mean(a - b) over seeds, paired: a and b [seeds] or [seeds, draws], same seeds."""
  a_seeds, b_seeds = _per_seed(a, "a"), _per_seed(b, "b")
  require(
    a_seeds.shape == b_seeds.shape, f"a has {a_seeds.size} seeds and b {b_seeds.size}: expected the same"
  )
  return mean_interval(a_seeds - b_seeds, confidence)


def verdict(difference: Interval, first: str, second: str) -> str:
  """'first > second' / 'first < second' when the paired interval is evidence and excludes 0; else why not:
  ``INSUFFICIENT_SEEDS``, ``ZERO_VARIANCE`` (Interval.weakness) or ``NOT_SIGNIFICANT``."""
  weakness = difference.weakness()
  if weakness is not None:
    return weakness
  if difference.low > 0:
    return f"{first} > {second}"
  if difference.high < 0:
    return f"{first} < {second}"
  return NOT_SIGNIFICANT


def pairwise_table(
  per_seed: Mapping[str, np.ndarray], reference: str, confidence: float = 0.95, floatfmt: str = ".3g"
) -> list[dict[str, object]]:
  """One row per name != reference: paired difference (name - reference) over seeds and the verdict.

  per_seed: name -> values [seeds] or [seeds, draws], all on the same seeds in the same order.
  """
  require(reference in per_seed, f"reference={reference!r} is invalid: expected one of {sorted(per_seed)}")
  rows = []
  for name, values in per_seed.items():
    if name == reference:
      continue
    diff = paired_difference(values, per_seed[reference], confidence)
    rows.append(
      {
        "comparison": f"{name} - {reference}",
        "mean_difference": diff.mean,
        "ci_low": diff.low,
        "ci_high": diff.high,
        "seeds": diff.n,
        "verdict": verdict(diff, name, reference),
        "summary": format(diff, floatfmt),
      }
    )
  return rows


def spearman(x: np.ndarray | Sequence, y: np.ndarray | Sequence) -> float:
  """Spearman's rank correlation of paired samples x, y [n] (average ranks for ties), in [-1, 1]."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  require(
    x.shape == y.shape and x.ndim == 1 and x.size >= 3, f"x {x.shape} / y {y.shape}: expected [n >= 3] each"
  )
  require(np.all(np.isfinite(x)) and np.all(np.isfinite(y)), "x / y hold non-finite values: expected finite")
  rx, ry = sps.rankdata(x), sps.rankdata(y)
  return float(np.corrcoef(rx, ry)[0, 1])
