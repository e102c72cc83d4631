"""Empirical privacy audit of one client's DP-SGD: a canary membership test -> an epsilon lower bound.

The audited mechanism M is :func:`fcfn_jax.federated.client_update` itself (S local DP-SGD steps, clip
C, noise multiplier z, learning rate eta, the configured sampler), released as its model delta Delta. The
neighbouring datasets are the client's n examples D and D', which adds one canary example (add/remove
adjacency, the Poisson sampler's) or puts it in place of the client's last example (replace-one, the
fixed-size sampler's) (Jagielski, Ullman and Oprea, "Auditing differentially private machine learning",
2020; Nasr et al., "Tight auditing of differentially private machine learning", 2023). Both runs use the
public n for the sampling rate q = min(1, B / n) and the divisor q n, as the accountant assumes.

Test. For a score s(Delta) and threshold t, guess "canary in" when s > t, and let
TPR = P[s(M(D')) > t], FPR = P[s(M(D)) > t]. (eps, delta)-DP for both orders of the neighbours gives

  TPR <= e^eps FPR + delta        and        1 - FPR <= e^eps (1 - TPR) + delta,

  so  eps >= max( log((TPR - delta) / FPR),  log((1 - FPR - delta) / (1 - TPR)) ).

Both forms increase with TPR and decrease with FPR, so the one-sided Clopper-Pearson bounds TPR >= TPR_lo
and FPR <= FPR_hi, each at level 1 - alpha/2, make the right-hand side at (TPR_lo, FPR_hi) a lower bound
on the mechanism's true epsilon with probability >= 1 - alpha (union bound). t is chosen on a selection
split of the trials disjoint from the evaluation split, so the evaluation counts are exactly binomial.

Score. v = grad_theta loss(theta; canary) / ||.||_2, the unit direction the canary pushes the model, and

  s = -<Delta, v> q n / (eta C) = sum_t [ <sum_{j in batch_t} clip_C(g_jt), v> + <xi_t, v> ] / C,
  xi_t ~ N(0, (z C)^2 I).

With a canary whose clipped gradient lies along v where the client's own examples have no gradient (a
logistic regression canary lighting pixels the client never uses), s ~ sum_t (b_t + N(0, z^2)) under D'
with b_t ~ Bernoulli(q) the canary's inclusions, and N(0, S z^2) under D: the Poisson-subsampled Gaussian
mechanism's worst case. At q = 1 (B >= n + 1) it is the S-fold Gaussian mechanism, and the audit can
approach the exact epsilon of that composition; at q < 1 the test sees the mixture the accountant
analyses. Anything else (other models, overlapping gradients) only lowers the audit's power, never its
validity.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import stats

from fcfn_jax.config import FederatedConfig, PrivacyConfig
from fcfn_jax.federated import client_update
from fcfn_jax.models import ApplyFn, make_loss_fn, normalize_pixels
from fcfn_jax.validate import check_int, check_open_unit, require

_ALL_SLOTS = 2**31 - 1  # a slot_block at least every step's slots: one block (federated.slot_block)


class Canary(NamedTuple):
  """The audited example: x uint8 [H, W, C], y int32 scalar."""

  x: chex.Array
  y: chex.Array


class AuditResult(NamedTuple):
  """One audit. eps_lower holds with probability >= ``confidence`` for the mechanism that made the scores.

  threshold: t of the test s > t (chosen on the selection split). tpr, fpr: empirical rates on the
  evaluation split; tpr_low, fpr_high: their one-sided Clopper-Pearson bounds. trials: evaluation trials
  per side.
  """

  eps_lower: float
  threshold: float
  tpr: float
  fpr: float
  tpr_low: float
  fpr_high: float
  trials: int


# ----------------------------------------------------------------------------------------------------------
# Statistics (host side, numpy/scipy).
# ----------------------------------------------------------------------------------------------------------


def clopper_pearson(successes: np.ndarray | int, trials: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
  """One-sided exact binomial bounds (low, high) of p from k = ``successes`` of n = ``trials``.

  low solves P_p[Bin(n, p) >= k] = alpha, i.e. the alpha quantile of Beta(k, n - k + 1) (0 at k = 0);
  high solves P_p[Bin(n, p) <= k] = alpha, the 1 - alpha quantile of Beta(k + 1, n - k) (1 at k = n).
  Each holds with probability >= 1 - alpha on its own. Elementwise over k: [...].
  """
  check_int("trials", trials)
  check_open_unit("alpha", alpha)
  k = np.asarray(successes, dtype=np.float64)
  require(bool(np.all((k >= 0) & (k <= trials))), f"successes must lie in [0, trials={trials}]")
  # The Beta parameters are clamped to stay valid; np.where then picks the closed-form boundary values.
  low = np.where(k > 0, stats.beta.ppf(alpha, np.maximum(k, 1), trials - k + 1), 0.0)
  high = np.where(k < trials, stats.beta.ppf(1 - alpha, k + 1, np.maximum(trials - k, 1)), 1.0)
  return low, high


def epsilon_lower_bound(
  true_positives: np.ndarray | int,
  false_positives: np.ndarray | int,
  trials_in: int,
  trials_out: int,
  delta: float,
  confidence: float = 0.95,
) -> np.ndarray:
  """max(0, log((TPR_lo - delta) / FPR_hi), log((1 - FPR_hi - delta) / (1 - TPR_lo))), elementwise.

  TPR_lo, FPR_hi: one-sided Clopper-Pearson bounds at level 1 - alpha/2 with alpha = 1 - confidence, so
  the result is a lower bound on epsilon with probability >= ``confidence`` (see the module docstring).

  Args:
    true_positives: k_in [...], canary-in trials guessed "in", of ``trials_in``.
    false_positives: k_out [...], canary-out trials guessed "in", of ``trials_out``.
    delta: the delta of the claim being audited, in (0, 1).
    confidence: 1 - alpha, in (0, 1).
  """
  check_open_unit("delta", delta)
  check_open_unit("confidence", confidence)
  alpha = 1.0 - confidence
  tpr_low, _ = clopper_pearson(true_positives, trials_in, alpha / 2)
  _, fpr_high = clopper_pearson(false_positives, trials_out, alpha / 2)
  with np.errstate(divide="ignore"):  # log(0) = -inf where a form is vacuous; the max drops it.
    forward = np.log(np.maximum(tpr_low - delta, 0.0)) - np.log(fpr_high)
    backward = np.log(np.maximum(1.0 - fpr_high - delta, 0.0)) - np.log1p(-tpr_low)
  return np.maximum(np.maximum(forward, backward), 0.0)


def _positives(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
  """#{s > t} for each threshold t: [T]."""
  return scores.size - np.searchsorted(np.sort(scores), thresholds, side="right")


def audit_scores(
  scores_out: chex.ArrayNumpy,
  scores_in: chex.ArrayNumpy,
  delta: float,
  confidence: float = 0.95,
  selection_fraction: float = 0.5,
) -> AuditResult:
  """Epsilon lower bound from i.i.d. scores of the mechanism without (D) and with (D') the canary.

  The first ``selection_fraction`` of each side's trials pick the threshold t that maximizes
  :func:`epsilon_lower_bound` there, among the midpoints between their consecutive distinct scores (and
  the smallest score); the remaining trials evaluate it.

  Args:
    scores_out: [n_out] scores of M(D). scores_in: [n_in] scores of M(D'). Larger = more "in".
    delta: the delta of the claim, in (0, 1). confidence: in (0, 1).
    selection_fraction: in (0, 1); each split must keep at least 2 trials per side.
  """
  check_open_unit("selection_fraction", selection_fraction)
  sides = {"scores_out": np.asarray(scores_out, np.float64), "scores_in": np.asarray(scores_in, np.float64)}
  splits = {}
  for name, s in sides.items():
    require(s.ndim == 1 and np.all(np.isfinite(s)), f"{name} is invalid: expected finite scores [trials]")
    cut = int(selection_fraction * s.size)
    require(
      2 <= cut <= s.size - 2,
      f"{name} has {s.size} trials: too few to split at "
      f"selection_fraction={selection_fraction} (need >= 2 per split)",
    )
    splits[name] = (s[:cut], s[cut:])
  (select_out, eval_out), (select_in, eval_in) = splits["scores_out"], splits["scores_in"]
  distinct = np.unique(np.concatenate([select_out, select_in]))
  # Thresholds between scores, not on them: the noiseless control's scores differ only by float jitter,
  # and a threshold on one of them would split the evaluation trials at random.
  candidates = np.concatenate([distinct[:1], (distinct[:-1] + distinct[1:]) / 2])
  selection = epsilon_lower_bound(
    _positives(select_in, candidates),
    _positives(select_out, candidates),
    select_in.size,
    select_out.size,
    delta,
    confidence,
  )
  threshold = candidates[np.argmax(selection)]
  tp = int(_positives(eval_in, threshold[None])[0])
  fp = int(_positives(eval_out, threshold[None])[0])
  alpha = 1.0 - confidence
  tpr_low, _ = clopper_pearson(tp, eval_in.size, alpha / 2)
  _, fpr_high = clopper_pearson(fp, eval_out.size, alpha / 2)
  eps = epsilon_lower_bound(tp, fp, eval_in.size, eval_out.size, delta, confidence)
  return AuditResult(
    eps_lower=float(eps),
    threshold=float(threshold),
    tpr=tp / eval_in.size,
    fpr=fp / eval_out.size,
    tpr_low=float(tpr_low),
    fpr_high=float(fpr_high),
    trials=min(eval_in.size, eval_out.size),
  )


# ----------------------------------------------------------------------------------------------------------
# The canary and the mechanism's scores (jitted, vectorized over trials).
# ----------------------------------------------------------------------------------------------------------


def make_canary(x: np.ndarray, label: int, num_pixels: int) -> Canary:
  """A white-on-black canary lighting (255) the ``num_pixels`` pixels the client's examples use least.

  Pixels are ranked by total intensity over the client's examples x uint8 [n, H, W, C] (ties by index),
  so on MNIST-style data the canary lives where the client's examples are all 0 and, for logistic
  regression, its gradient is orthogonal to theirs except in the bias.
  """
  x = np.asarray(x)
  require(
    x.ndim == 4 and x.dtype == np.uint8, f"x {x.shape} {x.dtype} is invalid: expected uint8 [n, H, W, C]"
  )
  check_int("num_pixels", num_pixels)
  require(num_pixels <= x[0].size, f"num_pixels={num_pixels} is invalid: an image has {x[0].size} pixels")
  check_int("label", label, minimum=0)
  usage = x.astype(np.int64).sum(axis=0).reshape(-1)
  lit = np.argsort(usage, kind="stable")[:num_pixels]
  image = np.zeros(usage.shape, np.uint8)
  image[lit] = 255
  return Canary(x=image.reshape(x.shape[1:]), y=np.int32(label))


@functools.partial(jax.jit, static_argnames="apply_fn")
def canary_direction(params: chex.ArrayTree, canary: Canary, apply_fn: ApplyFn) -> chex.ArrayTree:
  """v = g / ||g||_2, g = grad_theta loss(theta; canary) (a params pytree of unit L2 norm)."""
  loss_fn = make_loss_fn(apply_fn)
  x, y = normalize_pixels(canary.x)[None], jnp.asarray(canary.y)[None]
  grad = jax.grad(lambda p: loss_fn(p, x, y)[0])(params)
  norm = optax.tree_utils.tree_norm(grad)
  return jax.tree.map(lambda g: g / norm, grad)


@functools.partial(jax.jit, static_argnames=("apply_fn", "fed", "privacy", "num_trials", "chunk_size"))
def canary_scores(
  params: chex.ArrayTree,
  x: chex.Array,
  y: chex.Array,
  canary: Canary,
  noise_multiplier: chex.Numeric,
  key: chex.PRNGKey,
  *,
  apply_fn: ApplyFn,
  fed: FederatedConfig,
  privacy: PrivacyConfig,
  num_trials: int,
  chunk_size: int = 64,
) -> chex.Array:
  """Scores s = -<Delta, v> q n / (eta C) of independent ``client_update`` runs without and with the canary.

  D is the client's n examples (num_examples = n; the canary's slot is padding, which contributes exactly
  nothing). D' is n + 1 examples with the canary last for the Poisson sampler (add/remove), and the first
  n - 1 examples plus the canary for the fixed one (replace-one). Both run at the public size n
  (``client_update``'s dataset_size). Trial i of membership m uses the key fold_in(fold_in(key, m), i).
  Runs are vectorized in chunks of ``chunk_size`` (``lax.map``): this bounds memory, and on CPU chunks of
  tens of runs, whose per-example gradients stay in cache, are several times faster than hundreds. The
  sampling rate is q = min(1, B / n): B >= n + 1 puts every example in every step (q = 1).

  Args:
    params: the server model theta the round starts from.
    x: uint8 [n, H, W, C], y: int32 [n], the client's own examples. canary: its extra example.
    noise_multiplier: scalar z (0 = the non-private control: clipping without noise).
    key: PRNG key of the audit. apply_fn, fed, privacy: as for ``client_update`` (privacy.private=True).
    num_trials: runs per membership. chunk_size: runs per vectorized chunk.

  Returns:
    float32 [2, num_trials]: row 0 without the canary (D), row 1 with it (D').
  """
  require(
    privacy.private,
    "privacy.private=False is invalid for an audit: the non-private path ignores "
    "the noise multiplier; audit z = 0 instead",
  )
  check_int("num_trials", num_trials)
  check_int("chunk_size", chunk_size)
  n = x.shape[0]
  check_int("x.shape[0]", n, minimum=2 if privacy.sampling == "fixed" else 1)
  canary_x, canary_y = jnp.asarray(canary.x, jnp.uint8)[None], jnp.asarray(canary.y, jnp.int32)[None]
  x, y = jnp.asarray(x, jnp.uint8), jnp.asarray(y, jnp.int32)
  rows_out = (jnp.concatenate([x, canary_x]), jnp.concatenate([y, canary_y]))
  if privacy.sampling == "fixed":  # the canary replaces the last example, which becomes padding
    rows_in = (
      jnp.concatenate([x[:-1], canary_x, x[-1:]]),
      jnp.concatenate([y[:-1], canary_y, y[-1:]]),
    )
    sizes = (n, n)
  else:
    rows_in, sizes = rows_out, (n, n + 1)
  direction = canary_direction(params, canary, apply_fn)
  scale = min(fed.batch_size, n) / (fed.client_lr * privacy.clip_norm)
  # lax.map's batches are an unnamed vmap, under which a skipped slot block would be a select: one block of
  # all the step's slots computes the same examples with fewer, larger matmuls. With one block
  # (clipping.blocked_clipped_sum makes it one plain call, no lax.cond) nothing depends on the joined counts
  # of the other trials, so client_update runs without axis_name (no pmax); federated_round names its chunk
  # axis only so its conditional blocks stay branches.
  fed = dataclasses.replace(fed, slot_block=_ALL_SLOTS)

  def trial(inputs):
    member, index = inputs
    run_key = jax.random.fold_in(jax.random.fold_in(key, member), index)
    x_row, y_row = jax.tree.map(lambda a, b: jnp.where(member == 1, b, a), rows_out, rows_in)
    size = jnp.where(member == 1, sizes[1], sizes[0])
    result = client_update(
      params, x_row, y_row, size, noise_multiplier, run_key, n, apply_fn=apply_fn, fed=fed, privacy=privacy
    )
    return -scale * optax.tree_utils.tree_vdot(result.delta, direction)

  members = jnp.repeat(jnp.arange(2, dtype=jnp.int32), num_trials)
  indices = jnp.tile(jnp.arange(num_trials, dtype=jnp.int32), 2)
  scores = jax.lax.map(trial, (members, indices), batch_size=min(chunk_size, 2 * num_trials))
  return scores.reshape(2, num_trials)


def audit_client(
  params: chex.ArrayTree,
  x: chex.Array,
  y: chex.Array,
  canary: Canary,
  noise_multiplier: float,
  key: chex.PRNGKey,
  *,
  apply_fn: ApplyFn,
  fed: FederatedConfig,
  privacy: PrivacyConfig,
  num_trials: int,
  confidence: float = 0.95,
  chunk_size: int = 64,
) -> AuditResult:
  """:func:`canary_scores` then :func:`audit_scores` at ``privacy.delta``: the epsilon lower bound of
  ONE client's ``client_update`` with noise multiplier z on the client's examples plus the canary."""
  require(
    math.isfinite(noise_multiplier) and noise_multiplier >= 0,
    f"noise_multiplier={noise_multiplier!r} is invalid: expected a finite number >= 0",
  )
  scores = np.asarray(
    canary_scores(
      params,
      x,
      y,
      canary,
      jnp.float32(noise_multiplier),
      key,
      apply_fn=apply_fn,
      fed=fed,
      privacy=privacy,
      num_trials=num_trials,
      chunk_size=chunk_size,
    )
  )
  return audit_scores(scores[0], scores[1], privacy.delta, confidence)
