"""bench_round.py's 'sampling' table (Poisson sampling at several capacities B_max vs fixed-size batches,
with epsilon) and 'blocks' table (the Poisson round's slot blocks vs all its slots vs fixed-size batches)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from round_cases import Setup, round_case, writer_setup

from fcfn_jax import federated, models
from fcfn_jax.config import FederatedConfig, PrivacyConfig
from fcfn_jax.privacy import events, ledger

from common import Case, measure

FLAGS = flags.FLAGS  # defined in bench_round.py

# ----------------------------------------------------------------------------------------------------------
# Table: Poisson sampling at several capacities vs fixed-size batches.
# ----------------------------------------------------------------------------------------------------------


def sampling_table(repeats: int) -> list[dict[str, Any]]:
  cnn_setup = writer_setup(FLAGS.clients, FLAGS.local_steps, FLAGS.batch_size, FLAGS.chunk_size)
  models_ = (
    ("CNN", models.CNN(cnn_setup.num_classes), cnn_setup),
    (
      "logreg",
      models.LogisticRegression(cnn_setup.num_classes),
      cnn_setup._replace(
        params=models.init_params(
          models.LogisticRegression(cnn_setup.num_classes), jax.random.key(0), cnn_setup.input_shape
        ),
        fed=dataclasses.replace(cnn_setup.fed, chunk_size=FLAGS.logreg_chunk_size),
      ),
    ),
  )
  batch, delta = FLAGS.batch_size, 1e-5
  steps = FLAGS.accounting_rounds * FLAGS.local_steps
  n = int(np.max(np.asarray(cnn_setup.pool.num_examples)))  # the largest writer overflows most
  variants = [("fixed", batch, PrivacyConfig(clip_norm=FLAGS.clip_norm, sampling="fixed"))]
  for capacity in map(int, FLAGS.capacities):
    privacy = PrivacyConfig(clip_norm=FLAGS.clip_norm, batch_capacity=capacity)
    variants.append(("poisson", events.sampler_of(cnn_setup.fed, privacy).capacity, privacy))
  rows = []
  for label, model, setup in models_:
    cases = [
      round_case(f"{label}: {kind}, {slots} slots", setup, model, privacy, fed=setup.fed)
      for kind, slots, privacy in variants
    ]
    measured, _ = measure(cases, repeats)
    fixed_s = {row["case"]: row["median_s"] for row in measured}[f"{label}: fixed, {batch} slots"]
    for row, (kind, slots, privacy) in zip(measured, variants):
      sampler = events.sampler_of(setup.fed, privacy)
      row.update(
        sampler=kind,
        slots=slots,
        slots_over_batch=slots / batch,
        time_over_fixed=row["median_s"] / fixed_s,
        overflow_per_step=float(events.overflow_probability(n, 1, sampler)[0]),
      )
      for accountant in ("rdp", "pld") if kind == "poisson" else ("rdp",):
        eps = ledger.accountant_epsilon(FLAGS.noise_multiplier, n, steps, delta, sampler, accountant)
        row[f"eps_{accountant}"] = eps
    rows += measured
  print(
    f"sampling: {FLAGS.clients} writers x {FLAGS.local_steps} steps, B = {batch}; epsilon of the largest "
    f"writer (n = {n}, q = {min(1, batch / n):.3f}) at z = {FLAGS.noise_multiplier} over "
    f"{steps} steps, delta = {delta} (fixed: replace-one, RDP; inf = the truncation charge exceeds delta)"
  )
  return rows


# ----------------------------------------------------------------------------------------------------------
# Table: the Poisson round's slot blocks vs all slots vs fixed-size batches.
# ----------------------------------------------------------------------------------------------------------


def computed_slots(setup: Setup, fed: FederatedConfig, privacy: PrivacyConfig, chunk: int) -> float:
  """Slots per client-step the round computes at its first round: per chunk and step, the blocks up to the
  chunk's largest joined count (the samples of federated.client_update's keys; the last chunk's padding
  clients join nothing)."""
  sampler = events.sampler_of(fed, privacy)
  block, head = federated.slot_block(fed, sampler), federated.head_slots(fed, sampler, chunk)
  if block >= sampler.capacity or head >= sampler.capacity:  # one call: nothing is skipped
    return float(sampler.capacity)
  round_key = jax.random.fold_in(setup.key, 0)
  pool = setup.pool

  def joined(i):
    size = jnp.maximum(pool.num_examples[i], 1)
    _, masks = federated.sample_client_indices(
      jax.random.split(jax.random.fold_in(round_key, i))[0],
      pool.num_examples[i],
      events.sampling_rates(size, fed.batch_size),
      pool.y.shape[1],
      fed.local_steps,
      sampler,
    )
    return jnp.sum(masks, axis=1)

  clients = pool.y.shape[0]
  counts = np.asarray(jax.jit(jax.vmap(joined))(jnp.arange(clients)))  # [clients, S]
  counts = np.pad(counts, ((0, -clients % chunk), (0, 0))).reshape(-1, chunk, fed.local_steps).max(axis=1)
  tail = np.maximum(counts - head, 0)
  slots = np.minimum(head + -(-tail // block) * block, sampler.capacity)
  return float(slots.mean() * chunk * slots.shape[0] / clients)


def round_only_case(
  name: str, setup: Setup, model: Any, fed: FederatedConfig, privacy: PrivacyConfig
) -> Case:
  """Case of one federated_round without FLOPs (XLA's cost analysis counts neither skipped blocks nor
  loop trips)."""
  round_fn = functools.partial(federated.federated_round, apply_fn=model.apply, fed=fed, privacy=privacy)
  args = (federated.init_server_state(setup.params, fed), setup.pool, setup.z, setup.weights, setup.key)

  def prepare():
    compiled = jax.jit(round_fn).lower(*args).compile()
    return (lambda: jax.block_until_ready(compiled(*args))), None

  return Case(name, prepare)


SAMPLERS = ("fixed", "poisson, all slots", "poisson, blocks")  # the 'blocks' table's 'sampler' column


def blocks_table(repeats: int) -> list[dict[str, Any]]:
  cnn_setup = writer_setup(FLAGS.clients, FLAGS.local_steps, FLAGS.batch_size, FLAGS.chunk_size)
  logreg = models.LogisticRegression(cnn_setup.num_classes)
  models_ = (
    ("CNN", models.CNN(cnn_setup.num_classes), cnn_setup),
    (
      "logreg",
      logreg,
      cnn_setup._replace(params=models.init_params(logreg, jax.random.key(0), cnn_setup.input_shape)),
    ),
  )
  poisson = PrivacyConfig(clip_norm=FLAGS.clip_norm)
  fixed = PrivacyConfig(clip_norm=FLAGS.clip_norm, sampling="fixed")
  capacity = events.sampler_of(cnn_setup.fed, poisson).capacity
  clients = cnn_setup.pool.y.shape[0]
  row_shape = jax.ShapeDtypeStruct(cnn_setup.pool.x.shape[1:], cnn_setup.pool.x.dtype)
  rows = []
  for label, model, setup in models_:
    cases, info = [], []
    for chunk_size in map(int, FLAGS.poisson_chunk_sizes):
      base = dataclasses.replace(setup.fed, chunk_size=chunk_size)
      for kind, fed, privacy in (
        (SAMPLERS[0], base, fixed),
        (SAMPLERS[1], dataclasses.replace(base, slot_block=capacity), poisson),
        (SAMPLERS[2], dataclasses.replace(base, slot_block=FLAGS.slot_block), poisson),
      ):
        chunk = federated.chunk_clients(fed, privacy, model.apply, setup.params, row_shape, clients)
        block = federated.slot_block(fed, events.sampler_of(fed, privacy))
        cases.append(
          round_only_case(
            f"{label}: {kind}, chunk {chunk_size or 'auto'} ({chunk})", setup, model, fed, privacy
          )
        )
        info.append(
          dict(
            model=label,
            chunk_size=chunk_size,
            chunk=chunk,
            sampler=kind,
            slot_block=block,
            slots_per_client_step=computed_slots(setup, fed, privacy, chunk),
          )
        )
    measured, outputs = measure(cases, repeats)
    for row, extra in zip(measured, info):
      row.update(extra)
    row_of = {(row["chunk_size"], row["sampler"]): row for row in measured}
    output = {(row["chunk_size"], row["sampler"]): result for row, result in zip(measured, outputs)}
    for chunk_size in map(int, FLAGS.poisson_chunk_sizes):
      fixed_row, all_row, blocks_row = (row_of[chunk_size, kind] for kind in SAMPLERS)
      blocks_row["blocks_over_all_slots"] = blocks_row["median_s"] / all_row["median_s"]
      blocks_row["blocks_over_fixed"] = blocks_row["median_s"] / fixed_row["median_s"]
      all_row["all_slots_over_fixed"] = all_row["median_s"] / fixed_row["median_s"]
      blocks_row["max_abs_diff_vs_all_slots"] = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(
          jax.tree.leaves(output[chunk_size, SAMPLERS[2]][0].params),
          jax.tree.leaves(output[chunk_size, SAMPLERS[1]][0].params),
        )
      )
    rows += measured
  print(
    f"blocks: {FLAGS.clients} writers x {FLAGS.local_steps} steps, B = {FLAGS.batch_size}, B_max = "
    f"{capacity}; slots_per_client_step: the slots a round computes per client and step (fixed: B; all "
    "slots: B_max; blocks: the chunk's blocks up to its largest joined count, from round 0's samples)"
  )
  return rows
