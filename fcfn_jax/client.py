"""One client's round: the sampler's batches and S local steps of DP-SGD from the server model.

Client i with n_i examples runs S local steps (docs/model.md "From epsilon_i to noise"), each on a batch
its sampler draws from its own examples (Poisson at rate q_i = min(1, B / n_i) into B_max slots, or B
without replacement), with noise multiplier z_i, and returns Delta_i = theta_i^S - theta. A step's slots
run in blocks (``FederatedConfig.slot_block``): a block no client of the vmapped chunk has joined is
skipped, so a Poisson step costs about the examples it samples rather than its B_max slots.
:mod:`fcfn_jax.federated` vmaps :func:`client_update` into the round.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from fcfn_jax.config import FederatedConfig, PrivacyConfig
from fcfn_jax.models import ApplyFn, LossFn, make_loss_fn, normalize_pixels
from fcfn_jax.privacy import events
from fcfn_jax.privacy.clipping import (
  ClippedSum,
  ClippedSumFn,
  blocked_clipped_sum,
  make_clipped_sum_fn,
  privatize,
)


class ClientResult(NamedTuple):
  """One client's round: model delta, mean train loss, clipped fraction.

  delta: params pytree theta^S - theta. loss: mean over the valid examples of all S steps, each at its
  step's pre-update params. clip_fraction: share of those examples clipped (0 on the non-private path).
  """

  delta: chex.ArrayTree
  loss: chex.Array
  clip_fraction: chex.Array


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
  # argsort: faster on XLA:CPU, benchmarks/README.md "Targets".)
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


def head_slots(fed: FederatedConfig, sampler: events.Sampler, width: int = 1) -> int:
  """Slots of a local step that run in one call before its blocks (0 otherwise): with the automatic block
  size and the 'poisson' sampler, about the largest joined count of the ``width`` clients that share the
  blocks' skips (a vmapped chunk, times the replicas vmapped beside it), B + ceil(sqrt(2 B ln width)), at
  most B_max. A client's joined count has mean B (at most) and variance at most B, and the largest of
  ``width`` such counts is about B + sqrt(2 B ln width); so the tail past it nearly always skips in one
  branch, and its blocks add no work (nor per-block overhead) to a round of many small clients."""
  if fed.slot_block or sampler.kind != "poisson":
    return 0
  spread = math.ceil(math.sqrt(2.0 * sampler.batch_size * math.log(max(width, 1))))
  return min(sampler.batch_size + spread, sampler.capacity)


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
  (epsilon_i = 0): its delta is exactly zero and nothing is NaN; with no examples as well (n = 0) its
  result is all zeros, and when every client of the vmap is such a client nothing runs (one branch).

  The step's slots run as a head of :func:`head_slots` slots, then blocks of :func:`slot_block` slots
  (:func:`fcfn_jax.privacy.clipping.blocked_clipped_sum`): the sampler puts the joined examples first, so
  a block past the step's joined count is skipped. With ``axis_name`` (a vmap over clients named so) the
  count is the largest over that axis, the same for every client of the vmap, so a block is skipped when
  no client needs it and the skip stays a branch; the head grows with the axis size to cover that largest
  count. The sampled examples and the update do not depend on the blocks beyond float rounding.

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
  # stack is transposed to the scan's [S, clients, ...] layout (a full copy: benchmarks/README.md "Targets").
  indices, masks = sample_client_indices(
    sample_key, num_examples, sampling_rate, x.shape[0], fed.local_steps, sampler
  )
  used = jnp.sum(masks, axis=1, dtype=jnp.int32)
  if axis_name is not None:
    used = jax.lax.pmax(used, axis_name)
  skip = ~jnp.isfinite(noise_multiplier)
  noise_multiplier = jnp.where(skip, 0.0, noise_multiplier)
  summed_fn = make_clipped_sum_fn(apply_fn) if privacy.private else _summed_gradient(make_loss_fn(apply_fn))
  width = 1 if axis_name is None else jax.lax.axis_size(axis_name)  # clients sharing the skips
  block, head = slot_block(fed, sampler), head_slots(fed, sampler, width)

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

  def train(_):
    return jax.lax.scan(local_step, params, (indices, masks, used, step_keys))

  def sit_out(_):
    return jax.tree.map(jnp.zeros_like, jax.eval_shape(train, None))

  # A client that sits out with no examples (z = inf, n = 0) has a zero result: when every client of the
  # vmap does (e.g. a chunk of a cohort's padding), nothing runs.
  idle = skip & (jnp.asarray(num_examples) <= 0)
  if axis_name is not None:
    idle = jax.lax.pmin(idle.astype(jnp.int32), axis_name) > 0
  final, (losses, clipped) = jax.lax.cond(idle, sit_out, train, None)
  count = jnp.maximum(jnp.sum(masks), 1)
  return ClientResult(
    delta=jax.tree.map(lambda new, old: jnp.where(skip, 0.0, new - old), final, params),
    loss=jnp.sum(losses) / count,
    clip_fraction=jnp.sum(clipped & masks) / count,
  )
