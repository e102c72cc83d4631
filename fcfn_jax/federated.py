"""Federated training: one client's DP-SGD update (:mod:`fcfn_jax.client`), vmapped once into a FedAvg
round, and evaluation.

A round (docs/model.md "From epsilon_i to noise"): every client i runs S local steps of DP-SGD (or plain SGD
on the non-private path) from the server model theta (:func:`client_update`) and returns
Delta_i = theta_i^S - theta. The server forms the FedAvg pseudo-gradient

  g = -(sum_i a_i Delta_i) / (sum_i a_i),   a_i = weight_i * n_i * [z_i < inf]

and applies its optax optimizer (``FederatedConfig.server_optimizer``). Clients with a_i = 0 sit out:
they contribute exactly nothing, and a chunk of them runs nothing (shapes are fixed; a branch skips it).
Clients run in vmapped chunks sized by :mod:`fcfn_jax.chunking`; with a mesh the client axis is split over
devices (:mod:`fcfn_jax.mesh`).
Keys: client i of round t uses fold_in(fold_in(key, t), i).

The client's update, the chunk sizing and the mesh helpers are re-exported here under their old names
(``federated.client_update``, ``federated.chunk_clients``, ``federated.shard_clients``, ...).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from fcfn_jax.chunking import (  # noqa: F401  (re-exported)
  CPU_CHUNK_BYTES,
  DEVICE_MEMORY_SHARE,
  chunk_budget,
  chunk_clients,
  client_bytes,
)
from fcfn_jax.client import (  # noqa: F401  (re-exported)
  ClientResult,
  client_update,
  head_slots,
  sample_client_batches,
  sample_client_indices,
  slot_block,
)
from fcfn_jax.config import FederatedConfig, PrivacyConfig
from fcfn_jax.data import ClientPool
from fcfn_jax.mesh import (  # noqa: F401  (re-exported)
  client_mesh,
  client_sharding,
  pad_clients,
  pad_sit_outs,
  shard_clients,
)
from fcfn_jax.models import ApplyFn, cross_entropy, normalize_pixels
from fcfn_jax.validate import check_int, require

_SERVER_MOMENTUM = 0.9
# Test examples per batch of :func:`evaluate` in the runs (simulation, replicas: one value for both).
EVAL_BATCH = 512


class ServerState(NamedTuple):
  """The server's model, optimizer state and round counter t (int32 scalar)."""

  params: chex.ArrayTree
  opt_state: optax.OptState
  round: chex.Array


class RoundMetrics(NamedTuple):
  """Means over the round's participants of client train loss and clip fraction; participant count."""

  train_loss: chex.Array
  clip_fraction: chex.Array
  participants: chex.Array


def make_server_optimizer(fed: FederatedConfig) -> optax.GradientTransformation:
  """optax 'sgd' | 'momentum' (heavy ball, beta = 0.9) | 'adam' with learning rate ``fed.server_lr``."""
  if fed.server_optimizer == "adam":
    return optax.adam(fed.server_lr)
  momentum = _SERVER_MOMENTUM if fed.server_optimizer == "momentum" else None
  return optax.sgd(fed.server_lr, momentum=momentum)


def init_server_state(params: chex.ArrayTree, fed: FederatedConfig) -> ServerState:
  """Round 0 with a fresh server optimizer state for ``params``."""
  return ServerState(
    params=params, opt_state=make_server_optimizer(fed).init(params), round=jnp.zeros((), jnp.int32)
  )


def _check_round_inputs(
  pool: ClientPool, noise_multipliers: chex.Array, weights: chex.Array, rows: chex.Array | None
) -> None:
  """Shape checks at trace time: every per-client array has the round's leading [clients] axis (the
  pool's, or that of ``rows`` when the round's clients are rows of a shared pool)."""
  require(
    pool.y.ndim == 2 and pool.x.shape[:2] == pool.y.shape,
    f"pool.x {pool.x.shape} / pool.y {pool.y.shape} are invalid: expected [clients, capacity, H, W, C]"
    " and [clients, capacity]",
  )
  require(
    jnp.shape(pool.num_examples) == pool.y.shape[:1],
    f"pool.num_examples has shape {jnp.shape(pool.num_examples)}: expected [{pool.y.shape[0]}]",
  )
  if rows is not None:
    require(
      jnp.ndim(rows) == 1 and jnp.issubdtype(jnp.result_type(rows), jnp.integer),
      f"rows has shape {jnp.shape(rows)} and dtype {jnp.result_type(rows)}: expected int [clients]",
    )
  clients = pool.y.shape[0] if rows is None else jnp.shape(rows)[0]
  for name, arr in (("noise_multipliers", noise_multipliers), ("weights", weights)):
    require(jnp.shape(arr) == (clients,), f"{name} has shape {jnp.shape(arr)}: expected [{clients}]")


_CHUNK_AXIS = "fcfn_chunk"  # the vmapped client axis of a chunk, for the pmax of the joined counts


class _Totals(NamedTuple):
  """Sums over participants: sum_i a_i Delta_i (params pytree), sum_i a_i, losses, clip fractions, count.

  All float32 (the count is exact below 2^24 clients), so a sharded round reduces them in one all-reduce.
  """

  delta_sum: chex.ArrayTree
  weight_sum: chex.Array
  loss_sum: chex.Array
  clip_sum: chex.Array
  participants: chex.Array


def _client_totals(
  params: chex.ArrayTree,
  pool: ClientPool,
  noise_multipliers: chex.Array,
  weights: chex.Array,
  round_key: chex.PRNGKey,
  first_id: chex.Array,
  rows: chex.Array | None = None,
  *,
  apply_fn: ApplyFn,
  fed: FederatedConfig,
  privacy: PrivacyConfig,
  outer_axes: tuple[str, ...] = (),
) -> _Totals:
  """_Totals of the round's clients (global ids first_id + [0, clients)): the one vmap over clients.

  Client j is pool row ``rows[j]`` (rows: int [clients]), or row j when rows is None: a round over a
  cohort of a shared pool (e.g. one replica of :mod:`fcfn_jax.replicas`) indexes it without a copy.
  Chunks of :func:`chunk_clients` clients run under a scan that accumulates the totals, so memory holds
  one chunk of deltas at a time; the last chunk is filled with weight-0 copies of the last client. A chunk
  is one vmap with its axis named, so each local step's slot blocks run iff some client of the chunk
  joined an example in them.
  """
  clients = noise_multipliers.shape[0]
  row_shape = jax.ShapeDtypeStruct(pool.x.shape[1:], pool.x.dtype)
  chunk = chunk_clients(fed, privacy, apply_fn, params, row_shape, clients)
  num_chunks = -(-clients // chunk)
  num_examples = jnp.asarray(pool.num_examples, jnp.int32)

  def one_client(position, axis_name=None):
    i = jnp.minimum(position, clients - 1)
    row = i if rows is None else rows[i]
    z = noise_multipliers[i]
    real = (position < clients) & jnp.isfinite(z)
    agg_weight = jnp.where(real, weights[i] * num_examples[row], 0.0).astype(jnp.float32)
    # A client that sits out runs with no examples and z = inf: its result is discarded, and a chunk of
    # such clients runs nothing (client_update).
    joins = agg_weight > 0
    result = client_update(
      params,
      pool.x[row],
      pool.y[row],
      jnp.where(joins, num_examples[row], 0),
      jnp.where(joins, z, jnp.inf),
      jax.random.fold_in(round_key, first_id + position),
      apply_fn=apply_fn,
      fed=fed,
      privacy=privacy,
      axis_name=axis_name,
    )
    return result, agg_weight

  def run_chunk(totals, positions):
    # A size-1 vmap makes every matmul a batched one, slower on XLA:CPU (benchmarks/README.md "Targets").
    if chunk == 1:
      results, agg_weights = jax.tree.map(lambda a: a[None], one_client(positions[0], outer_axes or None))
    else:
      one = functools.partial(one_client, axis_name=(_CHUNK_AXIS, *outer_axes))
      results, agg_weights = jax.vmap(one, axis_name=_CHUNK_AXIS)(positions)
    joined = agg_weights > 0
    # where() rather than a bare product: a non-participant's delta must not leak NaN or inf.
    delta_sum = jax.tree.map(
      lambda d: jnp.tensordot(
        agg_weights, jnp.where(joined.reshape((-1,) + (1,) * (d.ndim - 1)), d, 0.0), axes=1
      ),
      results.delta,
    )
    chunk_totals = _Totals(
      delta_sum,
      jnp.sum(agg_weights),
      jnp.sum(jnp.where(joined, results.loss, 0.0)),
      jnp.sum(jnp.where(joined, results.clip_fraction, 0.0)),
      jnp.sum(joined, dtype=jnp.float32),
    )
    return jax.tree.map(jnp.add, totals, chunk_totals), None

  zeros = _Totals(jax.tree.map(jnp.zeros_like, params), *(jnp.zeros(()),) * 4)
  positions = jnp.arange(num_chunks * chunk).reshape(num_chunks, chunk)
  return jax.lax.scan(run_chunk, zeros, positions)[0]


def _sharded_totals(
  params: chex.ArrayTree,
  pool: ClientPool,
  noise_multipliers: chex.Array,
  weights: chex.Array,
  round_key: chex.PRNGKey,
  mesh: jax.sharding.Mesh,
  **static,
) -> _Totals:
  """_Totals with the client axis split over ``mesh``: each device runs :func:`_client_totals` on its
  shard, then ONE psum forms the server aggregate.

  A client count that is not a multiple of mesh.size is padded (inside the program, a copy of the pool)
  with clients that have no examples, z = inf and weight 0.
  """
  axes = tuple(mesh.axis_names)
  pad = -pool.y.shape[0] % mesh.size
  if pad:
    pool, noise_multipliers, weights = pad_clients(pool, noise_multipliers, weights, pad)
  sharding = client_sharding(mesh)
  # Explicit mesh axes (jax.make_mesh's default) need reshard; Auto ones a sharding constraint.
  if all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    pool, noise_multipliers, weights = jax.sharding.reshard((pool, noise_multipliers, weights), sharding)
  else:
    pool, noise_multipliers, weights = jax.lax.with_sharding_constraint(
      (pool, noise_multipliers, weights), sharding
    )

  def shard_totals(params, pool, noise_multipliers, weights, round_key):
    first_id = jax.lax.axis_index(axes) * pool.y.shape[0]
    totals = _client_totals(params, pool, noise_multipliers, weights, round_key, first_id, **static)
    return jax.lax.psum(totals, axes)

  replicated, split = jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec(axes)
  # check_vma=False: the per-device scans start from replicated values (server params, zero totals) and
  # carry per-device ones; the psum above is what makes the output replicated.
  return jax.shard_map(
    shard_totals,
    mesh=mesh,
    in_specs=(replicated, split, split, split, replicated),
    out_specs=replicated,
    check_vma=False,
  )(params, pool, noise_multipliers, weights, round_key)


@functools.partial(jax.jit, static_argnames=("apply_fn", "fed", "privacy", "mesh", "outer_axes"))
def federated_round(
  state: ServerState,
  pool: ClientPool,
  noise_multipliers: chex.Array,
  weights: chex.Array,
  key: chex.PRNGKey,
  rows: chex.Array | None = None,
  *,
  apply_fn: ApplyFn,
  fed: FederatedConfig,
  privacy: PrivacyConfig,
  mesh: jax.sharding.Mesh | None = None,
  outer_axes: tuple[str, ...] = (),
) -> tuple[ServerState, RoundMetrics]:
  """One FedAvg round over all clients of ``pool``, or over its rows ``rows`` (the only vmap over
  clients), jitted once.

  Clients run in chunks of ``fed.chunk_size`` (0 = automatic: :func:`chunk_clients`) under a scan that
  accumulates the weighted delta sum (see :func:`_client_totals`); a local step computes only the slot
  blocks some client of the chunk has joined (:func:`client_update`). With ``mesh``, the client axis is split
  over the mesh's devices and their partial sums meet in one psum. A round with no participant leaves
  params and optimizer state unchanged. The result does not depend on chunking or sharding beyond float
  rounding: client i always uses the key fold_in(fold_in(key, t), i).

  Args:
    state: server state at round t. pool: ClientPool with x uint8 [clients, capacity, H, W, C] (put it on
      the device once, e.g. ``jax.device_put(pool)`` or, with a mesh, ``jax.device_put(pool,
      client_sharding(mesh))``; otherwise every round copies it from the host).
    noise_multipliers: float [clients] z_i (inf = sits out). weights: float [clients] participation
      weights >= 0 (0 = sits out). key: the run's key; round t uses fold_in(key, t).
    rows: int [clients] the pool row of each of the round's clients (a cohort of a shared pool, e.g. a
      replica's participants; padding members have z = inf), or None: client i is pool row i.
    apply_fn, fed, privacy: static (hashable) model apply function and configs.
    mesh: static ``jax.sharding.Mesh`` to split the clients over, or None (one device; needed by rows).
      It may span processes (docs/model.md "Multi-host"): then give the pool as global arrays built by
      :func:`shard_clients` over :func:`client_mesh` (each process loads only its own clients) and z,
      weights padded to match (:func:`pad_sit_outs`); the state comes back replicated in every process.
    outer_axes: static names of vmaps this round runs under (e.g. replicas side by side): a slot block is
      skipped only when no client of any of them joined it, so the skip stays a branch, not a select.

  Returns:
    (state at round t + 1, RoundMetrics).
  """
  _check_round_inputs(pool, noise_multipliers, weights, rows)
  require(rows is None or mesh is None, "rows= is invalid with mesh=: a sharded round splits the pool itself")
  require(not outer_axes or mesh is None, "outer_axes= is invalid with mesh=: a sharded round is not vmapped")
  round_key = jax.random.fold_in(key, state.round)
  static = dict(apply_fn=apply_fn, fed=fed, privacy=privacy)
  if mesh is None:
    totals = _client_totals(
      state.params, pool, noise_multipliers, weights, round_key, 0, rows, outer_axes=outer_axes, **static
    )
  else:
    totals = _sharded_totals(state.params, pool, noise_multipliers, weights, round_key, mesh, **static)

  participants = totals.participants.astype(jnp.int32)
  pseudo_grad = jax.tree.map(
    lambda s: -s / jnp.where(totals.weight_sum > 0, totals.weight_sum, 1.0), totals.delta_sum
  )
  updates, opt_state = make_server_optimizer(fed).update(pseudo_grad, state.opt_state, state.params)
  stepped = (optax.apply_updates(state.params, updates), opt_state)
  params, opt_state = jax.tree.map(
    lambda new, old: jnp.where(participants > 0, new, old), stepped, (state.params, state.opt_state)
  )
  denom = jnp.maximum(participants, 1)
  metrics = RoundMetrics(
    train_loss=totals.loss_sum / denom, clip_fraction=totals.clip_sum / denom, participants=participants
  )
  return ServerState(params=params, opt_state=opt_state, round=state.round + 1), metrics


@functools.partial(jax.jit, static_argnames=("apply_fn", "batch_size"))
def _evaluate(
  params: chex.ArrayTree,
  x: chex.Array,
  y: chex.Array,
  count: chex.Array,
  *,
  apply_fn: ApplyFn,
  batch_size: int,
) -> tuple[chex.Array, chex.Array]:
  num_batches = -(-x.shape[0] // batch_size)
  pad = num_batches * batch_size - x.shape[0]
  xb = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)).reshape(num_batches, batch_size, *x.shape[1:])
  yb = jnp.pad(y, (0, pad)).reshape(num_batches, batch_size)
  mb = (jnp.arange(num_batches * batch_size) < count).reshape(num_batches, batch_size)

  def batch_totals(totals, inputs):
    xs, ys, ms = inputs
    logits = apply_fn({"params": params}, normalize_pixels(xs))
    correct = jnp.sum(ms & (jnp.argmax(logits, axis=-1) == ys))
    loss = jnp.sum(jnp.where(ms, cross_entropy(logits, ys), 0.0))
    return (totals[0] + correct, totals[1] + loss), None

  (correct, loss), _ = jax.lax.scan(batch_totals, (jnp.zeros((), jnp.int32), jnp.zeros(())), (xb, yb, mb))
  return correct / count, loss / count


def evaluate(
  params: chex.ArrayTree,
  x: chex.Array,
  y: chex.Array,
  apply_fn: ApplyFn,
  batch_size: int,
  count: chex.Array | int | None = None,
) -> tuple[chex.Array, chex.Array]:
  """(accuracy, mean cross-entropy) of the model on the first ``count`` examples (default: all n) of
  x uint8 [n, H, W, C], y int32 [n] (the rest is padding, e.g. of test splits stacked to one length).

  Runs under jit in fixed batches of ``batch_size``; the last batch is padded and masked.
  """
  check_int("batch_size", batch_size)
  require(
    x.shape[0] >= 1 and x.shape[0] == y.shape[0],
    f"x {x.shape} / y {y.shape} are invalid: expected [n, H, W, C] and [n] with n >= 1",
  )
  count = x.shape[0] if count is None else count
  return _evaluate(params, x, y, jnp.asarray(count, jnp.int32), apply_fn=apply_fn, batch_size=batch_size)
