"""Federated training: one client's DP-SGD update, vmapped once into a FedAvg round, and evaluation.

A round (docs/model.md "From epsilon_i to noise"): every client i runs S local steps of DP-SGD (or plain SGD
on the non-private path) from the server model theta, each on a batch its sampler draws from its own n_i
examples (Poisson at rate q_i = min(1, B / n_i) into B_max slots, or B without replacement), noise
multiplier z_i; it returns Delta_i = theta_i^S - theta. The server forms the FedAvg pseudo-gradient

  g = -(sum_i a_i Delta_i) / (sum_i a_i),   a_i = weight_i * n_i * [z_i < inf]

and applies its optax optimizer (``FederatedConfig.server_optimizer``). Clients with a_i = 0 sit out:
they run (shapes are fixed) with no examples and contribute exactly nothing. A local step's slots run in
blocks (``FederatedConfig.slot_block``): a block no client of the vmapped chunk has joined is skipped, so a
Poisson step costs about the examples it samples rather than its B_max slots. Keys: client i of round t
uses fold_in(fold_in(key, t), i).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fcfn_jax import distributed
from fcfn_jax.config import FederatedConfig, PrivacyConfig
from fcfn_jax.data import ClientPool
from fcfn_jax.models import ApplyFn, LossFn, cross_entropy, make_loss_fn, normalize_pixels
from fcfn_jax.privacy import events
from fcfn_jax.privacy.clipping import (
  ClippedSum,
  ClippedSumFn,
  blocked_clipped_sum,
  make_clipped_sum_fn,
  privatize,
)
from fcfn_jax.validate import check_int, require

_SERVER_MOMENTUM = 0.9
# Test examples per batch of :func:`evaluate` in the runs (simulation, replicas: one value for both).
EVAL_BATCH = 512


class ServerState(NamedTuple):
  """The server's model, optimizer state and round counter t (int32 scalar)."""

  params: chex.ArrayTree
  opt_state: optax.OptState
  round: chex.Array


class ClientResult(NamedTuple):
  """One client's round: model delta, mean train loss, clipped fraction.

  delta: params pytree theta^S - theta. loss: mean over the valid examples of all S steps, each at its
  step's pre-update params. clip_fraction: share of those examples clipped (0 on the non-private path).
  """

  delta: chex.ArrayTree
  loss: chex.Array
  clip_fraction: chex.Array


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


def sample_client_indices(
  key: chex.PRNGKey,
  num_examples: chex.Array,
  sampling_rate: chex.Array,
  capacity: int,
  steps: int,
  sampler: events.Sampler,
) -> tuple[chex.Array, chex.Array]:
  """Slots of S batches of ONE client (docs/model.md "From epsilon_i to noise"): index, mask [S, slots].

  'poisson': every valid slot joins a step independently with probability q (u < q for a uniform score u);
  the step holds slots = sampler.capacity (B_max) of them, and an overflowing draw keeps the B_max with the
  smallest scores, a uniform subset (given which examples joined, their scores are i.i.d. U(0, q)).
  'fixed': slots = B, holding min(B, n) distinct valid slots uniform without replacement, then masked
  ones. Either way the joined slots come first and every shape is static.

  Args:
    key: PRNG key of this client and round.
    num_examples: int32 scalar n, the number of valid slots; slots >= n of the client's row are padding.
    sampling_rate: float scalar q in (0, 1] ('poisson'; ignored by 'fixed').
    capacity, steps: static row length and S. sampler: static events.Sampler.

  Returns:
    index int32 [S, slots] into the client's row and mask bool [S, slots].
  """
  slots = sampler.capacity
  valid = jnp.arange(capacity) < jnp.minimum(num_examples, capacity)
  u = jax.random.uniform(key, (steps, capacity))
  joined = valid & (u < sampling_rate) if sampler.kind == "poisson" else valid
  # The smallest scores of the joined slots; the rest score 2 > 1 and come last. (top_k rather than
  # argsort: 3x faster on XLA:CPU.)
  scores = jnp.where(joined, u, 2.0)
  index = jax.lax.top_k(-scores, min(slots, capacity))[1]
  mask = jnp.take_along_axis(scores, index, axis=1) < 2.0
  pad = ((0, 0), (0, slots - index.shape[1]))
  return jnp.pad(index, pad), jnp.pad(mask, pad)


def sample_client_batches(
  key: chex.PRNGKey,
  x: chex.Array,
  y: chex.Array,
  num_examples: chex.Array,
  sampling_rate: chex.Array,
  steps: int,
  sampler: events.Sampler,
) -> tuple[chex.Array, chex.Array, chex.Array]:
  """The examples of :func:`sample_client_indices`: x float32 [S, slots, H, W, C] in [0, 1], y int32
  [S, slots], mask bool [S, slots], from one client's row x uint8 [capacity, H, W, C], y int32 [capacity]."""
  index, mask = sample_client_indices(key, num_examples, sampling_rate, x.shape[0], steps, sampler)
  return normalize_pixels(x[index]), y[index], mask


def slot_block(fed: FederatedConfig, sampler: events.Sampler) -> int:
  """Slots per block of a local step (:func:`fcfn_jax.privacy.clipping.blocked_clipped_sum`), at most the
  step's slots: ``fed.slot_block``, or (0 = automatic) ceil(B / 4) for 'poisson', whose B_max slots hold
  about B joined examples, and all slots for 'fixed', whose batches are full."""
  automatic = -(-sampler.batch_size // 4) if sampler.kind == "poisson" else sampler.capacity
  return min(fed.slot_block or automatic, sampler.capacity)


def head_slots(fed: FederatedConfig, sampler: events.Sampler) -> int:
  """Slots of a local step that always run before its blocks: with the automatic block size and the
  'poisson' sampler, the expected batch B (joined about half the time in full, and nearly always in part),
  so that only the tail past B runs in conditional blocks; 0 otherwise."""
  automatic = not fed.slot_block and sampler.kind == "poisson"
  return min(sampler.batch_size, sampler.capacity) if automatic else 0


def _summed_gradient(loss_fn: LossFn) -> ClippedSumFn:
  """The non-private counterpart of a :data:`ClippedSumFn`: (grad of sum_j m_j loss_j, losses [B] with 0
  at masked slots, norms 0); the clipping bound is ignored."""

  def summed_gradient(params, x, y, mask, clip_norm):
    del clip_norm

    def total_loss(p):
      losses = jnp.where(mask, loss_fn(p, x, y), 0.0)
      return jnp.sum(losses), losses

    grad, losses = jax.grad(total_loss, has_aux=True)(params)
    return ClippedSum(summed=grad, losses=losses, norms=jnp.zeros_like(losses))

  return summed_gradient


def client_update(
  params: chex.ArrayTree,
  x: chex.Array,
  y: chex.Array,
  num_examples: chex.Array,
  noise_multiplier: chex.Numeric,
  key: chex.PRNGKey,
  dataset_size: chex.Array | None = None,
  *,
  apply_fn: ApplyFn,
  fed: FederatedConfig,
  privacy: PrivacyConfig,
  axis_name: str | None = None,
) -> ClientResult:
  """ONE client's round: S local steps theta <- theta - client_lr * g~ from the server model.

  Each step samples with :func:`sample_client_indices` (the sampler of ``privacy``) at q = min(1, B / n);
  g~ is the DP-SGD gradient (:func:`fcfn_jax.privacy.clipping.privatize` of the clipped sum) with
  multiplier z divided by the expected batch size q n = min(B, n), or the plain mean gradient over the
  step's examples when ``privacy.private`` is False (static). z = inf means the client sits out
  (epsilon_i = 0): its delta is exactly zero and nothing is NaN.

  The step's slots run in blocks of :func:`slot_block` slots
  (:func:`fcfn_jax.privacy.clipping.blocked_clipped_sum`): the sampler puts the joined examples first, so
  a block past the step's joined count is skipped. With ``axis_name`` (a vmap over clients named so) the
  count is the largest over that axis, the same for every client of the vmap, so a block is skipped when
  no client needs it and the skip stays a branch. The sampled examples and the update do not depend on the
  blocks beyond float rounding.

  n is the public ``dataset_size`` (default: num_examples): q and the divisor are constants of the
  mechanism, so a neighbouring dataset (one example added or replaced, as in an audit) runs with the
  same ones.

  Args:
    params: server model. x: uint8 [capacity, H, W, C], y: int32 [capacity], num_examples: int32 scalar
      (one row of a ClientPool). noise_multiplier: scalar z. key: this client's key for this round.
    dataset_size: int32 scalar n >= 1, or None (= num_examples).
    apply_fn, fed, privacy: static model apply function and configs.
    axis_name: static name of the vmapped client axis this call runs under, or None.
  """
  x, y = jnp.asarray(x), jnp.asarray(y)
  sampler = events.sampler_of(fed, privacy)
  size = jnp.maximum(jnp.asarray(num_examples if dataset_size is None else dataset_size), 1)
  sampling_rate = events.sampling_rates(size, fed.batch_size)
  expected_batch = jnp.minimum(size, fed.batch_size).astype(jnp.float32)  # q n, exactly
  sample_key, noise_key = jax.random.split(key)
  # Indices up front, examples gathered inside each block: under vmap a pre-gathered [clients, S, B, ...]
  # stack is transposed to the scan's [S, clients, ...] layout (a full copy, 25% of a logreg round).
  indices, masks = sample_client_indices(
    sample_key, num_examples, sampling_rate, x.shape[0], fed.local_steps, sampler
  )
  used = jnp.sum(masks, axis=1, dtype=jnp.int32)
  if axis_name is not None:
    used = jax.lax.pmax(used, axis_name)
  skip = ~jnp.isfinite(noise_multiplier)
  noise_multiplier = jnp.where(skip, 0.0, noise_multiplier)
  summed_fn = make_clipped_sum_fn(apply_fn) if privacy.private else _summed_gradient(make_loss_fn(apply_fn))
  block, head = slot_block(fed, sampler), head_slots(fed, sampler)

  def load(index):
    return normalize_pixels(x[index]), y[index]

  def local_step(p, inputs):
    index, mb, step_used, step_key = inputs
    out = blocked_clipped_sum(summed_fn, p, load, index, mb, privacy.clip_norm, block, step_used, head)
    if privacy.private:
      grad = privatize(out.summed, noise_multiplier, step_key, privacy.clip_norm, expected_batch)
      clipped = out.norms > privacy.clip_norm
    else:
      grad = jax.tree.map(lambda g: g / jnp.maximum(jnp.sum(mb), 1), out.summed)
      clipped = jnp.zeros_like(mb)
    p = jax.tree.map(lambda w, g: w - fed.client_lr * g, p, grad)
    return p, (out.losses, clipped)

  step_keys = jax.random.split(noise_key, fed.local_steps)
  final, (losses, clipped) = jax.lax.scan(local_step, params, (indices, masks, used, step_keys))
  count = jnp.maximum(jnp.sum(masks), 1)
  return ClientResult(
    delta=jax.tree.map(lambda new, old: jnp.where(skip, 0.0, new - old), final, params),
    loss=jnp.sum(losses) / count,
    clip_fraction=jnp.sum(clipped & masks) / count,
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


# Working memory one chunk of clients may take (README "Speed and scale", benchmarks/README.md "chunks").
# On CPU a round is fastest when a chunk's working set stays cache-sized: the best fixed chunks measured
# (the CNN: 1 client, ~16 MiB; logistic regression: ~32 clients) both sit near 16 MiB. On an accelerator
# the chunk is bounded by a share of the device's memory instead (what is left holds the pool and params).
CPU_CHUNK_BYTES = 16 * 2**20
DEVICE_MEMORY_SHARE = 0.25
_DEFAULT_DEVICE_BYTES = 16 * 2**30  # when the backend reports no memory limit


def chunk_budget(backend: str | None = None) -> int:
  """Bytes of working memory one chunk of clients may take on ``backend`` (default: jax's)."""
  backend = backend or jax.default_backend()
  if backend == "cpu":
    return CPU_CHUNK_BYTES
  stats = jax.devices(backend)[0].memory_stats() or {}
  return int(DEVICE_MEMORY_SHARE * stats.get("bytes_limit", _DEFAULT_DEVICE_BYTES))


@functools.cache
def _client_bytes(apply_fn: ApplyFn, params: tuple, row: tuple, fed: FederatedConfig, privacy: PrivacyConfig):
  structs = lambda leaves: [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in leaves]
  treedef, leaves = params
  (capacity, *shape), dtype = row
  update = functools.partial(client_update, apply_fn=apply_fn, fed=fed, privacy=privacy)
  compiled = (
    jax.jit(update)
    .lower(
      jax.tree.unflatten(treedef, structs(leaves)),
      jax.ShapeDtypeStruct((capacity, *shape), dtype),
      jax.ShapeDtypeStruct((capacity,), jnp.int32),
      jax.ShapeDtypeStruct((), jnp.int32),
      jax.ShapeDtypeStruct((), jnp.float32),
      jax.random.key(0),
    )
    .compile()
  )
  memory = compiled.memory_analysis()
  return int(memory.temp_size_in_bytes + memory.output_size_in_bytes)


def client_bytes(
  apply_fn: ApplyFn,
  params: chex.ArrayTree,
  row: jax.ShapeDtypeStruct,
  fed: FederatedConfig,
  privacy: PrivacyConfig,
) -> int:
  """XLA's working memory of ONE client's :func:`client_update` (temp + output buffers), in bytes.

  Compiled once per (model, shapes, configs) from shapes alone (params may be tracers); ``row`` is the
  shape and dtype of one client's x, [capacity, H, W, C].
  """
  leaves, treedef = jax.tree.flatten(params)
  signature = (treedef, tuple((tuple(leaf.shape), jnp.result_type(leaf)) for leaf in leaves))
  fed = dataclasses.replace(fed, chunk_size=1)  # irrelevant to one client; one cache entry per round
  return _client_bytes(apply_fn, signature, (tuple(row.shape), row.dtype), fed, privacy)


def chunk_clients(
  fed: FederatedConfig,
  privacy: PrivacyConfig,
  apply_fn: ApplyFn,
  params: chex.ArrayTree,
  row: jax.ShapeDtypeStruct,
  clients: int,
  replicas: int = 1,
  backend: str | None = None,
) -> int:
  """Clients per vmapped chunk of a round over ``clients`` clients: ``fed.chunk_size`` when it is set,
  else (0 = automatic) the most whose working memory, ``replicas`` rounds side by side, fits the backend's
  budget: clamp(floor(chunk_budget / (replicas x client_bytes)), 1, clients) (docs/model.md "Scale").

  The automatic chunk is not capped for the Poisson sampler's slot blocks, although a block runs when any
  client of the chunk needs it: the chunk's largest joined count exceeds the mean B by only about
  sigma sqrt(2 ln c) for c clients (sigma = sqrt(B (1 - q))), so with B = 32, q = 0.2 and blocks of 8 of
  81 slots a step computes about 36 slots per client at c = 1, 48 at c = 64 and 56 at c = 4096, while a
  cap would give up the vectorization that large chunks exist for."""
  if fed.chunk_size:
    return min(fed.chunk_size, clients)
  per_client = client_bytes(apply_fn, params, row, fed, privacy) * replicas
  return int(min(max(chunk_budget(backend) // max(per_client, 1), 1), clients))


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
    # A client that sits out runs with no examples: its result is discarded, and it needs no slot block.
    result = client_update(
      params,
      pool.x[row],
      pool.y[row],
      jnp.where(agg_weight > 0, num_examples[row], 0),
      z,
      jax.random.fold_in(round_key, first_id + position),
      apply_fn=apply_fn,
      fed=fed,
      privacy=privacy,
      axis_name=axis_name,
    )
    return result, agg_weight

  def run_chunk(totals, positions):
    if chunk == 1:  # A size-1 vmap makes every matmul a batched one, ~20% slower on XLA:CPU.
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
  so that client i keeps id i and its key in :func:`federated_round`.
  """
  check_int("num_clients", num_clients)
  padded = -(-num_clients // mesh.size) * mesh.size

  def load_block(rows: slice) -> ClientPool:
    pool = jax.tree.map(np.asarray, load(slice(min(rows.start, num_clients), min(rows.stop, num_clients))))
    pad = (rows.stop - rows.start) - pool.y.shape[0]
    return jax.tree.map(lambda a: np.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)), pool)

  return distributed.global_rows(client_sharding(mesh), padded, load_block)


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
