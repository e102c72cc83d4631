"""The round with its client axis sharded over a device mesh equals the single-device round.

tests/conftest.py sets XLA_FLAGS=--xla_force_host_platform_device_count=4 before jax is imported, so
there are 4 CPU devices.
"""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcfn_jax import federated, models
from fcfn_jax.config import FederatedConfig, PrivacyConfig
from fcfn_jax.data import ClientPool

SHAPE = (8, 8, 1)
CLASSES = 3
LOGREG = models.LogisticRegression(CLASSES)
FED = FederatedConfig(local_steps=2, batch_size=4, client_lr=0.5, chunk_size=2)
PRIVATE = PrivacyConfig(clip_norm=0.5)

pytestmark = pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (fake CPU) devices")


def _mesh(axis_type=jax.sharding.AxisType.Explicit):
  return jax.make_mesh((4,), ("clients",), axis_types=(axis_type,))


def _inputs(clients: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  num_examples = rng.integers(0, 13, clients).astype(np.int32)
  pool = ClientPool(
    rng.integers(0, 256, (clients, 12, *SHAPE), dtype=np.uint8),
    rng.integers(0, CLASSES, (clients, 12)).astype(np.int32),
    num_examples,
  )
  z = np.where(np.arange(clients) % 5 == 3, np.inf, 0.7).astype(np.float32)  # some sit out
  w = np.where(np.arange(clients) % 4 == 1, 0.0, 1.0).astype(np.float32)  # some have weight 0
  return pool, jnp.asarray(z), jnp.asarray(w)


def _round(state, pool, z, w, model=LOGREG, mesh=None, fed=FED):
  return federated.federated_round(
    state, pool, z, w, jax.random.key(7), apply_fn=model.apply, fed=fed, privacy=PRIVATE, mesh=mesh
  )


def _state(model=LOGREG):
  return federated.init_server_state(models.init_params(model, jax.random.key(0), SHAPE), FED)


# 11: not a multiple of 4 devices, padded
@pytest.mark.parametrize("clients", [pytest.param(8, marks=pytest.mark.slow), 11])
def test_sharded_round_equals_single_device_round(clients):
  pool, z, w = _inputs(clients)
  state = _state()
  single, single_metrics = _round(state, pool, z, w)
  sharded, sharded_metrics = _round(state, pool, z, w, mesh=_mesh())
  chex.assert_trees_all_close(sharded, single, atol=1e-6)
  chex.assert_trees_all_close(sharded_metrics, single_metrics, atol=1e-6)
  assert int(sharded_metrics.participants) == int(single_metrics.participants) > 0


@pytest.mark.parametrize(
  # an Explicit mesh is what test_sharded_round_equals_single_device_round runs: its presharded variant
  # (another ~20 s compile on CI) is slow
  "axis_type",
  [pytest.param("explicit", marks=pytest.mark.slow), "auto"],
)
def test_presharded_pool_and_auto_axes(axis_type):
  """A pool put on client_sharding once (as a training loop would), on a mesh with Explicit / Auto axes."""
  pool, z, w = _inputs(8, seed=1)
  single, _ = _round(_state(), pool, z, w)
  mesh = _mesh(getattr(jax.sharding.AxisType, axis_type.capitalize()))
  sharding = federated.client_sharding(mesh)
  placed = jax.device_put((pool, z, w), sharding)
  assert placed[0].x.sharding == sharding
  sharded, _ = _round(_state(), *placed, mesh=mesh)
  chex.assert_trees_all_close(sharded, single, atol=1e-6)


def test_shard_clients_builds_the_sharded_pool_from_each_process_block():
  """shard_clients (the multi-process path, here one process of 4 devices): the pool padded with clients
  that sit out gives the round of the unpadded pool."""
  pool, z, w = _inputs(7, seed=2)
  mesh = _mesh()
  asked = []
  sharded = federated.shard_clients(
    mesh, 7, lambda rows: asked.append(rows) or jax.tree.map(lambda a: a[rows], pool)
  )
  assert asked == [slice(0, 7)]  # this process holds every device: its block is all clients
  assert sharded.x.shape[0] == 8 and sharded.x.sharding == federated.client_sharding(mesh)
  np.testing.assert_array_equal(np.asarray(sharded.num_examples), np.append(pool.num_examples, 0))
  z8, w8 = federated.pad_sit_outs(np.asarray(z), np.asarray(w), 8, xp=np)
  assert z8[7] == np.inf and w8[7] == 0
  single, _ = _round(_state(), pool, z, w)
  sharded_state, _ = _round(_state(), sharded, z8, w8, mesh=mesh)
  chex.assert_trees_all_close(sharded_state, single, atol=1e-6)


def test_server_aggregate_is_one_all_reduce():
  pool, z, w = _inputs(8)
  compiled = federated.federated_round.lower(
    _state(), pool, z, w, jax.random.key(7), apply_fn=LOGREG.apply, fed=FED, privacy=PRIVATE, mesh=_mesh()
  ).compile()
  reductions = re.findall(r"=\s*\S+\s+all-reduce(?:-start)?\(", compiled.as_text())
  assert len(reductions) == 1, reductions


@pytest.mark.slow  # two CNN DP-round compilations
def test_sharded_cnn_round_equals_single_device_round():
  model = models.CNN(CLASSES, features=(2, 4), hidden=8)
  pool, z, w = _inputs(6)
  state = _state(model)
  single = _round(state, pool, z, w, model=model)
  sharded = _round(state, pool, z, w, model=model, mesh=_mesh())
  chex.assert_trees_all_close(sharded, single, atol=1e-6)
