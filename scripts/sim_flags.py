"""absl flags shared by the experiment scripts: every SimulationConfig field, and the config they build.

A bad value ends the program with exit status 2 and one line naming the flag, the value and what is
allowed (no traceback): unparsable flags through :func:`parse_flags` (run scripts with
``app.run(main, flags_parser=sim_flags.parse_flags)``), bad configs through :func:`config_or_exit`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TypeVar

from absl import flags

from fcfn_jax import config as fc
from fcfn_jax import validate

_T = TypeVar("_T")
FLAGS = flags.FLAGS
# Flag defaults are the configs' own defaults, so the CLI and the library agree.
_DATA, _MODEL, _PRIVACY = fc.DataConfig(), fc.ModelConfig(), fc.PrivacyConfig()
_FED, _GAME, _SIM = fc.FederatedConfig(), fc.GameConfig(), fc.SimulationConfig()

# Data.
flags.DEFINE_enum(
  "dataset",
  _DATA.dataset,
  list(fc.DATASETS),
  "femnist: EMNIST by writer; emnist: tfds EMNIST (no writers); cifar10: CIFAR-10.",
)
flags.DEFINE_enum(
  "source",
  _DATA.source,
  list(fc.SOURCES),
  "embedded: the FEMNIST-digits copy inside the package (offline); npz: --data_path is a "
  ".npz file (or, for cifar10, a folder with cifar10_train_batch1.npz and cifar10_test.npz); "
  "tfds: --data_path is a tfds data_dir with the dataset prepared as array_record.",
)
flags.DEFINE_string("data_path", None, "The .npz file / folder (source=npz) or tfds data_dir (source=tfds).")
flags.DEFINE_enum(
  "partition",
  _DATA.partition,
  list(fc.PARTITIONS),
  "writer: one client per writer; dirichlet: label skew Dir(--dirichlet_alpha); iid.",
)
flags.DEFINE_float(
  "dirichlet_alpha", _DATA.dirichlet_alpha, "Dirichlet concentration for partition=dirichlet (> 0)."
)
flags.DEFINE_integer(
  "num_clients", _DATA.num_clients, "Number of clients (writers are sampled down to this many)."
)
flags.DEFINE_integer(
  "min_examples", _DATA.min_examples_per_client, "Writers with fewer examples are not clients."
)
flags.DEFINE_bool("digits_only", _DATA.digits_only, "femnist/emnist: keep only the 10 digit classes.")
flags.DEFINE_integer(
  "capacity", _DATA.capacity, "Per-client slots in the padded pool (0 = the largest client)."
)
flags.DEFINE_integer(
  "test_examples",
  _DATA.test_examples,
  "Evaluate on a seeded subsample of this many test examples (0 = the whole test split).",
)
# Model and privacy.
flags.DEFINE_enum("model", _MODEL.name, list(fc.MODELS), "cnn: small flax CNN; logreg: logistic regression.")
flags.DEFINE_float("clip_norm", _PRIVACY.clip_norm, "Per-example L2 clipping bound C (> 0).")
flags.DEFINE_float("delta", _PRIVACY.delta, "Every client's target delta, in (0, 1).")
flags.DEFINE_enum(
  "accountant", _PRIVACY.accountant, list(fc.ACCOUNTANTS), "dp-accounting accountant for exact numbers."
)
flags.DEFINE_enum(
  "calibration",
  _PRIVACY.calibration,
  list(fc.CALIBRATIONS),
  "exact: host-side accountant inversion of eps_i -> z_i (tight); surrogate: the "
  "differentiable closed form, solved with the mechanism inside the jitted round "
  "(conservative: more noise).",
)
flags.DEFINE_bool(
  "private", _PRIVACY.private, "False = no clipping and no noise (the non-private reference)."
)
# Federated schedule.
flags.DEFINE_integer("rounds", _FED.rounds, "Federated rounds T.")
flags.DEFINE_integer("local_steps", _FED.local_steps, "Local DP-SGD steps S per round.")
flags.DEFINE_integer("batch_size", _FED.batch_size, "Local batch size B (sampling rate q_i = B / n_i).")
flags.DEFINE_float("client_lr", _FED.client_lr, "Client SGD learning rate.")
flags.DEFINE_float("server_lr", _FED.server_lr, "Server learning rate on the FedAvg pseudo-gradient.")
flags.DEFINE_enum(
  "server_optimizer", _FED.server_optimizer, list(fc.SERVER_OPTIMIZERS), "Server optax optimizer."
)
flags.DEFINE_integer(
  "chunk_size", _FED.chunk_size, "Clients per vmapped chunk (0 = all at once); bounds memory."
)
# Game.
flags.DEFINE_float("lam", _GAME.lam, "Server's valuation lambda of model quality (> 0).")
flags.DEFINE_float("cost_low", _GAME.cost_low, "Privacy costs c_i ~ Uniform[cost_low, cost_high] (> 0).")
flags.DEFINE_float("cost_high", _GAME.cost_high, "Upper end of the privacy-cost distribution.")
flags.DEFINE_float("eps_max", _GAME.eps_max, "Largest budget a client may sell (> 0).")
flags.DEFINE_float("eps_min", _GAME.eps_min, "Budget the no-incentive mandate imposes on every client.")
flags.DEFINE_integer(
  "num_types", _GAME.num_types, "Contract theory: number of cost types (0 = one per client)."
)
flags.DEFINE_integer(
  "num_aggregators", _GAME.num_aggregators, "Three-party game: number of edge aggregators."
)
flags.DEFINE_enum(
  "valuation",
  _GAME.valuation,
  list(fc.VALUATIONS),
  "dp: Q = -(noise variance of the aggregate); log: log(1+X).",
)
flags.DEFINE_enum(
  "aggregation",
  _GAME.aggregation,
  list(fc.AGGREGATIONS),
  "noise_aware: inverse-variance weights; fedavg: n_i.",
)
flags.DEFINE_float(
  "data_epsilon", _GAME.data_epsilon, "Budget whose DP noise equals a mean-size client's data term (> 0)."
)
# Run.
flags.DEFINE_integer("seed", _SIM.seed, "Seed of everything (costs, model init, sampling, noise).")
flags.DEFINE_string("out", "results", "Output folder for CSV/JSON/PNG files.")
flags.DEFINE_integer(
  "checkpoint_every", _SIM.checkpoint_every, "Checkpoint every K rounds (0 = only the last round)."
)
flags.DEFINE_bool("checkpoint", False, "Checkpoint into <out>/checkpoints/<mechanism> and resume from it.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")

# Checked while parsing, so a run never computes for minutes only to find it cannot write its results.
flags.register_validator(
  "out",
  lambda path: not os.path.exists(path) or os.path.isdir(path),
  "expected a directory (it is created if missing), not an existing file",
)


def _exit_with(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """FLAGS(argv), or exit(2) with absl's one-line message naming the flag and value (no usage text)."""
  try:
    return FLAGS(argv)
  except flags.Error as err:
    _exit_with(" ".join(str(err).split()))


def positive_floats(name: str, values: list[str]) -> list[float]:
  """The list flag ``name`` as numbers > 0; raises ConfigError naming the bad entry."""
  numbers = []
  for value in values:
    try:
      numbers.append(float(value))
    except ValueError:
      validate.require(False, f"{name} has {value!r}: expected numbers > 0")
    validate.check_positive(name, numbers[-1])
  return numbers


def config_or_exit(build: Callable[[], _T]) -> _T:
  """build(), or exit(2) with the ConfigError's one-line message (no traceback)."""
  try:
    return build()
  except validate.ConfigError as err:
    _exit_with(str(err))


def simulation_config(mechanism: str, checkpoint_dir: str | None = None) -> fc.SimulationConfig:
  """The SimulationConfig the flags describe, for one mechanism."""
  return fc.SimulationConfig(
    data=fc.DataConfig(
      dataset=FLAGS.dataset,
      source=FLAGS.source,
      path=FLAGS.data_path,
      partition=FLAGS.partition,
      dirichlet_alpha=FLAGS.dirichlet_alpha,
      num_clients=FLAGS.num_clients,
      min_examples_per_client=FLAGS.min_examples,
      digits_only=FLAGS.digits_only,
      capacity=FLAGS.capacity,
      test_examples=FLAGS.test_examples,
      seed=FLAGS.seed,
    ),
    model=fc.ModelConfig(name=FLAGS.model),
    privacy=fc.PrivacyConfig(
      clip_norm=FLAGS.clip_norm,
      delta=FLAGS.delta,
      accountant=FLAGS.accountant,
      calibration=FLAGS.calibration,
      private=FLAGS.private,
    ),
    federated=fc.FederatedConfig(
      rounds=FLAGS.rounds,
      local_steps=FLAGS.local_steps,
      batch_size=FLAGS.batch_size,
      client_lr=FLAGS.client_lr,
      server_lr=FLAGS.server_lr,
      server_optimizer=FLAGS.server_optimizer,
      chunk_size=FLAGS.chunk_size,
    ),
    game=fc.GameConfig(
      mechanism=mechanism,
      lam=FLAGS.lam,
      cost_low=FLAGS.cost_low,
      cost_high=FLAGS.cost_high,
      eps_max=FLAGS.eps_max,
      eps_min=FLAGS.eps_min,
      num_types=FLAGS.num_types,
      num_aggregators=FLAGS.num_aggregators,
      valuation=FLAGS.valuation,
      aggregation=FLAGS.aggregation,
      data_epsilon=FLAGS.data_epsilon,
    ),
    seed=FLAGS.seed,
    checkpoint_dir=checkpoint_dir,
    checkpoint_every=FLAGS.checkpoint_every,
  )
