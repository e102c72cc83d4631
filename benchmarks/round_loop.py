"""bench_round.py's 'chunks' table (DP and non-private rounds per chunk size) and 'loop' table (vmapped
round vs a Python loop of jitted clients, the loop's dispatch floor, the round's noise draws alone)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from round_cases import CAPACITY, Setup, fixed_batches, round_case, writer_setup

from fcfn_jax import federated, models
from fcfn_jax.config import PrivacyConfig

from common import Case, measure, resampled_pool

FLAGS = flags.FLAGS  # defined in bench_round.py


def chunks_table(repeats: int) -> list[dict[str, Any]]:
  setup = writer_setup(FLAGS.clients, FLAGS.local_steps, FLAGS.batch_size, FLAGS.chunk_size)
  fast = models.CNN(setup.num_classes)
  cases = []
  for chunk in map(int, FLAGS.chunk_sizes):
    fed = dataclasses.replace(setup.fed, chunk_size=chunk)
    for privacy, label in (
      (fixed_batches(), "DP"),
      (fixed_batches(private=False), "non-private"),
    ):
      cases.append(round_case(f"{label} round, chunk {chunk or 'all'}", setup, fast, privacy, fed=fed))
  return measure(cases, repeats)[0]


# ----------------------------------------------------------------------------------------------------------
# Table: vmapped round vs a Python loop over clients.
# ----------------------------------------------------------------------------------------------------------


def loop_case(
  name: str, setup: Setup, model: Any, privacy: PrivacyConfig, subset: int, dispatch_only: bool = False
) -> Case:
  """The round as a Python loop over the first ``subset`` clients: one jitted call per client (its whole
  local update plus accumulation), then one jitted server step; timed per round, scaled to all clients.

  ``dispatch_only``: the same loop and call signature, but each call only adds a_i to the total: the
  loop's floor, what a Python loop costs beyond the clients' own work.
  """
  clients = setup.pool.y.shape[0]
  state = federated.init_server_state(setup.params, setup.fed)
  rows = [tuple(jnp.asarray(a[i]) for a in setup.pool) for i in range(subset)]
  z, w, n = np.asarray(setup.z), np.asarray(setup.weights), np.asarray(setup.pool.num_examples)
  agg = [float(w[i] * n[i]) if np.isfinite(z[i]) else 0.0 for i in range(subset)]

  @jax.jit
  def client(total, params, x, y, num, zi, round_key, i, a):
    if dispatch_only:
      return jax.tree.map(lambda t: t + a, total)
    result = federated.client_update(
      params,
      x,
      y,
      num,
      zi,
      jax.random.fold_in(round_key, i),
      apply_fn=model.apply,
      fed=setup.fed,
      privacy=privacy,
    )
    return jax.tree.map(lambda t, d: t + a * d, total, result.delta)

  optimizer = federated.make_server_optimizer(setup.fed)

  @jax.jit
  def server(state, total, weight):
    updates, opt_state = optimizer.update(
      jax.tree.map(lambda s: -s / weight, total), state.opt_state, state.params
    )
    return federated.ServerState(jax.tree.map(jnp.add, state.params, updates), opt_state, state.round + 1)

  def run():
    round_key = jax.random.fold_in(setup.key, state.round)
    total = jax.tree.map(jnp.zeros_like, state.params)
    for i, (x, y, num) in enumerate(rows):
      total = client(total, state.params, x, y, num, z[i], round_key, i, agg[i])
    return jax.block_until_ready(server(state, total, sum(agg)))

  def prepare():
    run()  # compiles both programs
    return run, None

  label = name if subset == clients else f"{name} ({subset} of {clients} clients, x{clients / subset:g})"
  return Case(label, prepare)


def noise_floor_case(name: str, setup: Setup) -> Case:
  """Only the round's Gaussian noise: per client S draws of N(0, I_P) (P = the model's parameter count),
  in the round's structure (chunks of vmapped clients, a scan over steps). No vmapped DP round can beat it.
  """
  clients, steps = setup.pool.y.shape[0], setup.fed.local_steps
  size = sum(leaf.size for leaf in jax.tree.leaves(setup.params))
  chunk = setup.fed.chunk_size or clients

  def draws(key):
    def one_client(i):
      def step(total, step_key):
        return total + jnp.sum(jax.random.normal(step_key, (size,))), None

      return jax.lax.scan(step, 0.0, jax.random.split(jax.random.fold_in(key, i), steps))[0]

    return jnp.sum(jax.lax.map(one_client, jnp.arange(clients), batch_size=chunk))

  def prepare():
    compiled = jax.jit(draws).lower(setup.key).compile()
    return (lambda: jax.block_until_ready(compiled(setup.key))), None  # FLOPs: no matmuls to count

  return Case(name, prepare)


def loop_table(repeats: int) -> list[dict[str, Any]]:
  rows = []
  cnn_setup = writer_setup(FLAGS.clients, FLAGS.local_steps, FLAGS.batch_size, FLAGS.chunk_size)
  pool, classes = resampled_pool(FLAGS.logreg_clients, CAPACITY)
  logreg = models.LogisticRegression(classes)
  logreg_setup = Setup(
    jax.device_put(pool),
    jnp.full(FLAGS.logreg_clients, FLAGS.noise_multiplier),
    jnp.ones(FLAGS.logreg_clients),
    jax.random.key(1),
    dataclasses.replace(cnn_setup.fed, chunk_size=FLAGS.logreg_chunk_size),
    classes,
    cnn_setup.input_shape,
    models.init_params(logreg, jax.random.key(0), cnn_setup.input_shape),
  )
  privacy = fixed_batches()
  for label, setup, model, subset in (
    (f"CNN, {FLAGS.clients} clients", cnn_setup, models.CNN(cnn_setup.num_classes), FLAGS.clients),
    (
      f"logreg, {FLAGS.logreg_clients} clients",
      logreg_setup,
      logreg,
      min(FLAGS.loop_subset, FLAGS.logreg_clients),
    ),
  ):
    vmapped = round_case(f"{label}: vmapped round", setup, model, privacy)
    loop = loop_case(f"{label}: Python loop", setup, model, privacy, subset)
    dispatch = loop_case(
      f"{label}: Python loop, dispatch only", setup, model, privacy, subset, dispatch_only=True
    )
    noise = noise_floor_case(f"{label}: the round's noise draws alone", setup)
    measured, outputs = measure([vmapped, loop, dispatch, noise], repeats)
    row_of = {row["case"]: row for row in measured}
    output = {row["case"]: result for row, result in zip(measured, outputs)}
    clients = setup.pool.y.shape[0]
    if subset == clients:
      row_of[loop.name]["max_abs_diff_vs_vmapped"] = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(
          jax.tree.leaves(output[vmapped.name][0].params), jax.tree.leaves(output[loop.name].params)
        )
      )
    for case in (loop, dispatch):  # ran `subset` clients: scaled to all
      row = row_of[case.name]
      row["median_s"] *= clients / subset
      row["min_s"] *= clients / subset
      row["extrapolated_from_clients"] = subset
      row["ms_per_client"] = 1e3 * row["median_s"] / clients
    for case in (vmapped, noise):
      row_of[case.name]["ms_per_client"] = 1e3 * row_of[case.name]["median_s"] / clients
    row_of[vmapped.name]["loop_over_vmapped"] = (
      row_of[loop.name]["median_s"] / row_of[vmapped.name]["median_s"]
    )
    rows += measured
  return rows
