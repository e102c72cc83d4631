"""Replicas in one program: a replica equals simulation.run of the same config and draw; cohorts, pools,
test sets and layouts."""

from __future__ import annotations

import dataclasses

import chex
import jax
import numpy as np
import pytest

from fcfn_jax import config as fc
from fcfn_jax import data, federated, models, replicas, simulation, validate

MECHANISMS = ("stackelberg", "no_incentive")


def _cfg(seed: int = 0, mechanism: str = "stackelberg", draw: int = 0, **fed) -> fc.SimulationConfig:
  return fc.SimulationConfig(
    data=fc.DataConfig(num_clients=10, capacity=48, test_examples=300, seed=seed),
    federated=fc.FederatedConfig(**{"rounds": 3, "local_steps": 2, "batch_size": 8, **fed}),
    game=fc.GameConfig(mechanism=mechanism),
    seed=seed,
    draw=draw,
  )


@pytest.fixture(scope="module")
def study():
  """2 seeds x 2 mechanisms x 2 draws, trained as replicas (intermediate rounds on 100 test examples)."""
  datasets = {seed: data.load_federated(_cfg(seed).data) for seed in (0, 1)}
  experiments = [
    simulation.prepare(_cfg(seed, mech), datasets[seed]) for seed in (0, 1) for mech in MECHANISMS
  ]
  runs = [replicas.Replica(e, draw) for e in range(len(experiments)) for draw in (0, 1)]
  # One cohort size for all: one program to compile (the automatic grouping is tested below).
  result = replicas.run(experiments, runs, eval_examples=100, cohort_size=10, progress=False)
  return datasets, experiments, runs, result


# k indexes runs: 5 = (seed 1, stackelberg, draw 1); 3 = (seed 0, no_incentive, draw 1), one more round
# compile of ~15 s on CI, runs with -m slow.
@pytest.mark.parametrize("k", [5, pytest.param(3, marks=pytest.mark.slow)])
def test_a_replica_equals_the_single_run_of_its_config_and_draw(study, k):
  datasets, experiments, runs, result = study
  exp, draw = experiments[runs[k].experiment], runs[k].draw
  single = simulation.run(dataclasses.replace(exp.cfg, draw=draw), fed_data=exp.data, progress=False)
  replica = jax.tree.map(lambda a: a[k], result.states)
  chex.assert_trees_all_close(replica.params, single.state.server.params, rtol=2e-4, atol=2e-6)
  assert result.summary[k]["test_accuracy"] == pytest.approx(single.summary["test_accuracy"], abs=2e-3)
  for key in ("mechanism", "participants", "server_utility", "mean_epsilon", "max_epsilon_spent"):
    assert result.summary[k][key] == single.summary[key], key
  assert (result.summary[k]["seed"], result.summary[k]["draw"]) == (exp.cfg.seed, draw)


def test_draws_differ_and_seeds_differ(study):
  _, _, runs, result = study
  acc = {(r["seed"], r["mechanism"], r["draw"]): r["test_accuracy"] for r in result.summary}
  params = jax.tree.leaves(result.states.params)[0]
  assert not np.allclose(params[0], params[1])  # same (seed, mechanism), other draw
  assert len(set(acc.values())) > 1


def test_history_and_client_records(study):
  _, experiments, runs, result = study
  rounds = experiments[0].cfg.federated.rounds
  assert len(result.history) == len(runs) * rounds
  last = [h for h in result.history if h["round"] == rounds]
  assert {h["test_examples"] for h in last} == {300}  # the whole split at the end
  assert {h["test_examples"] for h in result.history if h["round"] < rounds} == {100}
  assert [h["test_accuracy"] for h in last] == [s["test_accuracy"] for s in result.summary]
  clients = experiments[0].data.pool.y.shape[0]
  assert len(result.clients) == len(experiments) * clients  # once per (seed, mechanism), not per draw
  for exp in experiments:
    rows = [
      c for c in result.clients if (c["seed"], c["mechanism"]) == (exp.cfg.seed, exp.cfg.game.mechanism)
    ]
    joined = np.isfinite(exp.noise_multipliers)
    assert [c["steps"] > 0 for c in rows] == joined.tolist()
    assert all(c["epsilon_spent"] <= c["budget_epsilon"] * (1 + 1e-9) for c in rows)
  assert sum(t["replicas"] for t in result.timings) == len(runs)


def test_cohort_pads_with_rows_that_sit_out(study):
  _, experiments, _, _ = study
  exp = experiments[0]
  joined = np.flatnonzero(np.isfinite(exp.noise_multipliers))
  members = replicas.cohort(exp, offset=100, size=len(joined) + 3)
  np.testing.assert_array_equal(members.rows[: len(joined)], 100 + joined)
  assert np.all(np.isinf(members.noise_multipliers[len(joined) :]))
  assert np.all(members.weights[len(joined) :] == 0) and np.all(members.weights[: len(joined)] > 0)
  with pytest.raises(validate.ConfigError, match="size="):
    replicas.cohort(exp, offset=0, size=len(joined) - 1)


def test_cohort_sizes_are_powers_of_two_from_the_floor_capped_at_the_largest():
  assert replicas.MIN_COHORT == 64
  np.testing.assert_array_equal(replicas.cohort_sizes([5, 9, 16, 0, 40]), [40] * 5)  # one program
  np.testing.assert_array_equal(replicas.cohort_sizes([5, 64, 65, 200, 1000]), [64, 64, 128, 256, 1000])
  np.testing.assert_array_equal(replicas.cohort_sizes([0]), [1])
  np.testing.assert_array_equal(replicas.cohort_sizes([5, 9, 16, 0, 40], min_cohort=1), [8, 16, 16, 1, 40])


def test_pools_of_other_capacity_are_refused():
  a = data.ClientPool(np.zeros((2, 4, 3, 3, 1), np.uint8), np.zeros((2, 4), np.int32), np.ones(2, np.int32))
  b = data.ClientPool(np.zeros((3, 5, 3, 3, 1), np.uint8), np.zeros((3, 5), np.int32), np.ones(3, np.int32))
  pool, offsets = replicas.stack_pools([a, a])
  assert pool.x.shape[0] == 4 and offsets.tolist() == [0, 2]
  with pytest.raises(validate.ConfigError, match="DataConfig.capacity"):
    replicas.stack_pools([a, b])


def test_equal_test_splits_are_stored_once():
  rng = np.random.default_rng(0)
  one = data.make_dataset(rng.integers(0, 255, (7, 3, 3, 1), dtype=np.uint8), rng.integers(0, 3, 7), 3)
  copy = data.Dataset(one.x.copy(), one.y.copy(), None, 3)
  other = data.make_dataset(rng.integers(0, 255, (5, 3, 3, 1), dtype=np.uint8), rng.integers(0, 3, 5), 3)
  sets = replicas.test_sets([one, copy, other, one])
  assert (
    sets.x.shape == (2, 7, 3, 3, 1) and sets.count.tolist() == [7, 5] and sets.index.tolist() == [0, 0, 1, 0]
  )


def test_automatic_layout_fills_the_budget(study):
  _, experiments, _, _ = study
  exp = experiments[0]
  state = simulation.init_state(exp).server
  row = jax.ShapeDtypeStruct(exp.data.pool.x.shape[1:], exp.data.pool.x.dtype)
  per_client = federated.client_bytes(exp.apply_fn, state.params, row, exp.cfg.federated, exp.cfg.privacy)
  fit = federated.chunk_budget() // per_client
  chunk, group = replicas.layout(exp, state, cohort_size=4, replicas=1000)
  assert chunk == min(4, fit) and group == max(fit // chunk, 1)
  explicit = exp._replace(cfg=_cfg(chunk_size=2))
  assert replicas.layout(explicit, state, cohort_size=4, replicas=3)[0] == 2


@pytest.mark.parametrize("group", [1, 2])
def test_replicas_side_by_side_keep_the_slot_block_skip_a_branch(group):
  """A round vmapped over replicas names the replica axis too: the blocks' predicate stays unbatched (a
  cond in the jaxpr), whether replicas run side by side (group 2) or one after another (group 1)."""
  rng = np.random.default_rng(0)
  sizes = np.array([12, 5, 9, 1], np.int32)
  pool = data.ClientPool(
    rng.integers(0, 256, (4, 12, 28, 28, 1), dtype=np.uint8),
    rng.integers(0, 10, (4, 12)).astype(np.int32),
    sizes,
  )
  model = models.LogisticRegression(10)
  fed = fc.FederatedConfig(local_steps=2, batch_size=4, chunk_size=2, slot_block=3)
  params = models.init_params(model, jax.random.key(0), (28, 28, 1))
  states = jax.tree.map(lambda a: np.stack([a, a]), federated.init_server_state(params, fed))
  cohorts = replicas.Cohort(
    np.tile(np.arange(4, dtype=np.int32), (2, 1)), np.ones((2, 4), np.float32), np.ones((2, 4), np.float32)
  )
  keys = jax.random.split(jax.random.key(0), 2)
  jaxpr = jax.make_jaxpr(
    lambda: replicas.replica_round(
      states, pool, cohorts, keys, apply_fn=model.apply, fed=fed, privacy=fc.PrivacyConfig(), group=group
    )
  )()
  assert "cond[" in str(jaxpr)
