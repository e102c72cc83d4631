"""Federated round: sampling, round == client loop, chunks, slot blocks, sit-outs, determinism, training."""

from __future__ import annotations

import dataclasses
import functools
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from fcfn_jax import federated, models
from fcfn_jax.config import FederatedConfig, PrivacyConfig
from fcfn_jax.data import ClientPool
from fcfn_jax.privacy import clipping, events
from fcfn_jax.validate import ConfigError

SHAPE = (8, 8, 1)
CLASSES = 3
NUM_EXAMPLES = np.array([12, 5, 0, 3, 12, 8, 1], np.int32)
CLIENTS = len(NUM_EXAMPLES)
LOGREG = models.LogisticRegression(CLASSES)
CNN = models.CNN(CLASSES, features=(2, 4), hidden=8)
FED = FederatedConfig(local_steps=3, batch_size=4, client_lr=0.5)
PRIVATE = PrivacyConfig(clip_norm=0.5)
NON_PRIVATE = PrivacyConfig(private=False)


def _pool(seed: int = 0, capacity: int = 12) -> ClientPool:
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 256, (CLIENTS, capacity, *SHAPE), dtype=np.uint8)
  y = rng.integers(0, CLASSES, (CLIENTS, capacity)).astype(np.int32)
  return ClientPool(x, y, NUM_EXAMPLES)


def _state(model=LOGREG, fed=FED):
  return federated.init_server_state(models.init_params(model, jax.random.key(0), SHAPE), fed)


def _round(state, pool, z, w, key, model=LOGREG, fed=FED, privacy=PRIVATE):
  return federated.federated_round(
    state,
    pool,
    jnp.asarray(z, jnp.float32),
    jnp.asarray(w, jnp.float32),
    key,
    apply_fn=model.apply,
    fed=fed,
    privacy=privacy,
  )


# ----------------------------------------------------------------------------------------------------------
# Sampling.
# ----------------------------------------------------------------------------------------------------------

_sample = jax.jit(federated.sample_client_batches, static_argnames=("steps", "sampler"))


def _drawn_slots(capacity, n, steps, sampler, q=1.0, seed=0):
  """(slot drawn [steps, slots], mask [steps, slots]) read back from pixels: slot s holds pixel value s."""
  slots = np.arange(capacity, dtype=np.uint8)
  x = np.broadcast_to(slots[:, None, None, None], (capacity, 2, 2, 1))
  xs, ys, mask = _sample(
    jax.random.key(seed), x, slots.astype(np.int32) + 100, jnp.int32(n), jnp.float32(q), steps, sampler
  )
  slots = sampler.capacity
  chex.assert_shape([xs, ys, mask], [(steps, slots, 2, 2, 1), (steps, slots), (steps, slots)])
  assert xs.dtype == jnp.float32 and ys.dtype == jnp.int32 and mask.dtype == jnp.bool_
  drawn = np.rint(np.asarray(xs[..., 0, 0, 0]) * 255).astype(int)
  np.testing.assert_array_equal(np.asarray(ys)[np.asarray(mask)], drawn[np.asarray(mask)] + 100)
  return drawn, np.asarray(mask)


@pytest.mark.parametrize("kind", ["fixed", "poisson"])
@pytest.mark.parametrize("capacity,n", [(12, 12), (12, 5), (12, 3), (12, 1), (12, 0), (3, 3), (3, 2)])
def test_sampling_masks_distinct_valid_slots(kind, capacity, n):
  sampler = events.Sampler(kind, 4, 4 if kind == "fixed" else 7)
  drawn, mask = _drawn_slots(capacity, n, 20, sampler, q=0.6)
  if kind == "fixed":
    np.testing.assert_array_equal(mask.sum(axis=1), min(4, n))
  for step in range(20):
    valid = drawn[step][mask[step]]
    assert len(set(valid)) == len(valid), f"duplicate slot in step {step}: {valid}"
    assert np.all(valid < n), f"padding slot drawn in step {step}: {valid}"
    assert np.all(mask[step][: mask[step].sum()]), "joined slots come first"


def test_fixed_sampling_is_uniform_over_valid_slots():
  n, steps = 6, 3000
  drawn, mask = _drawn_slots(10, n, steps, events.Sampler("fixed", 2, 2))
  counts = np.bincount(drawn[mask], minlength=10)
  np.testing.assert_allclose(counts[:n] / (steps * 2), 1 / n, atol=0.02)
  np.testing.assert_array_equal(counts[n:], 0)


def test_poisson_inclusion_frequency_is_q_for_every_example():
  """Each example joins each step independently with probability q: its count over the steps is
  Bin(steps, q), inside the two-sided interval of level 1 - 0.001 / n (so all n are, with prob >= 0.999)."""
  n, steps, q = 20, 4000, 0.3
  drawn, mask = _drawn_slots(24, n, steps, events.Sampler("poisson", 6, 24), q=q)  # no truncation
  counts = np.bincount(drawn[mask], minlength=24)
  low, high = stats.binom.interval(1 - 0.001 / n, steps, q)
  assert np.all((low <= counts[:n]) & (counts[:n] <= high)), (counts[:n], low, high)
  np.testing.assert_array_equal(counts[n:], 0)


def test_poisson_batch_sizes_follow_the_truncated_binomial():
  """Step sizes are min(Bin(n, q), B_max) (chi-square goodness of fit), and a truncated step keeps a
  uniform subset: every example's inclusion rate is E[min(X, B_max)] / n."""
  n, steps, q, cap = 30, 6000, 0.4, 13
  drawn, mask = _drawn_slots(32, n, steps, events.Sampler("poisson", 12, cap), q=q)
  sizes = mask.sum(axis=1)
  pmf = stats.binom.pmf(np.arange(cap + 1), n, q)
  pmf[cap] += stats.binom.sf(cap, n, q)  # the truncated mass piles up at B_max
  observed = np.bincount(sizes, minlength=cap + 1)
  expected = steps * pmf
  keep = expected >= 5  # pool the thin tail cells into one
  f_obs = np.append(observed[keep], observed[~keep].sum())
  f_exp = np.append(expected[keep], expected[~keep].sum())
  assert stats.chisquare(f_obs, f_exp).pvalue > 1e-3
  assert pmf[cap] > 0.2  # truncation does happen in this test
  rate = np.sum(np.arange(cap + 1) * pmf) / n
  counts = np.bincount(drawn[mask], minlength=n)
  low, high = stats.binom.interval(1 - 0.001 / n, steps, rate)
  assert np.all((low <= counts) & (counts <= high)), (counts, low, high, rate)


def test_masked_out_slots_contribute_exactly_nothing():
  """A Poisson step's unjoined and padding slots: NaN or huge pixels there leave the DP gradient, its
  losses and norms bitwise unchanged."""
  sampler = events.Sampler("poisson", 4, 10)
  pool, params = _pool(), _state().params
  xs, ys, mask = _sample(jax.random.key(3), pool.x[0], pool.y[0], jnp.int32(12), jnp.float32(0.3), 5, sampler)
  assert 0 < int(mask.sum()) < mask.size
  fill = jnp.where(jnp.arange(10) % 2 == 0, jnp.nan, 1e6).reshape(1, -1, 1, 1, 1)
  dirty_x = jnp.where(mask[..., None, None, None], xs, fill)
  dirty_y = jnp.where(mask, ys, CLASSES + 7)
  clipped_sum_fn = clipping.make_clipped_sum_fn(LOGREG.apply)

  @jax.jit
  def gradients(x, y):
    def one(x, y, m, key):
      return clipping.dp_gradient(clipped_sum_fn, params, x, y, m, 0.7, key, 0.5, 4.0)

    return jax.vmap(one)(x, y, mask, jax.random.split(jax.random.key(4), 5))

  clean, dirty = gradients(xs, ys), gradients(dirty_x, dirty_y)
  chex.assert_trees_all_equal(clean, dirty)
  chex.assert_tree_all_finite(dirty)


# ----------------------------------------------------------------------------------------------------------
# The round.
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "model,privacy",
  [
    pytest.param(LOGREG, PRIVATE, id="logreg-dp"),
    pytest.param(LOGREG, NON_PRIVATE, id="logreg-nonprivate", marks=pytest.mark.slow),
    pytest.param(CNN, PRIVATE, id="cnn-dp", marks=pytest.mark.slow),  # ~20 s of XLA compile on CPU
  ],
)
def test_round_equals_per_client_loop(model, privacy):
  """Noise off: the vmapped round == client_update per client in Python + manual FedAvg + server SGD."""
  pool, state, key = _pool(), _state(model), jax.random.key(5)
  weights = np.array([1.0, 0.5, 1.0, 0.0, 2.0, 1.0, 1.0], np.float32)
  new_state, metrics = _round(state, pool, np.zeros(CLIENTS), weights, key, model=model, privacy=privacy)

  update = jax.jit(federated.client_update, static_argnames=("apply_fn", "fed", "privacy"))
  round_key = jax.random.fold_in(key, 0)
  results = [
    update(
      state.params,
      pool.x[i],
      pool.y[i],
      pool.num_examples[i],
      0.0,
      jax.random.fold_in(round_key, i),
      apply_fn=model.apply,
      fed=FED,
      privacy=privacy,
    )
    for i in range(CLIENTS)
  ]
  stacked = jax.tree.map(lambda *r: np.stack(r), *results)
  a = weights * NUM_EXAMPLES
  mean_delta = jax.tree.map(lambda d: np.tensordot(a, d, axes=1) / a.sum(), stacked.delta)
  chex.assert_trees_all_close(new_state.params, optax.apply_updates(state.params, mean_delta), atol=1e-5)

  joined = a > 0
  assert int(metrics.participants) == joined.sum()
  np.testing.assert_allclose(metrics.train_loss, stacked.loss[joined].mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics.clip_fraction, stacked.clip_fraction[joined].mean(), rtol=1e-5)
  if privacy.private:
    assert 0 < float(metrics.clip_fraction) <= 1
  assert int(new_state.round) == 1


# 3 does not divide 7 clients (a padded last chunk); 1 (no vmap at all) runs with -m slow
@pytest.mark.parametrize("chunk_size", [pytest.param(1, marks=pytest.mark.slow), 3])
def test_chunked_equals_unchunked(chunk_size):
  """Noise on: per-client keys do not depend on chunking."""
  pool, state, key = _pool(), _state(), jax.random.key(2)
  z, w = np.full(CLIENTS, 0.8), np.ones(CLIENTS)
  whole, whole_metrics = _round(state, pool, z, w, key, fed=dataclasses.replace(FED, chunk_size=CLIENTS))
  chunked, chunked_metrics = _round(
    state,
    pool,
    z,
    w,
    key,
    fed=FederatedConfig(
      local_steps=FED.local_steps, batch_size=FED.batch_size, client_lr=FED.client_lr, chunk_size=chunk_size
    ),
  )
  chex.assert_trees_all_close(whole, chunked, atol=1e-6)
  chex.assert_trees_all_close(whole_metrics, chunked_metrics, atol=1e-6)


def test_a_round_over_rows_of_a_shared_pool_equals_the_round_over_those_clients():
  """rows = a cohort of a bigger pool (a replica's participants): same result as their own pool."""
  pool, state, key = _pool(), _state(), jax.random.key(4)
  rows = np.array([4, 0, 5, 5])  # any order; repeats allowed (each member is its own client)
  z, w = np.array([0.7, 0.9, 0.5, 1.2]), np.array([1.0, 2.0, 1.0, 0.5])
  gathered = ClientPool(*(np.asarray(a)[rows] for a in pool))
  expected, expected_metrics = _round(state, gathered, z, w, key)
  indexed, indexed_metrics = federated.federated_round(
    state,
    pool,
    jnp.asarray(z, jnp.float32),
    jnp.asarray(w, jnp.float32),
    key,
    jnp.asarray(rows, jnp.int32),
    apply_fn=LOGREG.apply,
    fed=FED,
    privacy=PRIVATE,
  )
  chex.assert_trees_all_close(indexed, expected, atol=1e-6)
  chex.assert_trees_all_close(indexed_metrics, expected_metrics, atol=1e-6)
  with pytest.raises(ConfigError, match=r"noise_multipliers has shape \(3,\): expected \[4\]"):
    _round_rows = functools.partial(
      federated.federated_round, apply_fn=LOGREG.apply, fed=FED, privacy=PRIVATE
    )
    _round_rows(state, pool, jnp.ones(3), jnp.ones(4), key, jnp.asarray(rows, jnp.int32))


def test_automatic_chunk_fits_the_budget():
  """chunk_size = 0: floor(budget / (replicas x one client's XLA working memory)), clamped to [1, clients];
  an explicit chunk_size is kept."""
  params = _state(LOGREG).params
  row = jax.ShapeDtypeStruct((12, *SHAPE), jnp.uint8)
  per_client = federated.client_bytes(LOGREG.apply, params, row, FED, PRIVATE)
  bigger = federated.client_bytes(
    LOGREG.apply, params, jax.ShapeDtypeStruct((48, *SHAPE), jnp.uint8), FED, PRIVATE
  )
  assert 0 < per_client < bigger  # the row's sampling scores grow with its capacity
  budget = federated.chunk_budget("cpu")
  assert budget == federated.CPU_CHUNK_BYTES
  for clients, replicas in ((10**6, 1), (10**6, 3), (2, 1)):
    expected = min(max(budget // (per_client * replicas), 1), clients)
    chunk = federated.chunk_clients(FED, PRIVATE, LOGREG.apply, params, row, clients, replicas, "cpu")
    assert chunk == expected
  explicit = dataclasses.replace(FED, chunk_size=5)
  assert federated.chunk_clients(explicit, PRIVATE, LOGREG.apply, params, row, 3) == 3
  assert federated.chunk_clients(explicit, PRIVATE, LOGREG.apply, params, row, 100) == 5


def test_sitting_out_clients_contribute_nothing():
  """Weight 0 (client 1) and z = inf (client 3): replacing their data changes nothing, and no NaN."""
  pool, state, key = _pool(), _state(), jax.random.key(3)
  z = np.array([0.5, 0.5, 0.5, np.inf, 0.5, 0.5, 0.5])
  w = np.array([1, 0, 1, 1, 1, 1, 1])
  reference, metrics = _round(state, pool, z, w, key)
  other = _pool(seed=9)
  x, y = pool.x.copy(), pool.y.copy()
  x[[1, 3]], y[[1, 3]] = other.x[[1, 3]], other.y[[1, 3]]
  changed, _ = _round(state, ClientPool(x, y, NUM_EXAMPLES), z, w, key)
  chex.assert_trees_all_equal(reference.params, changed.params)
  chex.assert_tree_all_finite((reference, metrics))
  assert int(metrics.participants) == 4  # clients 0, 4, 5, 6 (client 2 has no examples)


def test_sit_out_client_update_is_zero_and_finite():
  pool, state = _pool(), _state()
  result = federated.client_update(
    state.params,
    pool.x[0],
    pool.y[0],
    pool.num_examples[0],
    jnp.inf,
    jax.random.key(0),
    apply_fn=LOGREG.apply,
    fed=FED,
    privacy=PRIVATE,
  )
  chex.assert_trees_all_equal(result.delta, jax.tree.map(jnp.zeros_like, state.params))
  chex.assert_tree_all_finite(result)


@pytest.mark.parametrize("dataset_size", [3, 12])  # q n = min(B, n): 3 (q = 1) and B = 4 (q = 1/3)
def test_client_noise_is_independent_per_step_with_std_zc_over_qn(dataset_size):
  """A client holding no examples at public size n has clipped sums 0, so Delta = -lr z C / (q n) sum_s xi_s:
  N(0, S) per coordinate after scaling (std sqrt(S), not S: the steps' noise is independent)."""
  pool, state, z = _pool(), _state(), 1.5
  assert NUM_EXAMPLES[2] == 0

  def scaled_delta(key):
    result = federated.client_update(
      state.params,
      pool.x[2],
      pool.y[2],
      0,
      z,
      key,
      dataset_size,
      apply_fn=LOGREG.apply,
      fed=FED,
      privacy=PRIVATE,
    )
    return jnp.concatenate([d.ravel() for d in jax.tree.leaves(result.delta)])

  draws = np.asarray(jax.jit(jax.vmap(scaled_delta))(jax.random.split(jax.random.key(3), 40)))
  q_n = min(FED.batch_size, dataset_size)
  draws = draws / (-FED.client_lr * z * PRIVATE.clip_norm / q_n)
  # 40 x 195 draws: the sample std has relative standard error ~1 %; allow 5 %.
  np.testing.assert_allclose(draws.std(), np.sqrt(FED.local_steps), rtol=0.05)
  assert abs(draws.mean()) < 0.1


# momentum's state is a subset of adam's: slow (each optimizer is a ~10 s round compile on CI)
@pytest.mark.parametrize("optimizer", ["sgd", pytest.param("momentum", marks=pytest.mark.slow), "adam"])
def test_round_without_participants_keeps_state(optimizer):
  fed = FederatedConfig(local_steps=1, batch_size=4, server_optimizer=optimizer)
  pool, state = _pool(), _state(fed=fed)
  stepped, _ = _round(state, pool, np.full(CLIENTS, 0.5), np.ones(CLIENTS), jax.random.key(0), fed=fed)
  frozen, metrics = _round(
    stepped, pool, np.full(CLIENTS, np.inf), np.ones(CLIENTS), jax.random.key(0), fed=fed
  )
  chex.assert_trees_all_equal((frozen.params, frozen.opt_state), (stepped.params, stepped.opt_state))
  assert int(metrics.participants) == 0 and int(frozen.round) == 2
  chex.assert_tree_all_finite(metrics)


def test_determinism_and_key_dependence():
  pool, state = _pool(), _state()
  z, w = np.full(CLIENTS, 1.0), np.ones(CLIENTS)
  first, _ = _round(state, pool, z, w, jax.random.key(11))
  again, _ = _round(state, pool, z, w, jax.random.key(11))
  other, _ = _round(state, pool, z, w, jax.random.key(12))
  chex.assert_trees_all_equal(first.params, again.params)
  assert not np.allclose(first.params["Dense_0"]["kernel"], other.params["Dense_0"]["kernel"])


def test_rounds_do_not_recompile():
  pool, state = _pool(), _state()
  key = jax.random.key(0)
  state, _ = _round(state, pool, np.full(CLIENTS, 1.0), np.ones(CLIENTS), key)
  compiled = federated.federated_round._cache_size()
  for _ in range(2):  # equal (not identical) configs, new arrays, later rounds
    state, _ = _round(
      state,
      pool,
      np.full(CLIENTS, 2.0),
      np.ones(CLIENTS),
      key,
      fed=FederatedConfig(**vars(FED)),
      privacy=PrivacyConfig(**vars(PRIVATE)),
    )
  assert federated.federated_round._cache_size() == compiled


def test_round_rejects_mismatched_shapes():
  with pytest.raises(ConfigError, match="weights"):
    _round(_state(), _pool(), np.zeros(CLIENTS), np.ones(CLIENTS + 1), jax.random.key(0))


# ----------------------------------------------------------------------------------------------------------
# Blocked slots: a local step computes only the blocks of slots some client of the chunk has joined.
# ----------------------------------------------------------------------------------------------------------

ALL_SLOTS = events.sampler_of(FED, PRIVATE).capacity  # B_max = 27 for B = 4: one block of every slot


def test_blocked_slot_block_is_validated_and_resolved():
  with pytest.raises(ConfigError, match=r"slot_block=-1 is invalid: expected an integer >= 0"):
    FederatedConfig(slot_block=-1)
  with pytest.raises(ConfigError, match=r"slot_block=2.0 is invalid"):
    FederatedConfig(slot_block=2.0)
  poisson, fixed = events.Sampler("poisson", 32, 81), events.Sampler("fixed", 32, 32)
  auto = FederatedConfig(batch_size=32)
  assert federated.slot_block(auto, poisson) == 8  # ceil(B / 4)
  assert federated.slot_block(auto, fixed) == 32  # fixed batches are full: one block
  assert federated.slot_block(dataclasses.replace(auto, slot_block=100), poisson) == 81
  assert federated.slot_block(dataclasses.replace(auto, slot_block=5), fixed) == 5
  assert federated.head_slots(auto, poisson) == 32  # one client: the expected batch, the tail in blocks
  # 32 clients sharing the skips: B + ceil(sqrt(2 B ln 32)) = 32 + 15; never past B_max.
  assert federated.head_slots(auto, poisson, 32) == 47
  assert federated.head_slots(auto, poisson, 2**100) == 81
  assert federated.head_slots(auto, fixed) == 0
  assert federated.head_slots(dataclasses.replace(auto, slot_block=5), poisson) == 0


@pytest.mark.parametrize("batch", [8, 32])
def test_the_head_nearly_always_holds_every_joined_slot_of_the_chunk(batch):
  """head_slots(width) is about the largest joined count of ``width`` clients: for clients of n in
  [B, 8 B] examples (q = B / n), the chunk's largest Poisson count exceeds the head in few draws, and a
  head of B alone (width 1) would be exceeded in most draws of a wide chunk."""
  fed = FederatedConfig(batch_size=batch)
  sampler = events.sampler_of(fed, PRIVATE)
  rng = np.random.default_rng(0)
  for width in (4, 32, 256):
    n = rng.integers(batch, 8 * batch + 1, size=(2000, width))
    largest = rng.binomial(n, batch / n).max(axis=1)
    head = federated.head_slots(fed, sampler, width)
    assert np.mean(largest > head) < 0.15, (width, head)
    assert width < 32 or np.mean(largest > batch) > 0.9, width


def test_a_chunk_of_clients_that_sit_out_runs_nothing():
  """Chunks of 2, each step one call of all its slots: clients 0-1 train, 2-3 sit out (z = inf), 4-5 have
  weight 0, 6 trains. The model runs (a callback in its apply function counts the runs) for 2 of the 4
  chunks, half as often as when every client trains; the round equals the round of clients 0, 1 and 6
  with the others given z = inf, and its update is that of the 3 participants."""
  calls = []

  def counted_apply(*args, **kwargs):
    jax.debug.callback(lambda: calls.append(1))
    return LOGREG.apply(*args, **kwargs)

  model = types.SimpleNamespace(apply=counted_apply)
  pool, state, key = _pool(), _state(), jax.random.key(3)
  z = np.array([0.8, 0.8, np.inf, np.inf, 0.8, 0.8, 0.8])
  w = np.array([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0])
  fed = dataclasses.replace(FED, chunk_size=2, slot_block=ALL_SLOTS)

  def runs(z, w):
    calls.clear()
    out = jax.block_until_ready(_round(state, pool, z, w, key, model=model, fed=fed))
    jax.effects_barrier()
    return out, len(calls)

  got, some = runs(z, w)
  keep = w * np.isfinite(z) > 0
  alone, _ = runs(np.where(keep, z, np.inf), keep.astype(float))
  _, every = runs(np.full(CLIENTS, 0.8), np.ones(CLIENTS))
  chex.assert_trees_all_close(got, alone, atol=1e-6)
  assert int(got[1].participants) == 3
  assert every > 0 and 2 * some == every, (some, every)


def test_blocked_round_equals_all_slots_round():
  """Noise on, logistic regression: blocks of 1 and 5 slots (5 does not divide B_max = 27), in vmapped
  chunks of 3 (a padded last chunk) and unvmapped chunks of 1, give the all-slots round's update and metrics;
  so does the non-private round. Client 2 has no examples (no joined slot at any step) and clients 3
  (z = inf) and 4 (weight 0) sit out."""
  pool, state, key = _pool(), _state(), jax.random.key(6)
  z = np.array([0.8, 0.8, 0.8, np.inf, 0.8, 0.8, 0.8])
  w = np.array([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0])
  private = [(ALL_SLOTS, 3), (1, 3), (5, 3), (5, 1), (0, 3)]  # 0: automatic, a head (7 slots) + blocks
  non_private = [(ALL_SLOTS, 3), (5, 3)]

  def run(settings, privacy):
    return [
      _round(
        state, pool, z, w, key, fed=dataclasses.replace(FED, slot_block=b, chunk_size=c), privacy=privacy
      )
      for b, c in settings
    ]

  rounds = jax.jit(lambda: (run(private, PRIVATE), run(non_private, NON_PRIVATE)))()
  for settings, (reference, *blocked) in zip((private, non_private), rounds):
    assert int(reference[1].participants) == 4
    for (block, chunk), result in zip(settings[1:], blocked):
      chex.assert_trees_all_close(result, reference, atol=1e-6, custom_message=f"{block=} {chunk=}")
  assert 0 < float(rounds[0][0][1].clip_fraction) <= 1


def _chunk_updates(model, fed, dataset_sizes, axis_name="chunk"):
  """client_update of pool clients 0..2 under one vmap named ``axis_name``, noise on, public sizes
  ``dataset_sizes``: client 0 at n = 100 joins each of its 12 examples with q = 0.04 (often none in a step),
  client 2 has no examples."""
  pool = _pool()
  params = models.init_params(model, jax.random.key(0), SHAPE)

  def one(x, y, num, size, key):
    return federated.client_update(
      params, x, y, num, 0.9, key, size, apply_fn=model.apply, fed=fed, privacy=PRIVATE, axis_name=axis_name
    )

  keys = jax.random.split(jax.random.key(8), 3)
  sizes = jnp.asarray(dataset_sizes, jnp.int32)
  return jax.vmap(one, axis_name=axis_name)(pool.x[:3], pool.y[:3], pool.num_examples[:3], sizes, keys)


@pytest.mark.parametrize("block", [pytest.param(1, marks=pytest.mark.slow), 5])  # each a CNN compile
def test_blocked_cnn_client_updates_equal_all_slots(block):
  """The CNN (tapped clipped sum) under a named client vmap: blocks of 1 or 5 slots == all slots."""
  fed = FederatedConfig(local_steps=1, batch_size=4, client_lr=0.5)
  sizes = (100, 12, 1)

  @jax.jit
  def updates():
    return [_chunk_updates(CNN, dataclasses.replace(fed, slot_block=b), sizes) for b in (ALL_SLOTS, block)]

  reference, blocked = updates()
  chex.assert_tree_all_finite(reference)
  chex.assert_trees_all_close(blocked, reference, atol=1e-6)


def test_blocked_skip_stays_a_branch_under_the_named_client_vmap():
  """With the chunk's vmap axis named, the blocks' predicate is the pmax of the joined counts (unbatched):
  the jaxpr keeps a cond and its lowering a stablehlo.case; unnamed, the predicate is batched and the cond
  becomes a select of both branches (no cond left)."""
  fed = dataclasses.replace(FED, slot_block=5)
  named = jax.make_jaxpr(lambda: _chunk_updates(LOGREG, fed, (12, 5, 1)))()
  unnamed = jax.make_jaxpr(lambda: _chunk_updates(LOGREG, fed, (12, 5, 1), axis_name=None))()
  assert "cond[" in str(named) and "pmax" in str(named)
  assert "cond[" not in str(unnamed)
  lowered = jax.jit(lambda: _chunk_updates(LOGREG, fed, (12, 5, 1))).lower().as_text()
  assert "stablehlo.case" in lowered
  pool, state, z, w = _pool(), _state(), np.ones(CLIENTS), np.ones(CLIENTS)
  for chunk in (1, 3):  # the round: its chunk's vmap is named (chunk 3), or there is none (chunk 1)
    chunked = dataclasses.replace(fed, chunk_size=chunk)
    jaxpr = jax.make_jaxpr(lambda f=chunked: _round(state, pool, z, w, jax.random.key(0), fed=f))()
    assert "cond[" in str(jaxpr), chunk


# ----------------------------------------------------------------------------------------------------------
# Evaluation and a tiny training run.
# ----------------------------------------------------------------------------------------------------------


def _separable(key_seed: int, n: int):
  """Class k lights up row band k of an 8x8 image, plus noise: linearly separable."""
  rng = np.random.default_rng(key_seed)
  y = rng.integers(0, CLASSES, n).astype(np.int32)
  x = rng.integers(0, 60, (n, *SHAPE))
  for k in range(CLASSES):
    x[y == k, 2 * k : 2 * k + 2] += 180
  return x.astype(np.uint8), y


def test_evaluate_matches_direct_computation():
  x, y = _separable(0, 23)
  params = _state().params
  accuracy, loss = federated.evaluate(params, x, y, LOGREG.apply, batch_size=5)
  logits = LOGREG.apply({"params": params}, models.normalize_pixels(x))
  np.testing.assert_allclose(accuracy, np.mean(np.argmax(logits, -1) == y), atol=1e-6)
  np.testing.assert_allclose(loss, np.mean(models.cross_entropy(logits, y)), rtol=1e-5)
  with pytest.raises(ConfigError, match="batch_size"):
    federated.evaluate(params, x, y, LOGREG.apply, batch_size=0)


def test_non_private_training_beats_chance():
  clients, capacity = 6, 16
  x, y = _separable(1, clients * capacity)
  pool = ClientPool(
    x.reshape(clients, capacity, *SHAPE), y.reshape(clients, capacity), np.full(clients, capacity, np.int32)
  )
  fed = FederatedConfig(
    local_steps=4, batch_size=8, client_lr=0.5, server_optimizer="momentum", server_lr=0.5
  )
  state = _state(fed=fed)
  key = jax.random.key(0)
  for _ in range(8):
    state, metrics = _round(
      state, pool, np.zeros(clients), np.ones(clients), key, fed=fed, privacy=NON_PRIVATE
    )
  x_test, y_test = _separable(2, 200)
  accuracy, _ = federated.evaluate(state.params, x_test, y_test, LOGREG.apply, batch_size=64)
  assert float(accuracy) > 0.8, f"accuracy {float(accuracy):.3f} (chance 1/3)"
  assert float(metrics.train_loss) < np.log(CLASSES)
