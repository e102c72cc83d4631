"""Automatic chunk sizing: how many clients one vmapped chunk of a round holds (docs/model.md "Scale").

A round runs its clients in chunks under a scan, so memory holds one chunk of deltas at a time. The chunk
is the most clients whose working memory (XLA's temp + output bytes of one :func:`client_update`, times
the replicas side by side) fits the backend's budget: a cache-sized share on CPU, a share of the device's
memory on an accelerator.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp

from fcfn_jax.client import client_update
from fcfn_jax.config import FederatedConfig, PrivacyConfig
from fcfn_jax.models import ApplyFn

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
  sigma sqrt(2 ln c) for c clients (sigma = sqrt(B (1 - q)) <= sqrt(B)), and the step's head covers it
  (``client.head_slots``: B + ceil(sqrt(2 B ln c)) slots), so with B = 32 a step computes about 36 slots per
  client at c = 1, 49 at c = 64 and 54 at c = 1024, while a cap would give up the vectorization that large
  chunks exist for."""
  if fed.chunk_size:
    return min(fed.chunk_size, clients)
  per_client = client_bytes(apply_fn, params, row, fed, privacy) * replicas
  return int(min(max(chunk_budget(backend) // max(per_client, 1), 1), clients))
