"""Federated round: sampling, vmapped round == per-client loop, chunking, sit-outs, determinism, training."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fcfn_jax import federated, models
from fcfn_jax.config import FederatedConfig, PrivacyConfig
from fcfn_jax.data import ClientPool
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

_sample = jax.jit(federated.sample_client_batches, static_argnames=("steps", "batch"))


@pytest.mark.parametrize("capacity,n", [(12, 12), (12, 5), (12, 3), (12, 1), (12, 0), (3, 3), (3, 2)])
def test_sampling_masks_distinct_valid_slots(capacity, n):
  steps, batch = 20, 4
  # Slot s holds pixel value s, so the sampled pixels reveal the sampled slots.
  slots = np.arange(capacity, dtype=np.uint8)
  x = np.broadcast_to(slots[:, None, None, None], (capacity, 2, 2, 1))
  xs, ys, mask = _sample(
    jax.random.key(n), x, slots.astype(np.int32) + 100, jnp.int32(n), steps=steps, batch=batch
  )
  chex.assert_shape([xs, ys, mask], [(steps, batch, 2, 2, 1), (steps, batch), (steps, batch)])
  assert xs.dtype == jnp.float32 and ys.dtype == jnp.int32 and mask.dtype == jnp.bool_
  np.testing.assert_array_equal(mask.sum(axis=1), min(batch, n))
  drawn = np.rint(np.asarray(xs[..., 0, 0, 0]) * 255).astype(int)
  np.testing.assert_array_equal(np.asarray(ys)[np.asarray(mask)], drawn[np.asarray(mask)] + 100)
  for step in range(steps):
    valid = drawn[step][np.asarray(mask[step])]
    assert len(set(valid)) == len(valid), f"duplicate slot in step {step}: {valid}"
    assert np.all(valid < n), f"padding slot drawn in step {step}: {valid}"


def test_sampling_is_uniform_over_valid_slots():
  n, steps, batch = 6, 3000, 2
  x = np.broadcast_to(np.arange(10, dtype=np.uint8)[:, None, None, None], (10, 1, 1, 1))
  xs, _, _ = _sample(jax.random.key(0), x, np.zeros(10, np.int32), jnp.int32(n), steps=steps, batch=batch)
  counts = np.bincount(np.rint(np.asarray(xs).ravel() * 255).astype(int), minlength=10)
  np.testing.assert_allclose(counts[:n] / (steps * batch), 1 / n, atol=0.02)
  np.testing.assert_array_equal(counts[n:], 0)


# ----------------------------------------------------------------------------------------------------------
# The round.
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "model,privacy",
  [
    pytest.param(LOGREG, PRIVATE, id="logreg-dp"),
    pytest.param(LOGREG, NON_PRIVATE, id="logreg-nonprivate"),
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


@pytest.mark.parametrize("chunk_size", [1, 3])  # 1: no vmap; 3 does not divide 7 clients
def test_chunked_equals_unchunked(chunk_size):
  """Noise on: per-client keys do not depend on chunking."""
  pool, state, key = _pool(), _state(), jax.random.key(2)
  z, w = np.full(CLIENTS, 0.8), np.ones(CLIENTS)
  whole, whole_metrics = _round(state, pool, z, w, key)
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


def test_client_noise_is_independent_per_step_with_std_zc():
  """A client with no examples has clipped sums 0, so Delta = -lr z C / B sum_s xi_s: N(0, S) per coordinate
  after scaling (std sqrt(S), not S: the steps' noise is independent)."""
  pool, state, z = _pool(), _state(), 1.5
  assert NUM_EXAMPLES[2] == 0

  def scaled_delta(key):
    result = federated.client_update(
      state.params, pool.x[2], pool.y[2], 0, z, key, apply_fn=LOGREG.apply, fed=FED, privacy=PRIVATE
    )
    return jnp.concatenate([d.ravel() for d in jax.tree.leaves(result.delta)])

  draws = np.asarray(jax.jit(jax.vmap(scaled_delta))(jax.random.split(jax.random.key(3), 40)))
  draws = draws / (-FED.client_lr * z * PRIVATE.clip_norm / FED.batch_size)
  # 40 x 195 draws: the sample std has relative standard error ~1 %; allow 5 %.
  np.testing.assert_allclose(draws.std(), np.sqrt(FED.local_steps), rtol=0.05)
  assert abs(draws.mean()) < 0.1


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
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
