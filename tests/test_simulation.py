"""End-to-end simulation: determinism, resume after interruption, learning, bad input."""

from __future__ import annotations

import csv
import dataclasses
import os
import pathlib
import re

import chex
import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fcfn_jax import checkpoint, data, federated, fingerprint, report, resume, simulation, validate
from fcfn_jax import config as fc
from fcfn_jax.privacy import events


def _cfg(tmp_path=None, **game) -> fc.SimulationConfig:
  return fc.SimulationConfig(
    data=fc.DataConfig(num_clients=12, capacity=64, test_examples=400),
    model=fc.ModelConfig(name="logreg"),
    federated=fc.FederatedConfig(rounds=4, local_steps=2, batch_size=8, client_lr=0.5),
    game=fc.GameConfig(**game),
    checkpoint_dir=str(tmp_path / "ckpt") if tmp_path else None,
    checkpoint_every=1 if tmp_path else 0,
  )


@pytest.fixture(scope="module")
def fed_data():
  return data.load_federated(_cfg().data)


@pytest.mark.slow  # resume and restart tests compare two runs of one config bit for bit in CI
def test_same_seed_same_results(fed_data):
  a = simulation.run(_cfg(), fed_data=fed_data, progress=False)
  b = simulation.run(_cfg(), fed_data=fed_data, progress=False)
  assert a.history == b.history
  chex.assert_trees_all_equal(a.state, b.state)


def test_resume_after_interruption_matches_uninterrupted(fed_data, tmp_path):
  full = simulation.run(_cfg(), fed_data=fed_data, progress=False)
  cfg = _cfg(tmp_path)
  partial = simulation.run(cfg, fed_data=fed_data, progress=False, stop_after=2)
  assert len(partial.history) == 2
  resumed = simulation.run(cfg, fed_data=fed_data, progress=False)
  assert resumed.history == full.history
  chex.assert_trees_all_equal(resumed.state, full.state)
  assert resumed.summary["test_accuracy"] == full.summary["test_accuracy"]


def test_non_participants_are_paid_nothing_and_spend_no_privacy(fed_data):
  exp = simulation.prepare(_cfg(), fed_data)
  out = simulation.run(_cfg(), fed_data=fed_data, progress=False)
  eps = np.asarray(exp.outcome.budgets)
  stayed_out = eps == 0
  assert stayed_out.any(), "the default game should leave some high-cost clients out"
  np.testing.assert_array_equal(np.asarray(exp.outcome.payments)[stayed_out], 0.0)
  np.testing.assert_array_equal(np.asarray(out.state.steps_done)[stayed_out], 0)
  spent = simulation.privacy_spent(exp, np.asarray(out.state.steps_done))
  assert np.all(spent[~stayed_out] <= eps[~stayed_out] * (1 + 1e-9))
  assert np.all(spent[stayed_out] == 0)


@pytest.mark.parametrize("calibration", [pytest.param("surrogate", marks=pytest.mark.slow), "traced"])
def test_mechanism_round_solves_the_game_inside_its_program_and_returns_its_z(fed_data, calibration):
  """The program solves the game from the costs it is given (no host outcome enters it) and returns the
  float32 z_i it trained with: the host's float64 calibration to float32 rounding of the solve."""
  cfg = dataclasses.replace(_cfg(), privacy=fc.PrivacyConfig(calibration=calibration))
  exp = simulation.prepare(cfg, fed_data)
  state = simulation.init_state(exp)

  def round_at(costs):
    return simulation.mechanism_round(
      state,
      jax.device_put(fed_data.pool),
      costs.astype(np.float32),
      exp.weights.astype(np.float32),
      exp.overflow.astype(np.float32),
      jax.random.PRNGKey(0),
      apply_fn=exp.apply_fn,
      cfg=cfg,
    )

  new_state, metrics, outcome, z = round_at(exp.costs)
  # float32 in the round, float64 on the host: U_s is flat at its optimum, so R* (and the one interior
  # budget) agree to ~sqrt(float32 eps) while U_s agrees far closer.
  np.testing.assert_allclose(outcome.server_utility, exp.outcome.server_utility, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(outcome.budgets), np.asarray(exp.outcome.budgets), rtol=1e-2)
  assert int(metrics.participants) == int(exp.outcome.participants)
  assert z.dtype == np.float32
  np.testing.assert_array_equal(np.isfinite(z), np.asarray(outcome.budgets) > 0)
  np.testing.assert_allclose(np.asarray(z, np.float64), exp.noise_multipliers, rtol=1e-2)
  np.testing.assert_array_equal(new_state.steps_done, np.where(np.isfinite(z), cfg.federated.local_steps, 0))
  # Dearer privacy, same compiled program: the game it solves moves with its inputs.
  _, _, dearer, dearer_z = round_at(exp.costs * 3.0)
  assert float(dearer.total_payment) != float(outcome.total_payment)
  assert not np.array_equal(np.asarray(dearer_z), np.asarray(z))


def test_trainable_noise_is_the_least_float32_at_or_above_z():
  rng = np.random.default_rng(0)
  z = np.concatenate(
    [
      np.exp(rng.uniform(np.log(1e-3), np.log(1e6), 20_000)),
      rng.uniform(0.05, 5.0, 20_000).astype(np.float32).astype(np.float64),  # already float32
      [0.05, 1.0, 1e5],
    ]
  )
  up = simulation.trainable_noise(z)
  assert up.dtype == np.float32
  assert np.all(up.astype(np.float64) >= z)
  below = np.nextafter(up, np.float32(-np.inf)).astype(np.float64)
  assert np.all(below < z)
  exact = z.astype(np.float32).astype(np.float64) == z
  assert exact[20_000:40_000].all()
  np.testing.assert_array_equal(up[exact], z[exact])  # float32 values are their own rounding
  assert simulation.trainable_noise(np.array([np.inf]))[0] == np.inf
  # Inside a program (float32 z): the identity, as the round trains it.
  traced = jax.jit(lambda a: simulation.trainable_noise(a, jnp))(up)
  np.testing.assert_array_equal(np.asarray(traced), up)


def test_calibrate_maps_each_distinct_input_once_and_scatters_back(monkeypatch):
  """Clients sharing (eps, q, p) share one evaluation of the map; every client gets its own row back."""
  cfg = dataclasses.replace(_cfg(), privacy=fc.PrivacyConfig(calibration="surrogate"))
  sampler = events.sampler_of(cfg.federated, cfg.privacy)
  eps = np.array([1.0, 2.0, 1.0, 1.0, 2.0, 0.5])
  n = np.array([40, 40, 40, 4, 40, 4])  # n = 4 and n = 40 differ in q
  overflow = np.zeros(6)
  seen = []
  program_noise = simulation._program_noise
  monkeypatch.setattr(simulation, "_program_noise", lambda e, *a: seen.append(len(e)) or program_noise(e, *a))
  z = simulation.calibrate(eps, n, overflow, cfg, sampler)
  assert seen == [simulation.CALIBRATION_ROWS]  # 4 distinct (eps, q, p) rows, padded to the least size
  monkeypatch.setattr(simulation, "CALIBRATION_ROWS", 1)
  seen.clear()
  # Without the least size: 4 rows (a power of two), and the padding changes no value.
  np.testing.assert_array_equal(simulation.calibrate(eps, n, overflow, cfg, sampler), z)
  assert seen == [4]
  alone = [simulation.calibrate(eps[[i]], n[[i]], overflow[[i]], cfg, sampler)[0] for i in range(6)]
  np.testing.assert_array_equal(z, alone)
  assert z[0] == z[2] != z[1]


@pytest.mark.parametrize(
  "calibration", ["exact", pytest.param("traced", marks=pytest.mark.slow), "surrogate"]
)
def test_clients_csv_records_the_z_each_round_trained_with(fed_data, tmp_path, monkeypatch, calibration):
  """The z_i handed to every round (captured at federated_round) is, bit for bit, the noise_multiplier
  of the client's clients.csv row, and what its epsilon_spent accounts."""
  cfg = dataclasses.replace(
    _cfg(),
    federated=dataclasses.replace(_cfg().federated, rounds=2),
    privacy=fc.PrivacyConfig(calibration=calibration),
  )
  trained = []
  federated_round = federated.federated_round

  def recording_round(server, pool, noise_multipliers, *args, **kwargs):
    trained.append(np.asarray(noise_multipliers))
    return federated_round(server, pool, noise_multipliers, *args, **kwargs)

  monkeypatch.setattr(federated, "federated_round", recording_round)
  out = simulation.run(cfg, fed_data=fed_data, progress=False)
  path = tmp_path / "clients.csv"
  report.write_csv_atomic(path, out.clients)
  with open(path) as f:
    rows = list(csv.DictReader(f))
  recorded = np.array([float(row["noise_multiplier"]) for row in rows])
  joined = np.isfinite(recorded)
  assert len(trained) == cfg.federated.rounds and 0 < joined.sum() < len(rows)
  for z in trained:
    assert z.dtype == np.float32
    np.testing.assert_array_equal(z.astype(np.float64), recorded[joined])  # participants, in client order
  exp = simulation.prepare(cfg, fed_data)
  steps = np.array([int(row["steps"]) for row in rows])
  np.testing.assert_array_equal(steps, np.where(joined, simulation.total_steps(cfg), 0))
  spent = simulation.privacy_spent(exp, steps)
  np.testing.assert_array_equal(spent, [float(row["epsilon_spent"]) for row in rows])
  assert np.all(spent <= np.asarray(exp.outcome.budgets))


def test_a_checkpoint_of_another_state_layout_is_refused_naming_it(fed_data, tmp_path, monkeypatch):
  cfg = _cfg(tmp_path)
  monkeypatch.setattr(resume, "STATE_LAYOUT_VERSION", resume.STATE_LAYOUT_VERSION - 1)
  simulation.run(cfg, fed_data=fed_data, progress=False, stop_after=1)
  monkeypatch.undo()
  layout = resume.STATE_LAYOUT_VERSION
  refused = rf"holds another run \(state_layout {layout - 1} -> {layout}\)"
  with pytest.raises(validate.ConfigError, match=refused):
    simulation.run(cfg, fed_data=fed_data, progress=False)


def test_an_unmet_budget_sits_out_unless_the_truncation_charge_is_the_cause(caplog):
  """z = inf from the in-program map for eps > 0: a budget that needs more noise than the range (eps =
  0.003, the traced map's inf) sits out with a warning naming it; the truncation charge refuses the run,
  naming that cause; a client too light to matter is skipped silently."""
  cfg = dataclasses.replace(_cfg(), privacy=fc.PrivacyConfig(calibration="traced"))
  sampler = events.sampler_of(cfg.federated, cfg.privacy)
  eps, rates = np.array([1.0, 0.003, 2.0, 1e-30]), np.full(4, 0.3)
  z, light = np.array([1.5, np.inf, 0.9, np.inf]), np.array([False, False, False, True])
  overflow = np.array([0.0, 0.0, 1e-3, 0.0])  # client 2: (1 + e^2) 1e-3 > delta, but it got a finite z
  with caplog.at_level("WARNING", logger=simulation.__name__):
    simulation._check_unmet_budgets(eps, z, light, overflow, rates, cfg, sampler)
  assert "1 client(s) sit out (z = inf)" in caplog.text and "eps[1]=0.003" in caplog.text
  z[2] = np.inf
  with pytest.raises(validate.ConfigError, match=r"eps\[2\]=2.0 cannot be certified .* truncation charge"):
    simulation._check_unmet_budgets(eps, z, light, overflow, rates, cfg, sampler)


def test_non_private_training_beats_chance(fed_data):
  cfg = dataclasses.replace(_cfg(mechanism="no_incentive"), privacy=fc.PrivacyConfig(private=False))
  out = simulation.run(cfg, fed_data=fed_data, progress=False)
  assert out.summary["test_accuracy"] > 0.5  # 10 classes: chance is 0.1


def test_bad_config_names_the_value():
  with pytest.raises(validate.ConfigError, match="rounds=0"):
    fc.FederatedConfig(rounds=0)
  with pytest.raises(validate.ConfigError, match="lam=nan"):
    fc.GameConfig(lam=float("nan"))
  with pytest.raises(validate.ConfigError, match="mechanism='auction'"):
    fc.GameConfig(mechanism="auction")


@pytest.mark.slow  # the whole default run; test_non_private_training_beats_chance stays in CI
def test_default_private_run_learns_well_above_chance():
  """The README's default experiment (Stackelberg, DP-SGD at the equilibrium budgets), cut to 4 rounds."""
  default = fc.SimulationConfig()
  cfg = dataclasses.replace(default, federated=dataclasses.replace(default.federated, rounds=4))
  out = simulation.run(cfg, progress=False)
  assert out.summary["participants"] >= 2
  assert out.summary["test_accuracy"] > 0.3  # 10 digit classes: chance is 0.1


def _recomputed_epsilon(row: dict) -> float:
  """dp-accounting called directly on one clients.csv row, for the sampler that ran (README "Privacy")."""
  n, q, z, steps = row["num_examples"], row["sampling_rate"], row["noise_multiplier"], row["steps"]
  relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
  charge = 0.0
  if row["sampler"] == "fixed":  # replace-one: the clipped sum moves by up to 2C
    step = dp_accounting.SampledWithoutReplacementDpEvent(
      n, min(row["batch_size"], n), dp_accounting.GaussianDpEvent(z / 2)
    )
    relation = dp_accounting.NeighboringRelation.REPLACE_ONE
  elif row["accountant"] == "pld" and row["batch_capacity"] <= n:
    step = dp_accounting.TruncatedSubsampledGaussianDpEvent(n + 1, q, row["batch_capacity"], z)
  else:
    step = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    if row["batch_capacity"] <= n:  # RDP: the truncation's coupling charge is paid from delta
      overflow = -np.expm1(steps * np.log1p(-stats.binom.sf(row["batch_capacity"], n + 1, q)))
      charge = (1 + np.exp(row["epsilon_spent"])) * overflow
  if row["accountant"] == "pld":
    accountant = dp_accounting.pld.PLDAccountant(relation, value_discretization_interval=1e-3)
  else:
    accountant = dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)
  accountant.compose(dp_accounting.SelfComposedDpEvent(step, steps))
  return accountant.get_epsilon(row["delta"] - charge)


@pytest.mark.parametrize(
  "privacy",
  [
    fc.PrivacyConfig(),
    pytest.param(fc.PrivacyConfig(batch_capacity=28), marks=pytest.mark.slow),  # charge up to 40% of delta
    pytest.param(fc.PrivacyConfig(sampling="fixed"), marks=pytest.mark.slow),
    pytest.param(fc.PrivacyConfig(accountant="pld", batch_capacity=12), marks=pytest.mark.slow),
    pytest.param(fc.PrivacyConfig(calibration="traced"), marks=pytest.mark.slow),
  ],
  ids=["poisson", "poisson-truncating", "fixed", "pld-truncating", "traced"],
)
def test_client_rows_let_anyone_recompute_the_privacy_claim(fed_data, privacy):
  """Every participant's row alone, fed to dp-accounting directly for the sampler that ran, gives its
  epsilon_spent, and that is <= its budget (within 1% of it for the exact calibration)."""
  cfg = dataclasses.replace(_cfg(), privacy=privacy)
  out = simulation.run(cfg, fed_data=fed_data, progress=False)
  assert len(out.clients) == len(fed_data.pool.num_examples)
  joined = [row for row in out.clients if np.isfinite(row["noise_multiplier"])]
  assert joined and len(joined) < len(out.clients)
  for row in joined:
    assert row["sampler"] == privacy.sampling and row["steps"] == simulation.total_steps(cfg)
    eps = _recomputed_epsilon(row)
    assert eps == pytest.approx(row["epsilon_spent"], rel=1e-9)
    assert eps <= row["budget_epsilon"]
    assert eps >= row["budget_epsilon"] * (0.99 if privacy.calibration == "exact" else 0.9)
  assert all(row["steps"] == 0 and row["epsilon_spent"] == 0 for row in out.clients if row not in joined)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_mechanism_with_two_participants_collapses_on_the_cli_seeds(seed):
  """Issue 13: the default comparison on CLI seeds 0, 1, 2 (Stackelberg fell to 0.27 on seed 1 and
  three_party to 0.107 on seed 2 under plain FedAvg); noise-aware aggregation keeps every mechanism with
  >= 2 participants at >= 0.4 test accuracy."""
  cfg = fc.SimulationConfig(seed=seed, data=fc.DataConfig(seed=seed))
  summary = simulation.compare(cfg, fc.MECHANISMS, progress=False).summary
  for row in summary:
    assert row["participants"] < 2 or row["test_accuracy"] >= 0.4, row


# ----------------------------------------------------------------------------------------------------------
# Resume safety (issue 12): a checkpoint of another run is refused or moved aside; corrupt steps recover.
# ----------------------------------------------------------------------------------------------------------


def test_resume_with_another_config_is_refused_before_any_work(fed_data, tmp_path):
  """The reproducers: rerun with lam 50 -> 5 reused the lam = 50 models; rounds 2 -> 6 mixed two noise
  calibrations and under-reported the epsilon spent."""
  cfg = _cfg(tmp_path, lam=50.0)
  simulation.run(cfg, fed_data=fed_data, progress=False, stop_after=2)
  steps_before = sorted(os.listdir(cfg.checkpoint_dir))
  for changed, what in [
    (_cfg(tmp_path, lam=5.0), "game.lam 50.0 -> 5.0"),
    (
      dataclasses.replace(cfg, federated=dataclasses.replace(cfg.federated, rounds=6)),
      "federated.rounds 4 -> 6",
    ),
    (dataclasses.replace(cfg, seed=1), "seed 0 -> 1"),
  ]:
    with pytest.raises(validate.ConfigError, match=re.escape(f"holds another run ({what}")) as err:
      simulation.run(changed, fed_data=fed_data, progress=False)
    assert "restart_on_mismatch=True keeps it aside" in str(err.value) and "\n" not in str(err.value)
  assert sorted(os.listdir(cfg.checkpoint_dir)) == steps_before  # nothing trained, nothing saved


def test_restart_on_mismatch_keeps_the_old_checkpoint_and_matches_a_fresh_run(fed_data, tmp_path):
  simulation.run(_cfg(tmp_path, lam=50.0), fed_data=fed_data, progress=False, stop_after=2)
  changed = _cfg(tmp_path, lam=5.0)
  restarted = simulation.run(changed, fed_data=fed_data, progress=False, restart_on_mismatch=True)
  fresh = simulation.run(_cfg(lam=5.0), fed_data=fed_data, progress=False)
  assert restarted.history == fresh.history
  chex.assert_trees_all_equal(restarted.state, fresh.state)
  aside = changed.checkpoint_dir + simulation.OTHER_RUN
  assert sorted(os.listdir(aside)) == ["1", "2"]  # the lam = 50 run, kept for inspection
  resumed = simulation.run(changed, fed_data=fed_data, progress=False)  # now its own checkpoint: resumes
  assert resumed.history == fresh.history


def test_a_flipped_byte_in_the_newest_step_resumes_from_the_last_good_one(fed_data, tmp_path):
  full = simulation.run(_cfg(), fed_data=fed_data, progress=False)
  cfg = _cfg(tmp_path)
  simulation.run(cfg, fed_data=fed_data, progress=False, stop_after=3)
  step3 = os.path.join(cfg.checkpoint_dir, "3")
  files = [
    os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step3, "state")) for f in fs if "/d/" in r + "/"
  ]
  target = max(files, key=os.path.getsize)
  blob = bytearray(pathlib.Path(target).read_bytes())
  blob[len(blob) // 2] ^= 0x01
  pathlib.Path(target).write_bytes(bytes(blob))
  resumed = simulation.run(cfg, fed_data=fed_data, progress=False)  # from step 2, saving 3 and 4 again
  assert resumed.history == full.history
  chex.assert_trees_all_equal(resumed.state, full.state)
  assert sorted(os.listdir(cfg.checkpoint_dir)) == ["2", "3", "3.set-aside", "4"]


def test_a_step_whose_history_disagrees_with_its_round_counter_is_refused(fed_data, tmp_path):
  cfg = _cfg(tmp_path)
  simulation.run(cfg, fed_data=fed_data, progress=False, stop_after=1)
  with checkpoint.Checkpointer(cfg.checkpoint_dir) as ckpt:
    exp = simulation.prepare(cfg, fed_data)
    restored = ckpt.restore(simulation.init_state(exp))
    ckpt.save(2, restored.state, dict(restored.metadata, round=2))  # round counter 1, history 1 row
  with pytest.raises(validate.ConfigError, match=r"checkpoint step 2 is inconsistent: round counter 1"):
    simulation.run(cfg, fed_data=fed_data, progress=False)


def test_the_fingerprint_covers_every_config_field_but_where_files_go(fed_data):
  parts = simulation.run_fingerprint(_cfg(), simulation.data_digest(fed_data))

  def dotted(cls, prefix=""):
    for f in dataclasses.fields(cls):
      sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
      yield from dotted(sub, f"{prefix}{f.name}.") if dataclasses.is_dataclass(sub) else [prefix + f.name]

  assert set(parts) == set(dotted(fc.SimulationConfig())) - {
    "checkpoint_dir",
    "checkpoint_every",
    "data.path",
  } | {"data_digest", "cost_factors", "state_layout"}
  # A field added to any nested config is covered without code: fingerprints are generic over dataclasses.
  Extra = dataclasses.make_dataclass("Extra", [("sampler", str, dataclasses.field(default="poisson"))])
  Outer = dataclasses.make_dataclass("Outer", [("privacy", Extra, dataclasses.field(default_factory=Extra))])
  assert fingerprint.config_fields(Outer()) == {"privacy.sampler": "poisson"}
  assert fingerprint.digest(fingerprint.config_fields(Outer())) != fingerprint.digest(
    fingerprint.config_fields(Outer(Extra("shuffle")))
  )
  other = data.FederatedData(
    fed_data.pool._replace(y=fed_data.pool.y[::-1]), fed_data.test, fed_data.num_classes, fed_data.input_shape
  )
  assert simulation.data_digest(other) != simulation.data_digest(fed_data)


def test_compare_checks_every_checkpoint_before_training_any_mechanism(fed_data, tmp_path):
  cfg = dataclasses.replace(_cfg(), checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=2)
  first = simulation.compare(cfg, ("stackelberg",), progress=False, fed_data=fed_data)
  assert sorted(os.listdir(tmp_path / "ckpt")) == ["social_optimum", "stackelberg"]
  again = simulation.compare(cfg, ("stackelberg",), progress=False, fed_data=fed_data)  # resumes at the end
  assert (
    again.history == first.history and again.summary[0]["test_accuracy"] == first.summary[0]["test_accuracy"]
  )
  changed = dataclasses.replace(cfg, game=dataclasses.replace(cfg.game, lam=5.0))
  with pytest.raises(validate.ConfigError, match=r"stackelberg holds another run \(game.lam 50.0 -> 5.0"):
    simulation.compare(changed, ("posted_price", "stackelberg"), progress=False, fed_data=fed_data)
  assert sorted(os.listdir(tmp_path / "ckpt")) == ["social_optimum", "stackelberg"]  # posted_price never ran
