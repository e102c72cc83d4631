"""Tests of fcfn_jax.stats: t intervals (closed form, coverage), paired differences, Spearman."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from fcfn_jax import stats
from fcfn_jax.validate import ConfigError


def test_mean_interval_closed_form():
  interval = stats.mean_interval([1.0, 2.0, 3.0])
  half = 4.302652729911275 / math.sqrt(3)  # t_{0.975, 2} * s / sqrt(m), s = 1
  assert interval.mean == pytest.approx(2.0)
  assert interval.low == pytest.approx(2.0 - half) and interval.high == pytest.approx(2.0 + half)
  assert interval.n == 3 and interval.half_width == pytest.approx(half)


def test_draws_are_averaged_within_each_seed():
  nested = stats.mean_interval([[1.0, 3.0], [2.0, 2.0], [3.0, 5.0]])
  flat = stats.mean_interval([2.0, 2.0, 4.0])
  assert nested == flat


def test_interval_covers_the_true_mean_at_its_level():
  rng = np.random.default_rng(0)
  trials, seeds = 4000, 10
  samples = rng.normal(1.5, 2.0, (trials, seeds))
  intervals = [stats.mean_interval(row) for row in samples]
  covered = sum(interval.low <= 1.5 <= interval.high for interval in intervals)
  # 99.9% binomial band around 0.95.
  band = 3.3 * math.sqrt(0.95 * 0.05 / trials)
  assert abs(covered / trials - 0.95) < band


def test_paired_difference_uses_the_pairing():
  rng = np.random.default_rng(1)
  seed_effect = rng.normal(0, 10, 12)  # large between-seed spread, shared by both mechanisms
  a = seed_effect + 1.0 + rng.normal(0, 0.1, 12)
  b = seed_effect + rng.normal(0, 0.1, 12)
  paired = stats.paired_difference(a, b)
  assert paired.excludes_zero() and paired.low > 0.5
  unpaired_half = stats.mean_interval(a).half_width + stats.mean_interval(b).half_width
  assert paired.half_width < unpaired_half / 20
  assert stats.verdict(paired, "a", "b") == "a > b"
  assert stats.verdict(stats.paired_difference(b, a), "b", "a") == "b < a"


def test_pairwise_table_rows_and_verdicts():
  per_seed = {
    "ref": np.zeros(5),
    "up": np.arange(5) * 0.01 + 1.0,
    "flat": np.array([1.0, -1.0, 1.0, -1.0, 0.0]),
  }
  rows = stats.pairwise_table(per_seed, "ref")
  by_name = {row["comparison"]: row for row in rows}
  assert by_name["up - ref"]["verdict"] == "up > ref"
  assert by_name["flat - ref"]["verdict"] == "not significant"
  assert all(row["seeds"] == 5 for row in rows)


def test_spearman_matches_scipy_and_is_rank_invariant():
  rng = np.random.default_rng(2)
  x, y = rng.normal(size=30), rng.normal(size=30)
  y[::3] = y[0]  # ties
  assert stats.spearman(x, y) == pytest.approx(sps.spearmanr(x, y).statistic, abs=1e-12)
  assert stats.spearman(x, np.exp(x)) == pytest.approx(1.0)
  assert stats.spearman(x, -(x**3)) == pytest.approx(-1.0)


def test_two_seeds_or_equal_values_give_no_verdict():
  """Issue 22: 2 seeds with equal differences gave "0.010 +- 0.000" marked significant."""
  two = stats.paired_difference([0.51, 0.62], [0.50, 0.61])
  assert two.excludes_zero() and two.n == 2  # the interval itself is still reported...
  assert not two.is_evidence() and not two.significant()  # ...but it is no evidence
  assert two.weakness() == stats.INSUFFICIENT_SEEDS == "insufficient seeds (n < 3)"
  assert stats.verdict(two, "a", "b") == "insufficient seeds (n < 3)"
  # Three seeds, all differences equal: a zero-width interval that excludes 0 but is no evidence.
  flat = stats.paired_difference([0.51, 0.62, 0.73], [0.50, 0.61, 0.72])
  assert flat.n == 3 and flat.half_width < 1e-12 and flat.excludes_zero()
  assert flat.weakness() == stats.ZERO_VARIANCE and not flat.significant()
  assert stats.verdict(flat, "a", "b") == "zero variance"
  zeros = stats.mean_interval(np.zeros(4))
  assert zeros.weakness() == stats.ZERO_VARIANCE and stats.verdict(zeros, "a", "b") == "zero variance"
  # The same differences with some spread over 3 seeds: evidence, and a verdict.
  spread = stats.paired_difference([0.51, 0.621, 0.732], [0.50, 0.61, 0.72])
  assert spread.is_evidence() and spread.significant() and stats.verdict(spread, "a", "b") == "a > b"
  rows = stats.pairwise_table({"ref": [0.50, 0.61], "up": [0.51, 0.62]}, "ref")
  assert rows[0]["verdict"] == "insufficient seeds (n < 3)" and rows[0]["seeds"] == 2


@pytest.mark.parametrize(
  "call, message",
  [
    (lambda: stats.mean_interval([1.0]), "1 seeds"),
    (lambda: stats.mean_interval([1.0, np.nan]), "non-finite"),
    (lambda: stats.mean_interval([1.0, 2.0], confidence=1.0), "confidence=1.0"),
    (lambda: stats.paired_difference([1.0, 2.0], [1.0, 2.0, 3.0]), "same"),
    (lambda: stats.spearman([1.0, 2.0], [2.0, 1.0]), r"\[n >= 3\]"),
    (lambda: stats.pairwise_table({"a": [1.0, 2.0]}, "b"), "reference='b'"),
  ],
)
def test_bad_input_is_named(call, message):
  with pytest.raises(ConfigError, match=message):
    call()
