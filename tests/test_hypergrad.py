"""Hypergradients of the trained model's validation loss w.r.t. the payment R (fcfn_jax.hypergrad).

Tolerances: for fixed keys U(R) is float64 end to end except the z_i the rounds train with (rounded up
to float32, relative 6e-8, straight-through in the gradient) and the rounds' float32 aggregation
weights; z_i only scales the noise, so one evaluation's rounding stays below ROUNDING |U| (at h = 1e-4
the differences jitter by ~3e-10 |U| / h). U is piecewise smooth: the clipping has kinks where a
per-example norm crosses C, which central differences with h >~ 0.05 straddle (they then drift by ~0.1
here), so the steps are small. Central differences with common random numbers (the same keys) then have
a truncation error estimated by the change between steps h and h / 2, plus ROUNDING |U| / h; the check is
that the reverse-mode gradient lies within twice the former plus the latter of the finer difference.
"""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcfn_jax import config as fc
from fcfn_jax import data, hypergrad, stats
from fcfn_jax.game import leader
from fcfn_jax.privacy import traced

from .cli import REPO, env

LAMBDA_ACC = 1000.0  # large enough that the trained model, not the payment, dominates dU/dR
ROUNDING = 1e-9  # relative rounding of one evaluation of U (float32 z and aggregation weights)


def _cfg() -> fc.SimulationConfig:
  return fc.SimulationConfig(
    data=fc.DataConfig(num_clients=10, capacity=32, test_examples=200),
    model=fc.ModelConfig(name="logreg"),
    federated=fc.FederatedConfig(rounds=3, local_steps=2, batch_size=8, client_lr=0.5),
    privacy=fc.PrivacyConfig(calibration="traced"),
  )


@pytest.fixture(scope="module")
def setup():
  cfg = _cfg()
  fed_data = data.load_federated(cfg.data)
  problem, spec, apply_fn, held_out = hypergrad.make_problem(cfg, fed_data)
  kw = dict(lambda_acc=LAMBDA_ACC, apply_fn=apply_fn, cfg=cfg, spec=spec)
  with jax.enable_x64(True):
    keys = hypergrad.draw_keys(cfg, 2)
  return cfg, fed_data, problem, spec, keys, kw, held_out


def _objective(setup, payment):
  _, _, problem, _, keys, kw, _ = setup
  return np.asarray(hypergrad.objective_draws(jnp.float64(payment), problem, keys, **kw))


def _central(setup, payment, h):
  return (_objective(setup, payment + h) - _objective(setup, payment - h)) / (2 * h)


def test_validation_split_is_disjoint_from_the_held_out_test(setup):
  _, fed_data, problem, _, _, _, held_out = setup
  n = 200
  ids = np.arange(n)
  test = data.Dataset(ids.astype(np.uint8).reshape(n, 1, 1, 1), ids.astype(np.int32), None, n)
  validation, rest = hypergrad.split_validation(test, 0.3, jax.random.PRNGKey(0))
  assert len(validation.y) == 60 and len(rest.y) == 140
  assert not set(validation.y) & set(rest.y) and set(validation.y) | set(rest.y) == set(ids)
  assert len(problem.validation_y) + len(held_out.y) == len(fed_data.test.y)


def test_hypergradient_matches_central_differences_with_common_random_numbers(setup, x64):
  _, _, problem, _, keys, kw, _ = setup
  payment = 35.0  # client 4 interior (0 < eps < eps_max), no cap or entry within the steps
  hg = hypergrad.hypergradient(jnp.float64(payment), problem, keys, **kw)
  coarse, fine = _central(setup, payment, 0.004), _central(setup, payment, 0.002)
  rounding = ROUNDING * np.abs(_objective(setup, payment)) / 0.002
  error = 2 * np.abs(coarse - fine) + rounding
  print("grad", np.asarray(hg.grads), "fd", coarse, fine, "error", error, "stderr", float(hg.stderr))
  assert np.all(np.abs(np.asarray(hg.grads) - fine) <= error)
  np.testing.assert_allclose(float(hg.grad), np.mean(np.asarray(hg.grads)))
  np.testing.assert_allclose(float(hg.value), np.mean(_objective(setup, payment)), rtol=1e-12)
  # The trained model's part of dU/dR (the payment's is -1) is resolved far beyond the error.
  assert np.all(np.abs(np.asarray(hg.grads) + 1.0) > 10 * error)
  assert np.isfinite(float(hg.stderr)) and float(hg.stderr) > 0


def test_gradient_at_a_participation_threshold_is_the_one_sided_derivative_with_the_client_out(setup, x64):
  """Client 4 enters at R0 (eps_4 = 0 at R0, > 0 just above). The gradient at R0 is finite and equals the
  left derivative (the configuration with client 4 out: d eps_4 / dR = 0, z_4 = inf with zero gradient)."""
  _, _, problem, spec, keys, kw, _ = setup
  budget = lambda r: float(leader.follower_budgets(jnp.float64(r), problem.game, spec)[4])
  lo, hi = 21.5, 31.6
  assert budget(lo) == 0 < budget(hi)
  for _ in range(60):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if budget(mid) == 0 else (lo, mid)
  threshold = lo
  hg = hypergrad.hypergradient(jnp.float64(threshold), problem, keys, **kw)
  assert np.all(np.isfinite(np.asarray(hg.grads)))
  at = _objective(setup, threshold)
  left = lambda h: (at - _objective(setup, threshold - h)) / h
  right = lambda h: (_objective(setup, threshold + h) - at) / h
  # Richardson on the one-sided differences (error O(h) -> O(h^2)).
  left_d = 2 * left(0.05) - left(0.1)
  right_d = 2 * right(0.05) - right(0.1)
  error = 2 * np.abs(left(0.05) - left(0.1)) + ROUNDING * np.abs(at) / 0.05
  print(
    "threshold", threshold, "grad", np.asarray(hg.grads), "left", left_d, "right", right_d, "error", error
  )
  assert np.all(np.abs(np.asarray(hg.grads) - left_d) <= error)
  # A kink: the right derivative (client 4 in; the others' slopes change) is another number.
  assert np.any(np.abs(right_d - left_d) > 2 * error)


def test_price_gradient_is_scale_free_and_uniform_prices_are_the_plain_game(setup, x64):
  """U(R, s pi) = U(R, pi) (only price ratios matter), so sum_i pi_i dU/dpi_i = 0 (Euler); pi = 1 gives
  the game without prices."""
  _, _, problem, _, keys, kw, _ = setup
  prices = jnp.ones(problem.game.costs.shape, jnp.float64)
  plain = hypergrad.hypergradient(jnp.float64(35.0), problem, keys, **kw)
  priced = hypergrad.hypergradient(jnp.float64(35.0), problem, keys, prices, **kw)
  np.testing.assert_allclose(float(priced.value), float(plain.value), rtol=1e-12)
  np.testing.assert_allclose(float(priced.grad), float(plain.grad), rtol=1e-6)
  price_grad = np.asarray(priced.price_grad)
  assert np.all(np.isfinite(price_grad)) and np.abs(price_grad).max() > 0
  np.testing.assert_allclose(np.sum(price_grad), 0.0, atol=1e-6 * np.abs(price_grad).sum())


def test_accountant_inverse_has_forward_mode_and_finite_partials_where_orders_drop_out(x64):
  """Forward mode (jax.jvp in R, bench_hypergrad's third case) runs through the accountant's inverse: at
  one step some orders are left out (rdp = inf) and, at small z, some Phi arguments are large (erfc
  underflows); neither may reach the derivatives as 0 * inf = nan (they did: d eps / d steps, and d z / d
  eps at z ~ 0.26, q = 0.27). The jvp in eps equals reverse mode's derivative and central differences
  (h = 1% of eps: the root find's ~1e-4 relative stop is far below the change), d z / d steps is finite."""
  eps, q = jnp.array([3.7, 8.0, 21.7]), jnp.array([0.25, 0.25, 0.27])
  h = 0.01 * eps

  def noise(e, steps):
    return traced.traced_noise_multiplier(e, q, steps, 1e-5, 0.0)

  @jax.jit
  def both(e, steps):
    _, tangent = jax.jvp(lambda x: noise(x, steps), (e,), (jnp.ones_like(e),))
    by_eps, by_steps = jax.grad(lambda x, s: jnp.sum(noise(x, s)), argnums=(0, 1))(e, steps)
    central = (noise(e + h, steps) - noise(e - h, steps)) / (2 * h)
    return tangent, by_eps, by_steps, central

  tangent, by_eps, by_steps, central = map(np.asarray, both(eps, jnp.float64(1.0)))
  assert np.all(np.isfinite(tangent)) and np.all(tangent < 0)
  np.testing.assert_allclose(tangent, by_eps, rtol=1e-10)
  np.testing.assert_allclose(tangent, central, rtol=2e-2)
  assert np.isfinite(by_steps) and by_steps > 0  # more steps, more noise


def test_tuning_comparison_has_both_arms_per_seed_and_paired_intervals():
  """Per-seed rows: one per seed x arm with means over the draws; difference rows: training - Q paired by
  seed (draws averaged first), Student's t interval over the seeds (stats.paired_difference)."""
  rng = np.random.default_rng(0)
  seeds, draws = 3, 4

  def arm(shift):
    return {
      "R": 10.0 + shift,
      "payment": 10.0 + shift,
      "trained_objective": rng.normal(-100 + shift, 1.0, draws),
      "test_accuracy": rng.uniform(0.5, 0.6, draws),
      "validation_loss": rng.uniform(1.0, 2.0, draws),
      "proxy_utility": 5.0 - shift,
      "participants": 3,
    }

  evaluations = [{"seed": s, "Q": arm(0.0), "training": arm(1.0 + 0.1 * s)} for s in range(seeds)]
  per_seed, differences = hypergrad.tuning_comparison(evaluations)
  assert [(r["seed"], r["tuned_for"]) for r in per_seed] == [
    (s, a) for s in range(seeds) for a in ("Q", "training")
  ]
  for row in per_seed:
    assert all(np.isfinite(row[m]) for m in hypergrad.COMPARED) and row["participants"] == 3
    assert np.isfinite(row["trained_objective_stderr"]) and "R_stderr" not in row
  first = evaluations[0]["training"]["trained_objective"]
  np.testing.assert_allclose(per_seed[1]["trained_objective"], first.mean())
  np.testing.assert_allclose(per_seed[1]["trained_objective_stderr"], first.std(ddof=1) / np.sqrt(draws))
  assert [r["metric"] for r in differences] == list(hypergrad.COMPARED)
  for row in differences:
    assert row["seeds"] == seeds and row["ci_low"] <= row["mean_difference"] <= row["ci_high"]
    assert all(np.isfinite(row[c]) for c in ("tuned_for_training", "tuned_for_Q", "ci_low", "ci_high"))
  by_metric = {r["metric"]: r for r in differences}
  diff = lambda m: [np.mean(e["training"][m]) - np.mean(e["Q"][m]) for e in evaluations]
  expected = stats.mean_interval(diff("trained_objective"))
  np.testing.assert_allclose(
    [by_metric["trained_objective"][c] for c in ("mean_difference", "ci_low", "ci_high")],
    [expected.mean, expected.low, expected.high],
  )
  assert by_metric["R"]["mean_difference"] == pytest.approx(1.1)  # shifts 1, 1.1, 1.2
  assert by_metric["R"]["verdict"] == "tuned_for_training > tuned_for_Q"
  # Two seeds give an interval but no verdict (stats.MIN_SEEDS).
  _, two = hypergrad.tuning_comparison(evaluations[:2])
  assert all(r["seeds"] == 2 and r["verdict"] == stats.INSUFFICIENT_SEEDS for r in two)


@pytest.mark.slow  # two seeds of tuning and evaluation with their compilations: ~75 s on a loaded CPU
def test_tune_pricing_trained_objective_compares_both_payments_over_seeds(tmp_path):
  out = tmp_path / "tune"
  flags = [
    "--objective=trained",
    "--num_clients=6",
    "--rounds=1",
    "--local_steps=1",
    "--steps=1",
    "--draws=2",
  ]
  proc = subprocess.run(
    [
      sys.executable,
      "scripts/tune_pricing.py",
      *flags,
      "--draws=2",
      "--seeds=2",
      "--plot_points=2",
      f"--out={out}",
      "--progress=false",
    ],
    cwd=REPO,
    env=env(JAX_LOG_COMPILES="1"),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  # Every seed reuses the first seed's programs (one static config, same shapes).
  for program in ("hypergradient", "trained_draws"):
    assert proc.stderr.count(f"Compiling jit({program})") == 1, program
  per_seed = json.loads((out / "comparison.json").read_text())
  differences = json.loads((out / "differences.json").read_text())
  trajectory = json.loads((out / "trajectory.json").read_text())
  along = json.loads((out / "objective_along_R.json").read_text())
  assert [(r["seed"], r["tuned_for"]) for r in per_seed] == [
    (0, "Q"),
    (0, "training"),
    (1, "Q"),
    (1, "training"),
  ]
  for row in per_seed:
    assert all(np.isfinite(row[m]) for m in hypergrad.COMPARED)
    assert 0 <= row["test_accuracy"] <= 1 and row["validation_loss"] > 0 and row["participants"] >= 1
  for seed in (0, 1):
    steps = [r for r in trajectory if r["seed"] == seed]
    q, trained = (r for r in per_seed if r["seed"] == seed)
    assert len(steps) == 2 and all(np.isfinite(r["grad"]) for r in steps)
    # The tuned R is the best of the trajectory, which starts at the Q-optimal R*.
    assert steps[0]["payment"] == pytest.approx(q["R"])
    best = max(steps, key=lambda r: r["objective"])
    assert trained["R"] == pytest.approx(best["payment"])
  assert {r["metric"] for r in differences} == set(hypergrad.COMPARED)
  for row in differences:
    assert row["seeds"] == 2 and np.isfinite(row["ci_low"]) and np.isfinite(row["ci_high"])
  assert len(along) >= 3 and sum(r["is_R_Q"] for r in along) == 1
  assert all(np.isfinite(r["objective"]) and r["objective_stderr"] >= 0 for r in along)
  # The grid's upper end reaches budgets eps ~ 22 (z ~ 0.26 at q ~ 0.27 in this 1-step run), where the
  # accountant's derivative was nan.
  assert all(np.isfinite(r["grad"]) for r in along)
  assert (out / "objective_along_R.png").stat().st_size > 0
