"""The cases that tests/multiprocess_program.py runs across processes and tests/test_multihost.py runs in
one process to compare: a DP round, a game sweep, a short simulation, a study's replicas and the blocks
of a host-side split, each built the same way in both."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from fcfn_jax import config as fc
from fcfn_jax import distributed, federated, models, replicas, simulation, study
from fcfn_jax.data import ClientPool
from fcfn_jax.game import sweep

SHAPE = (8, 8, 1)
CLASSES = 3
FED = fc.FederatedConfig(local_steps=1, batch_size=4, client_lr=0.5, chunk_size=2)
PRIVATE = fc.PrivacyConfig(clip_norm=0.5)
ROUND_KEY = 7


def model(name: str):
  return models.LogisticRegression(CLASSES) if name == "logreg" else models.CNN(CLASSES, (2, 4), 8)


def round_inputs(clients: int) -> tuple[ClientPool, np.ndarray, np.ndarray]:
  """Host arrays: a pool of ``clients`` clients (some with no examples), z (some sit out), weights."""
  rng = np.random.default_rng(0)
  pool = ClientPool(
    rng.integers(0, 256, (clients, 12, *SHAPE), dtype=np.uint8),
    rng.integers(0, CLASSES, (clients, 12)).astype(np.int32),
    rng.integers(0, 13, clients).astype(np.int32),
  )
  z = np.where(np.arange(clients) % 5 == 3, np.inf, 0.7).astype(np.float32)
  w = np.where(np.arange(clients) % 4 == 1, 0.0, 1.0).astype(np.float32)
  return pool, z, w


def run_rounds(name: str, clients: int, rounds: int, mesh: jax.sharding.Mesh | None = None, on_load=None):
  """``rounds`` DP rounds from a seeded model: (final ServerState, [RoundMetrics]). With ``mesh`` each
  process loads only its block of clients (``federated.shard_clients``; ``on_load(rows)`` sees it)."""
  net = model(name)
  pool, z, w = round_inputs(clients)
  if mesh is not None:

    def load(rows):
      if on_load is not None:
        on_load(rows)
      return jax.tree.map(lambda a: a[rows], pool)

    pool = federated.shard_clients(mesh, clients, load)
    z, w = federated.pad_sit_outs(z, w, pool.y.shape[0], xp=np)
  state = federated.init_server_state(models.init_params(net, jax.random.key(0), SHAPE), FED)
  history = []
  for _ in range(rounds):
    state, metrics = federated.federated_round(
      state, pool, z, w, jax.random.key(ROUND_KEY), apply_fn=net.apply, fed=FED, privacy=PRIVATE, mesh=mesh
    )
    history.append(metrics)
  return state, history


SWEEP_SETTINGS = sweep.SweepSettings(
  num_clients=6, mechanisms=("stackelberg", "posted_price", "social_optimum")
)
SWEEP_CHUNK = 4  # games per vmapped chunk on each device


def sweep_configs() -> sweep.SweepConfigs:
  return sweep.make_grid(range(3), [0.5, 2.0], [(0.1, 1.0), (0.5, 2.0)])


def run_sweep(mesh: jax.sharding.Mesh | None = None) -> dict[str, sweep.SweepMetrics]:
  """The sweep with ``SWEEP_CHUNK`` games per device and chunk, on ``mesh`` or one device."""
  devices = 1 if mesh is None else mesh.size
  return sweep.run_sweep(jax.random.key(1), sweep_configs(), SWEEP_SETTINGS, SWEEP_CHUNK * devices, mesh)


def simulation_config(checkpoint_dir: str | None = None, calibration: str = "exact") -> fc.SimulationConfig:
  """A short experiment (7 clients: an odd count, padded on a 2-device mesh)."""
  return fc.SimulationConfig(
    data=fc.DataConfig(num_clients=7, capacity=32, test_examples=100),
    model=fc.ModelConfig(name="logreg"),
    federated=fc.FederatedConfig(rounds=3, local_steps=2, batch_size=8, client_lr=0.5),
    privacy=dataclasses.replace(fc.PrivacyConfig(), calibration=calibration),
    checkpoint_dir=checkpoint_dir,
    checkpoint_every=1 if checkpoint_dir else 0,
  )


REPLICA_SETTING = study.Setting(
  "replicas",
  fc.SimulationConfig(
    data=fc.DataConfig(num_clients=6, capacity=32, test_examples=100),
    model=fc.ModelConfig(name="logreg"),
    federated=fc.FederatedConfig(rounds=2, local_steps=1, batch_size=8, client_lr=0.5),
    privacy=fc.PrivacyConfig(calibration="traced"),
  ),
  seeds=2,
  draws=2,
  mechanisms=("stackelberg", "social_optimum"),
)


def run_replicas() -> replicas.Runs:
  """The study's replicas of ``REPLICA_SETTING`` (2 seeds x 2 mechanisms x 2 draws of logistic regression
  on the embedded digits, 2 rounds), prepared as ``study.run_setting`` prepares them, and a ninth replica:
  the social optimum of a 2-client game, alone in its cohort-size group (2 participants), so that over 2
  processes the 9 replicas split unevenly (5 + 4) and process 1's block of that group is empty."""
  setting = REPLICA_SETTING
  datasets = study.load_seeds(setting)
  capacity = study.capacity_of(datasets)
  experiments = [
    simulation.prepare(setting.config(seed, mechanism, capacity), datasets[seed])
    for seed in range(setting.seeds)
    for mechanism in setting.mechanisms
  ]
  runs = [replicas.Replica(e, d) for e in range(len(experiments)) for d in range(setting.draws)]
  pair = setting.config(0, "social_optimum", capacity)
  experiments.append(
    simulation.prepare(dataclasses.replace(pair, data=dataclasses.replace(pair.data, num_clients=2)))
  )
  runs.append(replicas.Replica(len(experiments) - 1, 0))
  # min_cohort=1: cohort sizes 2, 4 and 8, three groups (the default floor would make them one).
  return replicas.run(experiments, runs, eval_examples=50, min_cohort=1, progress=False, account=False)


BLOCK_ITEMS = 5  # split unevenly over 2 processes: 3 + 2


def gather_block_rows() -> dict[str, np.ndarray]:
  """This process's block of ``BLOCK_ITEMS`` items (ids int64, a float64 and an int32 column) joined with
  every other process's (``distributed.gather_blocks``): the whole table, in item order, in every process."""
  ids = np.arange(BLOCK_ITEMS, dtype=np.int64)[distributed.process_block(BLOCK_ITEMS)]
  block = {"id": ids, "value": ids / 3.0, "pair": np.stack([ids, -ids], axis=1).astype(np.int32)}
  counts = [
    len(range(BLOCK_ITEMS)[distributed.process_block(BLOCK_ITEMS, p)]) for p in range(jax.process_count())
  ]
  return distributed.gather_blocks(block, counts)
