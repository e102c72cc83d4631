"""The client axis over devices: the mesh, the sharding of per-client arrays, and a pool split over
processes (docs/model.md "Multi-host").

A sharded round (:func:`fcfn_jax.federated.federated_round` with ``mesh=``) splits its clients over
:func:`client_sharding`; clients padded onto the axis to fill it sit out (z = inf, weight 0) and change
no total.
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from fcfn_jax import distributed
from fcfn_jax.data import ClientPool
from fcfn_jax.validate import check_int


def client_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """The sharding of per-client arrays ([clients, ...]) in a round on ``mesh``: the leading axis split
  over all mesh axes. Put the pool on it once: ``jax.device_put(pool, client_sharding(mesh))``."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(tuple(mesh.axis_names)))


def client_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh ``("clients",)`` over every device of every process, grouped by process, so that each
  process's share of the client axis is one contiguous block (:func:`shard_clients`)."""
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  return jax.sharding.Mesh(np.asarray(devices), ("clients",))


def pad_sit_outs(
  noise_multipliers: chex.Array, weights: chex.Array, clients: int, xp=jnp
) -> tuple[chex.Array, chex.Array]:
  """z [n] and weights [n] padded to [clients] with clients that sit out (z = inf, weight 0: they change
  no total). ``xp``: ``jnp`` inside a program, ``np`` on the host."""
  pad = clients - noise_multipliers.shape[0]
  return xp.pad(noise_multipliers, (0, pad), constant_values=np.inf), xp.pad(weights, (0, pad))


def pad_clients(
  pool: ClientPool, noise_multipliers: chex.Array, weights: chex.Array, pad: int, xp=jnp
) -> tuple[ClientPool, chex.Array, chex.Array]:
  """The round's per-client inputs with ``pad`` clients appended that have no examples and sit out."""
  pool = jax.tree.map(lambda a: xp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)), pool)
  return pool, *pad_sit_outs(noise_multipliers, weights, pool.y.shape[0], xp)


def shard_clients(
  mesh: jax.sharding.Mesh, num_clients: int, load: Callable[[slice], ClientPool]
) -> ClientPool:
  """A ClientPool of ``num_clients`` clients as global arrays on :func:`client_sharding` of ``mesh``, which
  may span processes (docs/model.md "Multi-host").

  Each process calls ``load(rows)`` for its own block of clients only (a ClientPool of host arrays
  [rows, ...]; ``rows`` may be empty) and ``jax.make_array_from_process_local_data`` joins the blocks,
  so no process reads another's clients. The client axis is padded to a multiple of ``mesh.size`` with
  clients that have no examples; give the round z and weights padded to match (:func:`pad_sit_outs`),
  so that client i keeps id i and its key in :func:`fcfn_jax.federated.federated_round`.
  """
  check_int("num_clients", num_clients)
  padded = -(-num_clients // mesh.size) * mesh.size

  def load_block(rows: slice) -> ClientPool:
    pool = jax.tree.map(np.asarray, load(slice(min(rows.start, num_clients), min(rows.stop, num_clients))))
    pad = (rows.stop - rows.start) - pool.y.shape[0]
    return jax.tree.map(lambda a: np.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)), pool)

  return distributed.global_rows(client_sharding(mesh), padded, load_block)
