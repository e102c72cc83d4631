"""Replicas in one program: the runs of a study (seeds x mechanisms x training-noise draws) trained side by
side, ``jax.vmap`` over replicas around the federated round (docs/model.md "Metrics", "Replicas").

A replica is one run of :func:`fcfn_jax.simulation.run`: a prepared experiment (its seed's clients and
costs, its mechanism's budgets and calibrated noise multipliers: host work done once per (seed, mechanism)
and shared by its draws) and a draw (the rounds' sampling and noise key, ``simulation.training_key``).
Here it is a *cohort* of one shared pool: the pool rows of its participants, padded to the cohort size
with rows of weight 0 and z = inf, their noise multipliers and aggregation weights, and its key. The seeds'
pools are stacked into one pool (they must share the capacity: ``DataConfig.capacity``), so no replica
copies the data; ``federated._client_totals`` (the one vmap over clients) indexes it through the rows.

Replicas are grouped by cohort size (powers of two from ``MIN_COHORT`` up to the largest participant count:
a replica with 70 participants is not padded to the 1,000 of 'no_incentive'); each group is ONE jitted
round, mapped over its replicas: ``lax.map`` over batches of ``group`` replicas, each batch a ``vmap``,
where group x chunk clients fit the backend's working-memory budget (``federated.chunk_clients``). The
replica axis is a plain leading axis of every input: with several processes each trains its own block of
every group and one gather at the end joins the results (:func:`run`; docs/model.md "Multi-host").

A replica equals ``simulation.run`` of the same config (seed, mechanism, draw) to float rounding, whatever
the calibration: same initial model (fold_in of the seed), same per-client keys (fold_in(fold_in(key, t),
position among the participants)), same noise multipliers (``simulation.prepare``'s, float32 values) and
weights; only the order of the float sums differs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import chex
import jax
import numpy as np
import tqdm

from fcfn_jax import data, distributed, federated, simulation
from fcfn_jax.report import Timer
from fcfn_jax.validate import check_int, require


class Replica(NamedTuple):
  """One run: ``experiment`` indexes the prepared experiments (a (seed, mechanism)), ``draw`` its draw."""

  experiment: int
  draw: int


class Cohort(NamedTuple):
  """A replica's clients as rows of the shared pool, padded to the cohort size K.

  rows: int32 [..., K] pool rows (padding repeats a real row); noise_multipliers: float32 [..., K] z_i
  (inf = padding); weights: float32 [..., K] aggregation weights (0 = padding). Leading axes: replicas.
  """

  rows: chex.Array
  noise_multipliers: chex.Array
  weights: chex.Array


class TestSets(NamedTuple):
  """The replicas' test splits stacked to one length: x uint8 [sets, n_max, H, W, C], y int32 [sets, n_max],
  count int32 [sets] (examples >= count are padding); ``index`` int32 [replicas] picks a replica's set."""

  x: np.ndarray
  y: np.ndarray
  count: np.ndarray
  index: np.ndarray


class Runs(NamedTuple):
  """What :func:`run` returns: one summary row per replica (``simulation.summary_row`` plus seed and
  draw; wall_time_s is the replica's share of its group's program in the process that trained it), one
  history row per replica and round, one privacy record per (experiment, client)
  (``simulation.client_rows``, shared by the draws), the final server states stacked [replicas, ...] in
  ``replicas`` order, and the programs' timings."""

  summary: list[dict[str, Any]]
  history: list[dict[str, Any]]
  clients: list[dict[str, Any]]
  states: federated.ServerState
  timings: list[dict[str, Any]]


def stack_pools(pools: Sequence[data.ClientPool]) -> tuple[data.ClientPool, np.ndarray]:
  """One pool holding every pool's clients in turn, and each pool's first row: offsets int64 [pools].

  Raises:
    ConfigError: the pools' rows differ in shape (set one ``DataConfig.capacity`` for every seed).
  """
  shapes = {pool.x.shape[1:] for pool in pools}
  require(
    len(shapes) == 1,
    f"the seeds' client pools have rows of shapes {sorted(shapes)}: expected one shape (set "
    "DataConfig.capacity to the same value for every seed)",
  )
  sizes = np.array([pool.y.shape[0] for pool in pools])
  offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  stacked = data.ClientPool(*(np.concatenate(parts) for parts in zip(*pools)))
  return stacked, offsets


def participants(exp: simulation.Experiment) -> np.ndarray:
  """Rows of ``exp``'s pool that train (z_i < inf), in pool order: int64 [P]."""
  return np.flatnonzero(np.isfinite(exp.noise_multipliers))


def aggregation_weights(exp: simulation.Experiment) -> np.ndarray:
  """The round's per-client weights of ``exp``'s participants, as ``simulation.run`` passes them: a_i / n_i
  (``simulation.round_weights`` of the game's aggregation weights a_i), float32 [P]."""
  rows = participants(exp)
  n = np.asarray(exp.data.pool.num_examples, np.float64)[rows]
  return np.asarray(simulation.round_weights(exp.aggregation_weights[rows], n), np.float32)


def cohort(exp: simulation.Experiment, offset: int, size: int) -> Cohort:
  """``exp``'s participants as rows (offset + pool row) of a stacked pool, padded to ``size``."""
  rows = participants(exp)
  check_int("size", size, minimum=max(len(rows), 1))
  pad = size - len(rows)
  z = np.asarray(exp.noise_multipliers, np.float32)[rows]
  return Cohort(
    rows=np.pad(offset + rows, (0, pad), mode="edge" if len(rows) else "constant").astype(np.int32),
    noise_multipliers=np.pad(z, (0, pad), constant_values=np.inf),
    weights=np.pad(aggregation_weights(exp), (0, pad)),
  )


# Cohorts below this many clients share one size (and so one program): a chunk of padding clients (z = inf,
# no examples) runs nothing (``client.client_update``), and padding inside a chunk of real clients costs
# little next to compiling one more round (seconds).
MIN_COHORT = 64


def cohort_sizes(counts: Sequence[int], min_cohort: int = MIN_COHORT) -> np.ndarray:
  """The cohort size of each participant count: the next power of two, at least ``min_cohort``, capped
  at the largest count (at least 1): few programs to compile, at most 2x padding above ``min_cohort``."""
  check_int("min_cohort", min_cohort)
  counts = np.maximum(np.asarray(counts, np.int64), 1)
  sizes = np.maximum(2 ** np.ceil(np.log2(counts)).astype(np.int64), min_cohort)
  return np.minimum(sizes, counts.max())


def layout(
  exp: simulation.Experiment, state: federated.ServerState, cohort_size: int, replicas: int
) -> tuple[int, int]:
  """(chunk, group): clients per vmapped chunk of a replica's round, and replicas vmapped side by side.

  With ``chunk_size = 0`` (automatic) group x chunk clients fill the backend's working-memory budget
  (``federated.chunk_clients``): chunk = min(K, that many), group = the rest; an explicit chunk_size keeps
  its chunk and groups as many replicas as the budget holds beside it. The group is then evened out over
  the batches it needs (ceil(R / batches)), so padding the replicas to whole batches adds fewer than one
  replica per batch.
  """
  cfg = exp.cfg
  row = jax.ShapeDtypeStruct(exp.data.pool.x.shape[1:], exp.data.pool.x.dtype)
  auto = dataclasses.replace(cfg.federated, chunk_size=0)
  budget = federated.chunk_clients(auto, cfg.privacy, exp.apply_fn, state.params, row, 2**62)
  chunk = min(cfg.federated.chunk_size or budget, cohort_size)
  group = int(min(max(budget // chunk, 1), replicas))
  batches = -(-replicas // group)
  return chunk, -(-replicas // batches)


_REPLICA_AXIS = "fcfn_replica"  # the vmapped replica axis, named so a round's slot-block skips see it


def _map(fn, xs, group: int, replicas: int):
  """fn over the leading (replica) axis of xs, R a multiple of ``group``: one vmap when the group holds
  every replica, a scan of single replicas when group = 1 (no size-1 vmap: batched matmuls are slower on
  XLA:CPU), else a scan over batches of ``group`` vmapped replicas. The vmap's axis is named
  ``_REPLICA_AXIS``."""
  if group >= replicas:
    return jax.vmap(fn, axis_name=_REPLICA_AXIS)(xs)
  if group == 1:
    return jax.lax.map(fn, xs)
  batched = jax.tree.map(lambda a: a.reshape(replicas // group, group, *a.shape[1:]), xs)
  out = jax.lax.map(jax.vmap(fn, axis_name=_REPLICA_AXIS), batched)
  return jax.tree.map(lambda a: a.reshape(replicas, *a.shape[2:]), out)


@functools.partial(jax.jit, static_argnames=("apply_fn", "fed", "privacy", "group"))
def replica_round(
  states: federated.ServerState,
  pool: data.ClientPool,
  cohorts: Cohort,
  keys: chex.Array,
  *,
  apply_fn,
  fed,
  privacy,
  group: int,
) -> tuple[federated.ServerState, federated.RoundMetrics]:
  """One federated round of every replica: ONE jitted program.

  Args:
    states: ServerState with leaves [R, ...]. pool: the shared ClientPool (not batched). cohorts: Cohort
      [R, K]. keys: [R] the replicas' training keys (``simulation.training_key``).
    apply_fn, fed (its chunk_size explicit), privacy: static. group: replicas vmapped side by side.

  Returns:
    (states at t + 1 [R, ...], RoundMetrics [R]).
  """

  def one(args):
    state, members, key = args
    return federated.federated_round(
      state,
      pool,
      members.noise_multipliers,
      members.weights,
      key,
      members.rows,
      apply_fn=apply_fn,
      fed=fed,
      privacy=privacy,
      outer_axes=(_REPLICA_AXIS,) if group > 1 or group >= keys.shape[0] else (),
    )

  return _map(one, (states, cohorts, keys), group, keys.shape[0])


@functools.partial(jax.jit, static_argnames=("apply_fn", "group"))
def replica_accuracy(
  params: chex.ArrayTree, tests: TestSets, *, apply_fn, group: int
) -> tuple[chex.Array, chex.Array]:
  """(accuracy [R], mean cross-entropy [R]) of every replica's model on its test set: ONE jitted program.

  params: leaves [R, ...]; tests: TestSets with index [R].
  """

  def one(args):
    p, i = args
    if tests.x.shape[0] == 1:  # one split for all: never gathered per replica (a copy under vmap)
      return federated.evaluate(p, tests.x[0], tests.y[0], apply_fn, federated.EVAL_BATCH, tests.count[0])
    return federated.evaluate(p, tests.x[i], tests.y[i], apply_fn, federated.EVAL_BATCH, tests.count[i])

  return _map(one, (params, tests.index), group, tests.index.shape[0])


def test_sets(splits: Sequence[data.Dataset], limit: int = 0) -> TestSets:
  """The replicas' test splits (one per replica; equal ones stored once) stacked and padded, each cut to
  a seeded subsample of ``limit`` examples (0 = all)."""
  distinct, index, seen = [], [], {}
  for split in splits:
    if id(split) not in seen:  # replicas of one seed share the split object: compare contents once
      cut = data.subsample(split, limit) if limit else split
      same = (k for k, d in enumerate(distinct) if d.x.shape == cut.x.shape and np.array_equal(d.y, cut.y))
      seen[id(split)] = next((k for k in same if np.array_equal(distinct[k].x, cut.x)), len(distinct))
      if seen[id(split)] == len(distinct):
        distinct.append(cut)
    index.append(seen[id(split)])
  n = max(len(d.y) for d in distinct)
  pad = lambda a: np.pad(a, ((0, n - len(a)),) + ((0, 0),) * (a.ndim - 1))
  return TestSets(
    x=np.stack([pad(d.x) for d in distinct]),
    y=np.stack([pad(d.y) for d in distinct]),
    count=np.array([len(d.y) for d in distinct], np.int32),
    index=np.array(index, np.int32),
  )


def _check_compatible(experiments: Sequence[simulation.Experiment]) -> None:
  """Every experiment trains the same model with the same schedule and privacy settings."""
  first = experiments[0].cfg
  for exp in experiments[1:]:
    for name in ("model", "federated", "privacy"):
      require(
        getattr(exp.cfg, name) == getattr(first, name),
        f"experiments differ in {name} ({getattr(first, name)} vs {getattr(exp.cfg, name)}): replicas of "
        "one program share the model, the schedule and the privacy settings",
      )
    require(
      (exp.data.input_shape, exp.data.num_classes)
      == (experiments[0].data.input_shape, experiments[0].data.num_classes),
      "experiments differ in their data's geometry: replicas of one program share the model's shapes",
    )


def _stack(trees: Sequence[Any]) -> Any:
  """The trees' leaves stacked on the host (numpy: an eager ``jnp.stack`` compiles a program per shape)."""
  return jax.tree.map(lambda *leaves: np.stack([np.asarray(leaf) for leaf in leaves]), *trees)


# A round's record of each replica: history column -> dtype (the dtypes the programs return, kept through
# the gather: a gathered row is the row its process computed, to the bit).
_CURVES = {
  "test_accuracy": np.float32,
  "test_loss": np.float32,
  "test_examples": np.int32,
  "train_loss": np.float32,
  "clip_fraction": np.float32,
  "participants": np.int32,
}
_TIMING = ("padded_replicas", "chunk_size", "group", "wall_time_s")  # a group's figures, per process


def process_replicas(groups: Sequence[np.ndarray], process: int, processes: int) -> np.ndarray:
  """The replicas ``process`` trains: its block (``distributed.process_block``) of each cohort-size group,
  group by group: int64 [n]. Concatenated over processes 0..P-1 they are every replica once: the order of
  the rows that :func:`run` gathers."""
  blocks = [g[distributed.process_block(len(g), process, processes)] for g in groups]
  return np.concatenate(blocks).astype(np.int64)


def _train_group(
  experiments: Sequence[simulation.Experiment],
  replicas: Sequence[Replica],
  block: np.ndarray,
  size: int,
  pool: data.ClientPool,
  first_row: Sequence[int],
  evaluations: dict[str, TestSets],
  desc: str,
  progress: bool,
) -> tuple[dict[str, np.ndarray], federated.ServerState, np.ndarray]:
  """Trains the replicas ``block`` (indices into ``replicas``, one cohort size) as one program per round.

  Returns:
    (curves: column -> [len(block), rounds] (``_CURVES``), final states [len(block), ...], the group's
    timing figures float64 [len(_TIMING)]).
  """
  exp0, cfg0 = experiments[0], experiments[0].cfg
  rounds = cfg0.federated.rounds
  chunk, group = layout(exp0, simulation.init_state(exp0).server, size, len(block))
  fed = dataclasses.replace(cfg0.federated, chunk_size=chunk)
  # Whole batches of ``group``: the last replica is repeated and its copies' results are dropped.
  padded = np.concatenate([block, np.repeat(block[-1], -len(block) % group)])
  mine = [(experiments[replicas[i].experiment], replicas[i]) for i in padded]
  states = _stack([simulation.init_state(exp).server for exp, _ in mine])
  cohorts = _stack([cohort(exp, first_row[r.experiment], size) for exp, r in mine])
  keys = _stack([simulation.training_key(dataclasses.replace(exp.cfg, draw=r.draw)) for exp, r in mine])
  tests = {k: jax.device_put(v._replace(index=v.index[padded])) for k, v in evaluations.items()}
  # Each replica's test examples, on the host (indexing the device copies would compile a program).
  counts = {k: v.count[v.index[padded]] for k, v in evaluations.items()}
  curves: dict[str, list[np.ndarray]] = {name: [] for name in _CURVES}
  bar = tqdm.tqdm(range(rounds), desc=desc, disable=not progress)
  with Timer() as timer:
    for t in bar:
      states, metrics = replica_round(
        states, pool, cohorts, keys, apply_fn=exp0.apply_fn, fed=fed, privacy=cfg0.privacy, group=group
      )
      which = "full" if t == rounds - 1 else "partial"
      accuracy, loss = replica_accuracy(states.params, tests[which], apply_fn=exp0.apply_fn, group=group)
      values = jax.device_get(
        (accuracy, loss, counts[which], metrics.train_loss, metrics.clip_fraction, metrics.participants)
      )
      for name, value in zip(_CURVES, values):
        curves[name].append(value[: len(block)])  # the repeated copies dropped
      bar.set_postfix(acc=f"{float(np.mean(values[0])):.3f}")
  states = jax.tree.map(lambda a: a[: len(block)], states)
  out = {name: np.stack(columns, axis=1).astype(_CURVES[name]) for name, columns in curves.items()}
  return out, states, np.array([len(padded), chunk, group, timer.elapsed], np.float64)


def run(
  experiments: Sequence[simulation.Experiment],
  replicas: Sequence[Replica],
  *,
  eval_examples: int = 0,
  cohort_size: int = 0,
  min_cohort: int = MIN_COHORT,
  progress: bool = True,
  account: bool = True,
) -> Runs:
  """Trains every replica, grouped by cohort size, each group as one jitted program per round.

  With several processes (docs/model.md "Multi-host") each process trains only its block of each group
  (:func:`process_replicas`: contiguous, sizes differing by at most one) with the same keys and cohorts,
  and one gather at the end gives every process all the results, in ``replicas`` order. A single process
  trains them all and gathers nothing.

  Args:
    experiments: prepared experiments (``simulation.prepare``; their noise_multipliers are what trains),
      one per (seed, mechanism); the seeds' pools must share their row shape.
    replicas: (experiment index, draw) pairs.
    eval_examples: test examples of the intermediate rounds' accuracy (a seeded subsample; 0 = the whole
      test split); the last round always uses the whole split.
    cohort_size: 0 = group the replicas by :func:`cohort_sizes` (a few programs, little padding); K > 0 =
      one program, every replica padded to K (at least the largest participant count).
    min_cohort: the smallest automatic cohort size (:func:`cohort_sizes`).
    progress: show a progress bar over rounds.
    account: compute each client's spent epsilon with dp-accounting (``simulation.privacy_spent``: the
      client records and max_epsilon_spent); False skips it (seconds per client at scale): no client
      records, max_epsilon_spent NaN. The budgets sold are certified by the calibration either way.

  Returns:
    Runs (rows in ``replicas`` order; timings: a group's padded replicas summed over processes, its wall
    time the slowest process's, its chunk and group process 0's, and ``processes`` with several).
  """
  require(len(replicas) > 0, "replicas is empty: expected at least one (experiment, draw)")
  check_int("eval_examples", eval_examples, minimum=0)
  _check_compatible(experiments)
  datasets = list(
    {id(exp.data): exp.data for exp in experiments}.values()
  )  # the mechanisms of a seed share it
  pool, offsets = stack_pools([d.pool for d in datasets])
  pool = jax.device_put(pool)  # this process's device: its replicas need no other process
  first_row = [int(offsets[[id(d) for d in datasets].index(id(exp.data))]) for exp in experiments]
  exp0, cfg0 = experiments[0], experiments[0].cfg
  rounds, local_steps = cfg0.federated.rounds, cfg0.federated.local_steps
  counts = [len(participants(experiments[r.experiment])) for r in replicas]
  check_int("cohort_size", cohort_size, minimum=0)
  require(
    cohort_size == 0 or cohort_size >= max(counts),
    f"cohort_size={cohort_size} is invalid: a replica has {max(counts)} participants; expected 0 "
    "(automatic) or at least that many",
  )
  sizes = np.full(len(counts), cohort_size) if cohort_size else cohort_sizes(counts, min_cohort)
  splits = [experiments[r.experiment].data.test for r in replicas]
  evaluations = {"full": test_sets(splits), "partial": test_sets(splits, eval_examples)}
  cohorts = np.unique(sizes)
  groups = [np.flatnonzero(sizes == size) for size in cohorts]
  here, processes = jax.process_index(), jax.process_count()
  # This process's results, group by group; an empty block contributes rows of the right shapes.
  template = simulation.init_state(exp0).server
  curves = [{name: np.zeros((0, rounds), dtype) for name, dtype in _CURVES.items()}]
  states = [jax.tree.map(lambda a: np.zeros((0, *a.shape), a.dtype), template)]
  walls, figures = [np.zeros(0)], np.zeros((len(groups), len(_TIMING)))
  for g, (size, members) in enumerate(zip(cohorts, groups)):
    block = members[distributed.process_block(len(members), here, processes)]
    if not len(block):
      continue
    desc = f"{len(members)} replicas x {size} clients"
    if processes > 1:
      desc = f"{len(block)} of {desc} (process {here})"
    group_curves, group_states, figures[g] = _train_group(
      experiments, replicas, block, int(size), pool, first_row, evaluations, desc, progress
    )
    curves.append(group_curves)
    states.append(jax.device_get(group_states))
    walls.append(np.full(len(block), figures[g, -1] / len(block)))
  local = {
    "curves": {name: np.concatenate([c[name] for c in curves]) for name in _CURVES},
    "states": jax.tree.map(lambda *leaves: np.concatenate(leaves), *states),
    "walls": np.concatenate(walls),
  }
  blocks = [len(process_replicas(groups, p, processes)) for p in range(processes)]
  joined = distributed.gather_blocks(local, blocks)
  figures = distributed.gather_blocks(figures[None], [1] * processes)  # [processes, groups, _TIMING]
  # Row k of ``joined`` is replica order[k]: back to ``replicas`` order.
  order = np.concatenate([process_replicas(groups, p, processes) for p in range(processes)])
  joined = jax.tree.map(lambda a: a[np.argsort(order)], joined)
  timings = []
  for g, (size, members) in enumerate(zip(cohorts, groups)):
    chunk, group = figures[0, g, 1:3]
    timings.append(
      {
        "replicas": len(members),
        "padded_replicas": int(figures[:, g, 0].sum()),
        "cohort_size": int(size),
        "chunk_size": int(chunk),
        "group": int(group),
        "rounds": rounds,
        "wall_time_s": float(figures[:, g, -1].max()),
        **({"processes": processes} if processes > 1 else {}),
      }
    )
  clients, spent = [], {}
  for e in sorted({r.experiment for r in replicas}):  # once per (seed, mechanism): the draws share it
    exp = experiments[e]
    if not account:
      spent[e] = np.full(exp.costs.shape, np.nan)
      continue
    steps_done = np.where(np.isfinite(exp.noise_multipliers), rounds * local_steps, 0)
    spent[e] = simulation.privacy_spent(exp, steps_done)
    clients += [{"seed": exp.cfg.seed, **row} for row in simulation.client_rows(exp, steps_done, spent[e])]
  summary, history = [], []
  for i, r in enumerate(replicas):
    exp = experiments[r.experiment]
    for t in range(rounds):
      row = {name: joined["curves"][name][i, t].item() for name in _CURVES}
      history.append(
        {"mechanism": exp.cfg.game.mechanism, "seed": exp.cfg.seed, "draw": r.draw, "round": t + 1}
      )
      history[-1].update(row)
    row = simulation.summary_row(
      exp, history[-1]["test_accuracy"], float(joined["walls"][i]), spent[r.experiment]
    )
    summary.append({"mechanism": row.pop("mechanism"), "seed": exp.cfg.seed, "draw": r.draw, **row})
  return Runs(
    summary=summary,
    history=history,
    clients=clients,
    states=jax.device_put(joined["states"]),  # no program (jnp.asarray compiles one per shape)
    timings=timings,
  )
